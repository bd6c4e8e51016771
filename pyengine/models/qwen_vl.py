"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL as classifiers: a vision tower in front of the
Qwen2 (Qwen3 for Qwen3-VL) decoder.

The ViT runs over every image of the batch packed back to back (one ``cu_seqlens`` per
image, or per window of Qwen2.5-VL's windowed layers), its merged patches replace the
placeholder tokens' embeddings, and the decoder rotates q/k by multimodal rotary
positions: the head dimension's frequency pairs are split into (temporal, height, width)
sections (consecutive in Qwen2/2.5-VL, interleaved in Qwen3-VL), each rotated by that
axis' position (``rope_parameters.mrope_section``). Text
tokens have one position on all three axes, so a batch without images is the plain
Qwen2 decoder (CUDA graphs included); a batch with images runs eagerly.

Checkpoints: ``*ForConditionalGeneration`` converted to a last-token classifier (a
``score.weight`` or ``classifier_from_token``), ``*ForSequenceClassification`` (the same
weights with ``score.weight``), and jina-reranker-m0 (``JinaVLForRanking``, below).
Videos (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) run through the same tower, each patch spanning
``temporal_patch_size`` frames and attention within each group of patches
(:mod:`pyengine.multimodal`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import DecoderForSequenceClassification, ReluMLPHead, _p, language_config, linear_patches
from .moe import MoeDecoderForSequenceClassification

# Architecture prefix -> vision tower generation.
_GENERATIONS = (("Qwen2_5_VL", "2.5"), ("Qwen2VL", "2"), ("Qwen3VL", "3"), ("JinaVL", "2"))

_ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


# On the CPU a tower pass over tens of thousands of patches works out of cache: passes of
# whole items of at most this many patches ran Qwen2.5-VL's tower 1.6x faster (32 videos,
# 40k patches, 2 cores: 2.56 s in one pass, 1.59 s in passes of 4096; 8192: 1.72 s).
CPU_PASS = 4096


def cpu_passes(pixels, sizes):
    """[(first item, end item, first row, end row)] cutting items of ``sizes`` rows into
    consecutive passes of at most CPU_PASS rows (an item never split; a larger one alone),
    or None for one pass (a GPU, or few rows)."""
    if pixels.device.type != "cpu" or sum(sizes) <= CPU_PASS:
        return None
    out, i, a = [], 0, 0
    while i < len(sizes):
        j, n = i + 1, sizes[i]
        while j < len(sizes) and n + sizes[j] <= CPU_PASS:
            n += sizes[j]
            j += 1
        out.append((i, j, a, a + n))
        i, a = j, a + n
    return out


class VisionTower(nn.Module):
    """pixel patches (N, C*tp*p*p) of images with grids [(t, h, w)] -> (N / merge**2, H_out),
    and for Qwen3-VL the deepstack features, one (N / merge**2, H_out) per listed block.

    gen "2": Qwen2-VL (LayerNorm, quick-GELU MLP); "2.5": Qwen2.5-VL (RMSNorm, SwiGLU with
    biases, windowed attention outside ``fullatt_block_indexes``); "3": Qwen3-VL
    (LayerNorm, GELU-tanh MLP, a patch bias, learned positions resampled bilinearly to each
    image's grid, deepstack mergers after ``deepstack_visual_indexes``)."""

    def __init__(self, vc, gen, dtype, device, ops):
        super().__init__()
        self.gen, self.ops = gen, ops
        E = vc.embed_dim if gen == "2" else vc.hidden_size
        out = vc.hidden_size if gen == "2" else vc.out_hidden_size
        I = int(vc.embed_dim * vc.mlp_ratio) if gen == "2" else vc.intermediate_size
        self.E, self.nh = E, vc.num_heads
        if E % self.nh or (E // self.nh) % 4:
            raise ValueError(f"vision tower: hidden size {E} over {self.nh} heads needs a head_dim divisible by 4")
        self.hd = E // self.nh
        self.merge, self.patch = vc.spatial_merge_size, vc.patch_size
        self.window = getattr(vc, "window_size", 0) if gen == "2.5" else 0
        self.full = set(getattr(vc, "fullatt_block_indexes", []) or [])
        act = getattr(vc, "hidden_act", None)
        self.gated = gen == "2.5"
        if (self.gated and act not in ("silu", "swish")) or (not self.gated and act not in _ACTS):
            raise ValueError(f"vision tower: hidden_act={act!r} is not supported")
        self.act = None if self.gated else _ACTS[act]
        self.deepstack = list(getattr(vc, "deepstack_visual_indexes", None) or []) if gen == "3" else []
        kw = dict(dtype=dtype, device=device)
        P = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        self.patch_w, self.patch_b = _p(E, P, **kw), (_p(E, **kw) if gen == "3" else None)
        self.side = int(vc.num_position_embeddings ** 0.5) if gen == "3" else 0
        if gen == "3" and self.side ** 2 != vc.num_position_embeddings:
            raise ValueError(f"vision tower: num_position_embeddings={vc.num_position_embeddings} is not a square")
        self.pos_embed = _p(self.side ** 2, E, **kw) if gen == "3" else None
        nb = gen != "2.5"  # LayerNorm has a bias
        self.blocks = nn.ModuleList()
        for _ in range(vc.depth):
            b = nn.Module()
            b.ln1_w, b.ln1_b = _p(E, **kw), (_p(E, **kw) if nb else None)
            b.ln2_w, b.ln2_b = _p(E, **kw), (_p(E, **kw) if nb else None)
            b.qkv_w, b.qkv_b = _p(3 * E, E, **kw), _p(3 * E, **kw)
            b.o_w, b.o_b = _p(E, E, **kw), _p(E, **kw)
            up = 2 * I if self.gated else I  # [gate | up] packed for one gated_act
            b.up_w, b.up_b = _p(up, E, **kw), _p(up, **kw)
            b.down_w, b.down_b = _p(E, I, **kw), _p(E, **kw)
            self.blocks.append(b)
        M = E * self.merge ** 2
        # Mergers: [norm over E (or over the M-wide group for deepstack), M -> M, GELU, M -> out].
        self.mergers = nn.ModuleList()
        for j in range(1 + len(self.deepstack)):
            m = nn.Module()
            width = E if j == 0 else M
            m.ln_w, m.ln_b = _p(width, **kw), (_p(width, **kw) if nb else None)
            m.w1, m.b1, m.w2, m.b2 = _p(M, M, **kw), _p(M, **kw), _p(out, M, **kw), _p(out, **kw)
            self.mergers.append(m)
        theta = float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        d = self.hd // 2
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        self.register_buffer("inv_freq", inv.to(device), persistent=False)

    def targets(self, rest):
        """Checkpoint name under ``visual.`` -> [(param, rows)]."""
        top = {"patch_embed.proj.weight": "patch_w", "patch_embed.proj.bias": "patch_b",
               "pos_embed.weight": "pos_embed"}
        for pre, j in [("merger.", 0)] + [(f"deepstack_merger_list.{k}.", k + 1) for k in range(len(self.deepstack))]:
            top.update({pre + "ln_q.weight": f"mergers.{j}.ln_w", pre + "ln_q.bias": f"mergers.{j}.ln_b",
                        pre + "norm.weight": f"mergers.{j}.ln_w", pre + "norm.bias": f"mergers.{j}.ln_b",
                        pre + "mlp.0.weight": f"mergers.{j}.w1", pre + "mlp.0.bias": f"mergers.{j}.b1",
                        pre + "mlp.2.weight": f"mergers.{j}.w2", pre + "mlp.2.bias": f"mergers.{j}.b2",
                        pre + "linear_fc1.weight": f"mergers.{j}.w1", pre + "linear_fc1.bias": f"mergers.{j}.b1",
                        pre + "linear_fc2.weight": f"mergers.{j}.w2", pre + "linear_fc2.bias": f"mergers.{j}.b2"})
        if rest in top:
            return [(top[rest], None)]
        parts = rest.split(".")
        if parts[0] != "blocks" or len(parts) < 4:
            return []
        p, key = f"blocks.{parts[1]}.", ".".join(parts[2:])
        I = self.blocks[0].down_w.shape[1]
        sub = {"norm1.weight": ("ln1_w", None), "norm1.bias": ("ln1_b", None), "norm2.weight": ("ln2_w", None),
               "norm2.bias": ("ln2_b", None), "attn.qkv.weight": ("qkv_w", None), "attn.qkv.bias": ("qkv_b", None),
               "attn.proj.weight": ("o_w", None), "attn.proj.bias": ("o_b", None),
               "mlp.gate_proj.weight": ("up_w", slice(0, I)), "mlp.gate_proj.bias": ("up_b", slice(0, I)),
               "mlp.up_proj.weight": ("up_w", slice(I, 2 * I)), "mlp.up_proj.bias": ("up_b", slice(I, 2 * I)),
               "mlp.down_proj.weight": ("down_w", None), "mlp.down_proj.bias": ("down_b", None)}
        for fc1, fc2 in (("fc1", "fc2"), ("linear_fc1", "linear_fc2")):
            sub.update({f"mlp.{fc1}.weight": ("up_w", None), f"mlp.{fc1}.bias": ("up_b", None),
                        f"mlp.{fc2}.weight": ("down_w", None), f"mlp.{fc2}.bias": ("down_b", None)})
        return [(p + sub[key][0], sub[key][1])] if key in sub else []

    # ------------------------------------------------------------------ layout
    def _axis(self, n):
        """Bilinear taps (align_corners) of n positions into the learned side x side grid."""
        src = torch.arange(n, dtype=torch.float32) * (self.side - 1) / max(n - 1, 1)
        f = src.floor()
        lo = f.long().clamp(0, self.side - 1)
        return torch.stack((lo, (lo + 1).clamp(max=self.side - 1)), -1), torch.stack((1 - (src - f), src - f), -1)

    def _layout(self, grids, device):
        """Host-side layout of the packed patches: per-patch (h, w) positions, the
        window order of merge groups (None: no windows), cu_seqlens per image and per
        window, their longest spans, and (Qwen3-VL) the bilinear taps and weights into
        the learned position grid."""
        m = self.merge
        hw, order, cu_img, cu_win, taps, wts = [], [], [0], [0], [], []
        ws = self.window // m // self.patch if self.window else 0
        base = 0
        for t, h, w in grids:
            hh = torch.arange(h).view(h // m, m, 1, 1).expand(-1, -1, w // m, m)
            ww = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, -1, -1)
            # Patches come in merge-block order: (block row, block col, row in block, col in block).
            blk = torch.stack((hh.permute(0, 2, 1, 3).flatten(), ww.permute(0, 2, 1, 3).flatten()), -1)
            hw.append(blk.repeat(t, 1))
            cu_img += [cu_img[-1] + h * w * (k + 1) for k in range(t)]  # attention within each group of frames
            if self.side:
                (th, wh), (tw, ww_) = self._axis(h), self._axis(w)
                r, c = blk[:, 0], blk[:, 1]
                taps.append((th[r][:, :, None] * self.side + tw[c][:, None, :]).flatten(1).repeat(t, 1))
                wts.append((wh[r][:, :, None] * ww_[c][:, None, :]).flatten(1).repeat(t, 1))
            if ws:
                lh, lw = h // m, w // m
                grid = torch.arange(t * lh * lw).view(t, lh, lw) + base
                for f in range(t):
                    for y in range(0, lh, ws):
                        for x in range(0, lw, ws):
                            win = grid[f, y:y + ws, x:x + ws].flatten()
                            order.append(win)
                            cu_win.append(cu_win[-1] + win.numel() * m * m)
                base += t * lh * lw
        cu_img = torch.tensor(cu_img, dtype=torch.int32)
        lay = {"pos": torch.cat(hw).to(device), "order": None, "cu": cu_img.to(device),
               "span": int((cu_img[1:] - cu_img[:-1]).max())}
        if taps:
            lay["taps"], lay["weights"] = torch.cat(taps).to(device), torch.cat(wts).to(device)
        if ws:
            cu_win = torch.tensor(cu_win, dtype=torch.int32)
            lay.update(order=torch.cat(order).to(device), cu_win=cu_win.to(device),
                       win_span=int((cu_win[1:] - cu_win[:-1]).max()))
        return lay

    def _norm(self, x, res, w, b):
        if self.gen == "2.5":
            return self.ops.add_rms_norm(x, res, w, 1e-6)
        return self.ops.add_layer_norm(x, res, w, b, 1e-6)

    def _merge(self, j, x):
        """Merger j over the (N, E) stream x -> (N / merge**2, out)."""
        m, N, g = self.mergers[j], x.shape[0], self.merge ** 2
        if j == 0:
            y = self._norm(x, None, m.ln_w, m.ln_b)[0].view(N // g, g * self.E)
        else:  # deepstack: the norm runs over the whole merged group
            y = self._norm(x.reshape(N // g, g * self.E), None, m.ln_w, m.ln_b)[0]
        return F.linear(F.gelu(F.linear(y, m.w1, m.b1)), m.w2, m.b2)

    def forward(self, pixels, grids):
        """-> (merged (N / merge**2, out), [deepstack features]). On the CPU in passes of
        whole items of at most CPU_PASS patches (see :func:`cpu_passes`)."""
        passes = cpu_passes(pixels, [t * h * w for t, h, w in grids])
        if passes is None:
            return self._forward(pixels, grids)
        outs = [self._forward(pixels[a:b], grids[i:j]) for i, j, a, b in passes]
        return torch.cat([y for y, _ in outs]), [torch.cat(parts) for parts in zip(*(d for _, d in outs))]

    def _forward(self, pixels, grids):
        ops, E, nh, hd, g = self.ops, self.E, self.nh, self.hd, self.merge ** 2
        N = pixels.shape[0]
        lay = self._layout(grids, pixels.device)
        order = lay["order"]
        x = F.linear(pixels.to(self.patch_w.dtype), self.patch_w, self.patch_b)
        if self.pos_embed is not None:
            pe = (self.pos_embed[lay["taps"]].float() * lay["weights"][:, :, None]).sum(1)
            x = x + pe.to(x.dtype)
        ang = lay["pos"].float()[..., None] * self.inv_freq  # (N, 2, hd/4): h then w
        table = torch.cat((ang.flatten(1).cos(), ang.flatten(1).sin()), dim=-1)
        if order is not None:
            # Windows are runs of whole merge groups: permute groups so each window is
            # contiguous, and undo it after the merger.
            x = x.view(N // g, g, E)[order].view(N, E)
            table = table.view(N // g, g, -1)[order].view(N, -1)
        rot_pos = torch.arange(N, device=pixels.device)
        scale = hd ** -0.5
        h, res = self._norm(x, None, self.blocks[0].ln1_w, self.blocks[0].ln1_b)
        last, deep = len(self.blocks) - 1, []
        for i, b in enumerate(self.blocks):
            q, k, v = F.linear(h, b.qkv_w, b.qkv_b).view(N, 3, nh, hd).unbind(1)
            q, k = ops.rotary(q, k, rot_pos, table)
            full = order is None or i in self.full
            a = ops.varlen_attention(q, k, v, lay["cu"] if full else lay["cu_win"],
                                     lay["span"] if full else lay["win_span"], causal=False, scale=scale)
            h, res = self._norm(F.linear(a.reshape(N, E), b.o_w, b.o_b), res, b.ln2_w, b.ln2_b)
            u = F.linear(h, b.up_w, b.up_b)
            u = ops.gated_act(u, "silu") if self.gated else self.act(u)
            m = F.linear(u, b.down_w, b.down_b)
            if i in self.deepstack:
                deep.append(self._merge(1 + self.deepstack.index(i), m + res))
            if i < last:
                h, res = self._norm(m, res, self.blocks[i + 1].ln1_w, self.blocks[i + 1].ln1_b)
        y = self._merge(0, m + res)
        if order is not None:
            y = y[torch.argsort(order)]
        return y, deep


class QwenVLForSequenceClassification(DecoderForSequenceClassification):
    """forward(batch) -> (B, num_labels) fp32; batch.mm carries the batch's images.

    LoRA adapters apply to the language model's layers and the head, as for the text
    decoders; an adapter that names a vision-tower weight is refused when loaded."""

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        text = language_config(config)
        super().__init__(text, arch, dtype, device, ops, pooling)
        vc = config.vision_config
        self.image_token_id = int(config.image_token_id)
        vt = getattr(config, "video_token_id", None)
        self.video_token_id = int(vt) if vt is not None else None
        if self.image_token_id >= self.vocab_size:
            raise ValueError(f"{arch}: image_token_id={self.image_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        gen = next(g for pre, g in _GENERATIONS if arch.startswith(pre))
        self.vision = VisionTower(vc, gen, dtype, device, ops)
        width = self.vision.mergers[0].w2.shape[0]
        if width != self.H:
            raise ValueError(f"{arch}: the vision tower's output width {width} is not the language model's hidden "
                             f"size {self.H}")
        if len(self.vision.deepstack) >= self.num_layers:
            raise ValueError(f"{arch}: {len(self.vision.deepstack)} deepstack features for {self.num_layers} "
                             "decoder layers; the last layer must not take one")
        rp = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        sec = list(rp.get("mrope_section") or [])
        half = self.cos_sin.shape[1] // 2
        if len(sec) != 3 or sum(sec) != half or self.cos_sin.shape[1] != self.hd:
            raise ValueError(f"{arch}: mrope_section={sec} must be three sizes summing to head_dim/2={self.hd // 2}")
        if gen == "3":
            # Interleaved: frequency j rotates by height if j % 3 == 1 and by width if
            # j % 3 == 2, within each axis' first 3 * section frequencies; else by time.
            j = torch.arange(half)
            axis = torch.where((j % 3 == 1) & (j < 3 * sec[1]), 1, torch.where((j % 3 == 2) & (j < 3 * sec[2]), 2, 0))
        else:  # consecutive sections: time, then height, then width
            axis = torch.cat([torch.full((n,), a) for a, n in enumerate(sec)])
        self.register_buffer("mrope_axis", torch.cat((axis, axis)).to(device), persistent=False)

    def _rope(self, batch, i):
        if batch.mm is None:
            return batch.positions, self.cos_sin
        if batch.mm.rotary is None:
            # One table row per token: column j takes the row of the position on its axis.
            idx = batch.mm.rope_positions[self.mrope_axis]  # (R, T)
            table = torch.gather(self.cos_sin, 0, idx.t().contiguous())
            batch.mm.rotary = (torch.arange(table.shape[0], device=table.device), table)
        return batch.mm.rotary

    def _embed(self, batch):
        x = super()._embed(batch)
        if batch.mm is not None and (batch.mm.grids or batch.mm.given):
            feats, deep = self.vision(batch.mm.pixel_values, batch.mm.grids) if batch.mm.grids else (None, [])
            feats, batch.mm.deepstack = batch.mm.features(feats, deep, self.H, self.vision.merge, x.dtype)
            batch.mm.mask = batch.input_ids == self.image_token_id
            if self.video_token_id is not None:
                batch.mm.mask |= batch.input_ids == self.video_token_id
            x[batch.mm.mask] = feats
        return x

    def _layer_out(self, i, m, batch):
        # Qwen3-VL's deepstack: block features added to the image tokens' residual stream
        # after the first decoder layers (folded into the MLP output the next norm adds).
        if batch.mm is not None and i < len(batch.mm.deepstack or ()):
            m[batch.mm.mask] += batch.mm.deepstack[i].to(m.dtype)
        return m

    def param_targets(self, name):
        for pre in ("model.visual.", "visual."):
            if name.startswith(pre):
                return [("vision." + p, rows, None) for p, rows in self.vision.targets(name[len(pre):])]
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        return super().param_targets(name)

    def load_weights(self, weights):
        super().load_weights(linear_patches(weights, "patch_embed.proj.weight", self.vision.E))

    def _expected(self, params):
        out = []
        I = self.vision.blocks[0].down_w.shape[1]
        for n in super()._expected(params):
            if self.vision.gated and n.startswith("vision.blocks.") and n.rsplit(".", 1)[-1] in ("up_w", "up_b"):
                out += [f"{n}[{slice(0, I)}]", f"{n}[{slice(I, 2 * I)}]"]
            else:
                out.append(n)
        return out


class QwenVLMoeForSequenceClassification(QwenVLForSequenceClassification, MoeDecoderForSequenceClassification):
    """Qwen3-VL-MoE: the Qwen3-VL vision tower in front of the Qwen3-MoE decoder
    (pyengine.models.moe: LoRA on the attention and the head)."""


class JinaVLForRanking(ReluMLPHead, QwenVLForSequenceClassification):
    """jina-reranker-m0 (``JinaVLForRanking``; vLLM's ``JinaVLForSequenceClassification``):
    Qwen2-VL with a two-layer head on the last token, relu(h W1^T + b1) W2^T + b2, in
    fp32, one label. Its score prompts render "**Document**:\n{document}\n**Query**:\n
    {query}" and end with token 100, and its scores are sigmoid(logit - 2.65), as the
    checkpoint's own scoring code computes them (a pooler_config logit_bias overrides
    the 2.65)."""

    score_template = "**Document**:\n{{ document }}\n**Query**:\n{{ query }}"
    score_suffix = (100,)
    logit_bias = 2.65

