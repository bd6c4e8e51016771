"""Qwen2-VL and Qwen2.5-VL as classifiers: a vision tower in front of the Qwen2 decoder.

The ViT runs over every image of the batch packed back to back (one ``cu_seqlens`` per
image, or per window of Qwen2.5-VL's windowed layers), its merged patches replace the
placeholder tokens' embeddings, and the decoder rotates q/k by multimodal rotary
positions: the head dimension's frequency pairs are split into (temporal, height, width)
sections, each rotated by that axis' position (``rope_parameters.mrope_section``). Text
tokens have one position on all three axes, so a batch without images is the plain
Qwen2 decoder (CUDA graphs included); a batch with images runs eagerly.

Checkpoints: ``*ForConditionalGeneration`` converted to a last-token classifier (a
``score.weight`` or ``classifier_from_token``), and ``*ForSequenceClassification``
(the same weights with ``score.weight``). Videos are not supported.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import DecoderForSequenceClassification, _p

# Attributes of the outer config that the decoder reads (the head, its labels).
_OUTER = ("num_labels", "id2label", "label2id", "problem_type", "classifier_from_token", "classifier_token_ids",
          "method", "tie_word_embeddings", "pad_token_id")


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class VisionTower(nn.Module):
    """pixel patches (N, C*tp*p*p) of images with grids [(t, h, w)] -> (N / merge**2, H_out).

    v25: Qwen2.5-VL (RMSNorm, SwiGLU with biases, windowed attention outside
    ``fullatt_block_indexes``); else Qwen2-VL (LayerNorm, quick-GELU MLP, full attention)."""

    def __init__(self, vc, v25, dtype, device, ops):
        super().__init__()
        self.v25, self.ops = v25, ops
        E = vc.hidden_size if v25 else vc.embed_dim
        out = vc.out_hidden_size if v25 else vc.hidden_size
        I = vc.intermediate_size if v25 else int(vc.embed_dim * vc.mlp_ratio)
        self.E, self.nh = E, vc.num_heads
        if E % self.nh or (E // self.nh) % 4:
            raise ValueError(f"vision tower: hidden size {E} over {self.nh} heads needs a head_dim divisible by 4")
        self.hd = E // self.nh
        self.merge, self.patch = vc.spatial_merge_size, vc.patch_size
        self.window = getattr(vc, "window_size", 0) if v25 else 0
        self.full = set(getattr(vc, "fullatt_block_indexes", []) or []) if v25 else None
        act = getattr(vc, "hidden_act", "silu" if v25 else "quick_gelu")
        if (v25 and act not in ("silu", "swish")) or (not v25 and act != "quick_gelu"):
            raise ValueError(f"vision tower: hidden_act={act!r} is not supported")
        kw = dict(dtype=dtype, device=device)
        P = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        self.patch_w = _p(E, P, **kw)
        nb = not v25  # LayerNorm has a bias
        self.blocks = nn.ModuleList()
        for _ in range(vc.depth):
            b = nn.Module()
            b.ln1_w, b.ln1_b = _p(E, **kw), (_p(E, **kw) if nb else None)
            b.ln2_w, b.ln2_b = _p(E, **kw), (_p(E, **kw) if nb else None)
            b.qkv_w, b.qkv_b = _p(3 * E, E, **kw), _p(3 * E, **kw)
            b.o_w, b.o_b = _p(E, E, **kw), _p(E, **kw)
            up = 2 * I if v25 else I  # [gate | up] packed for one gated_act
            b.up_w, b.up_b = _p(up, E, **kw), _p(up, **kw)
            b.down_w, b.down_b = _p(E, I, **kw), _p(E, **kw)
            self.blocks.append(b)
        M = E * self.merge ** 2
        self.mln_w, self.mln_b = _p(E, **kw), (_p(E, **kw) if nb else None)
        self.m1_w, self.m1_b = _p(M, M, **kw), _p(M, **kw)
        self.m2_w, self.m2_b = _p(out, M, **kw), _p(out, **kw)
        theta = float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        d = self.hd // 2
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d),
                             persistent=False)

    def targets(self, rest):
        """Checkpoint name under ``visual.`` -> [(param, rows)]."""
        top = {"patch_embed.proj.weight": "patch_w", "merger.ln_q.weight": "mln_w", "merger.ln_q.bias": "mln_b",
               "merger.mlp.0.weight": "m1_w", "merger.mlp.0.bias": "m1_b",
               "merger.mlp.2.weight": "m2_w", "merger.mlp.2.bias": "m2_b"}
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
               "mlp.down_proj.weight": ("down_w", None), "mlp.down_proj.bias": ("down_b", None),
               "mlp.fc1.weight": ("up_w", None), "mlp.fc1.bias": ("up_b", None),
               "mlp.fc2.weight": ("down_w", None), "mlp.fc2.bias": ("down_b", None)}
        return [(p + sub[key][0], sub[key][1])] if key in sub else []

    # ------------------------------------------------------------------ layout
    def _layout(self, grids, device):
        """Host-side layout of the packed patches: per-patch (h, w) positions, the
        window order of merge groups (None: no windows), cu_seqlens per image and per
        window, and their longest spans."""
        m = self.merge
        hw, order, cu_img, cu_win = [], [], [0], [0]
        ws = self.window // m // self.patch if self.window else 0
        base = 0
        for t, h, w in grids:
            hh = torch.arange(h).view(h // m, m, 1, 1).expand(-1, -1, w // m, m)
            ww = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, -1, -1)
            # Patches come in merge-block order: (block row, block col, row in block, col in block).
            blk = torch.stack((hh.permute(0, 2, 1, 3).flatten(), ww.permute(0, 2, 1, 3).flatten()), -1)
            hw.append(blk.repeat(t, 1))
            cu_img += [cu_img[-1] + h * w] * t
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
        pos = torch.cat(hw)
        cu_img = torch.tensor(cu_img, dtype=torch.int32)
        span = int((cu_img[1:] - cu_img[:-1]).max())
        if not ws:
            return pos, None, cu_img.to(device), span, None, 0
        cu_win = torch.tensor(cu_win, dtype=torch.int32)
        return (pos, torch.cat(order), cu_img.to(device), span, cu_win.to(device),
                int((cu_win[1:] - cu_win[:-1]).max()))

    def _norm(self, x, res, w, b):
        if self.v25:
            return self.ops.add_rms_norm(x, res, w, 1e-6)
        return self.ops.add_layer_norm(x, res, w, b, 1e-6)

    def forward(self, pixels, grids):
        ops, E, nh, hd, g = self.ops, self.E, self.nh, self.hd, self.merge ** 2
        N = pixels.shape[0]
        pos, order, cu_img, span, cu_win, win_span = self._layout(grids, pixels.device)
        x = F.linear(pixels.to(self.patch_w.dtype), self.patch_w)
        ang = pos.to(pixels.device).float()[..., None] * self.inv_freq  # (N, 2, hd/4): h then w
        table = torch.cat((ang.flatten(1).cos(), ang.flatten(1).sin()), dim=-1)
        if order is not None:
            # Windows are runs of whole merge groups: permute groups so each window is
            # contiguous, and undo it after the merger.
            order = order.to(pixels.device)
            x = x.view(N // g, g, E)[order].view(N, E)
            table = table.view(N // g, g, -1)[order].view(N, -1)
        rot_pos = torch.arange(N, device=pixels.device)
        scale = hd ** -0.5
        h, res = self._norm(x, None, self.blocks[0].ln1_w, self.blocks[0].ln1_b)
        last = len(self.blocks) - 1
        for i, b in enumerate(self.blocks):
            q, k, v = F.linear(h, b.qkv_w, b.qkv_b).view(N, 3, nh, hd).unbind(1)
            q, k = ops.rotary(q, k, rot_pos, table)
            full = order is None or i in self.full
            a = ops.varlen_attention(q, k, v, cu_img if full else cu_win, span if full else win_span,
                                     causal=False, scale=scale)
            h, res = self._norm(F.linear(a.reshape(N, E), b.o_w, b.o_b), res, b.ln2_w, b.ln2_b)
            u = F.linear(h, b.up_w, b.up_b)
            u = ops.gated_act(u, "silu") if self.v25 else _quick_gelu(u)
            m = F.linear(u, b.down_w, b.down_b)
            if i < last:
                h, res = self._norm(m, res, self.blocks[i + 1].ln1_w, self.blocks[i + 1].ln1_b)
        y = self._norm(m, res, self.mln_w, self.mln_b)[0].view(N // g, g * E)
        y = F.linear(F.gelu(F.linear(y, self.m1_w, self.m1_b)), self.m2_w, self.m2_b)
        if order is not None:
            y = y[torch.argsort(order)]
        return y


class QwenVLForSequenceClassification(DecoderForSequenceClassification):
    """forward(batch) -> (B, num_labels) fp32; batch.mm carries the batch's images."""

    # Adapters are for the text families; a VL adapter would also name vision weights.
    lora_weights = ()

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        text = copy.copy(getattr(config, "text_config", None) or config)
        for a in _OUTER:
            if hasattr(config, a):
                setattr(text, a, getattr(config, a))
        super().__init__(text, arch, dtype, device, ops, pooling)
        self.outer_config = config
        vc = config.vision_config
        self.image_token_id = int(config.image_token_id)
        if self.image_token_id >= self.vocab_size:
            raise ValueError(f"{arch}: image_token_id={self.image_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        self.vision = VisionTower(vc, arch.startswith("Qwen2_5_VL"), dtype, device, ops)
        if self.vision.m2_w.shape[0] != self.H:
            raise ValueError(f"{arch}: the vision tower's output width {self.vision.m2_w.shape[0]} is not the "
                             f"language model's hidden size {self.H}")
        rp = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        sec = list(rp.get("mrope_section") or [])
        half = self.cos_sin.shape[1] // 2
        if len(sec) != 3 or sum(sec) != half or self.cos_sin.shape[1] != self.hd:
            raise ValueError(f"{arch}: mrope_section={sec} must be three sizes summing to head_dim/2={self.hd // 2}")
        axis = torch.cat([torch.full((n,), a) for a, n in enumerate(sec)])
        self.register_buffer("mrope_axis", torch.cat((axis, axis)).to(device), persistent=False)

    def _rope(self, batch):
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
        if batch.mm is not None and batch.mm.grids:
            feats = self.vision(batch.mm.pixel_values, batch.mm.grids)
            x[batch.input_ids == self.image_token_id] = feats.to(x.dtype)
        return x

    def param_targets(self, name):
        for pre in ("model.visual.", "visual."):
            if name.startswith(pre):
                return [("vision." + p, rows, None) for p, rows in self.vision.targets(name[len(pre):])]
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        return super().param_targets(name)

    def load_weights(self, weights):
        E = self.vision.E

        def reshaped(ws):
            for n, t in ws:
                # The Conv3d patch embedding with stride = kernel is a linear map of the patch.
                yield n, (t.reshape(E, -1) if n.endswith("patch_embed.proj.weight") else t)
        super().load_weights(reshaped(weights))

    def _expected(self, params):
        out = []
        I = self.vision.blocks[0].down_w.shape[1]
        for n in super()._expected(params):
            if self.vision.v25 and n.startswith("vision.blocks.") and n.rsplit(".", 1)[-1] in ("up_w", "up_b"):
                out += [f"{n}[{slice(0, I)}]", f"{n}[{slice(I, 2 * I)}]"]
            else:
                out.append(n)
        return out
