"""NVIDIA's Llama-Nemotron VL rerankers (``LlamaNemotronVLForSequenceClassification``,
e.g. llama-nemotron-rerank-vl-1b-v2): a SigLIP vision tower in front of the
bidirectional Llama (as LlamaBidirectional), pooled as the config's ``pooling`` says
(``avg``: the mean of every token, image tokens included), then ``score`` in fp32,
divided by the config's ``temperature``.

Each image is cut into tiles (pyengine.image_tiles); every tile of a batch runs through
the tower in one packed pass (one ``cu_seqlens`` span per tile). The tower's output at
``select_layer`` (-1: the last layer, then its post-norm) is regrouped 2 x 2 patches to a
token (``downsample_ratio`` 0.5: the four patches' features side by side, row by row),
projected by ``mlp1`` (LayerNorm, linear, GELU, linear), and replaces the embeddings of
the ``<IMG_CONTEXT>`` tokens. Batches with images run eagerly; text-only ones keep the
CUDA graphs.

Checkpoint names: ``model.vision_model[.vision_model].*``, ``model.language_model.*``,
``model.mlp1.*`` and ``score.weight`` (also without the leading ``model.``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..image_tiles import TileProcessor
from .decoder import ConfigView, DecoderForSequenceClassification, _p, linear_patches
from .qwen_vl import cpu_passes


def tile_attention(ops, q, k, v, cu, L, scale, dense):
    """Bidirectional attention within each tile: q, k, v (n * L, heads, D), every tile L
    rows. dense: as one (n, heads, L, L) problem through torch's fused SDPA (FlashAttention
    where the GPU has it), which the equal lengths allow without padding; else the ops'
    varlen_attention over cu (n + 1,) int32. On an H200, SigLIP's tiles (64 x 1024 patches,
    16 heads of 72) took 0.86 ms through SDPA and 1.65 ms through the Triton varlen kernel
    at its best tile (`python -m pyengine.bench kernels`, case vision-tiles). Returns
    (n * L, heads, D)."""
    if not dense:
        return ops.varlen_attention(q, k, v, cu, L, causal=False, scale=scale)
    n, H, D = q.shape[0] // L, q.shape[1], q.shape[2]
    o = F.scaled_dot_product_attention(*(t.reshape(n, L, H, D).transpose(1, 2) for t in (q, k, v)), scale=scale)
    return o.transpose(1, 2).reshape(n * L, H, D)


_ACTS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
         "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}
# What the reranker's own config says of the classifier, over its llm_config.
_OUTER = ("num_labels", "id2label", "label2id", "problem_type", "pooling", "temperature", "pad_token_id")


class SiglipTower(nn.Module):
    """tiles (N, 3, S, S) -> (N * (S / patch / k)**2, H_llm): SigLIP's ViT (pre-norm
    layers, learned positions, GELU-tanh MLP), then the k x k regrouping and mlp1."""

    def __init__(self, vc, select_layer, downsample_ratio, out_width, dtype, device, ops):
        super().__init__()
        self.ops = ops
        E, nh, L = vc.hidden_size, vc.num_attention_heads, vc.num_hidden_layers
        if E % nh:
            raise ValueError(f"vision tower: hidden_size={E} is not a multiple of num_attention_heads={nh}")
        if vc.hidden_act not in _ACTS:
            raise ValueError(f"vision tower: hidden_act={vc.hidden_act!r} is not supported; "
                             f"supported: {sorted(_ACTS)}")
        self.act = _ACTS[vc.hidden_act]
        self.E, self.nh, self.hd, self.patch = E, nh, E // nh, vc.patch_size
        self.side = vc.image_size // vc.patch_size
        self.k = round(1 / float(downsample_ratio))
        if self.k < 1 or abs(self.k * float(downsample_ratio) - 1) > 1e-6 or self.side % self.k:
            raise ValueError(f"vision tower: downsample_ratio={downsample_ratio} must be 1/k with k dividing the "
                             f"{self.side} patches a side")
        if not -(L + 1) <= select_layer <= L:
            raise ValueError(f"vision tower: select_layer={select_layer} is outside [-{L + 1}, {L}]")
        # hidden_states[select_layer] counts the embeddings as entry 0; -1 is the last
        # layer's output after the post-norm (transformers' last_hidden_state).
        self.depth = select_layer % (L + 1)
        self.post = select_layer == -1
        self.eps = vc.layer_norm_eps
        kw = dict(dtype=dtype, device=device)
        self.patch_w, self.patch_b = _p(E, vc.num_channels * self.patch ** 2, **kw), _p(E, **kw)
        self.pos = _p(self.side ** 2, E, **kw)
        I = vc.intermediate_size
        self.blocks = nn.ModuleList()
        for _ in range(self.depth):
            b = nn.Module()
            b.ln1_w, b.ln1_b, b.ln2_w, b.ln2_b = _p(E, **kw), _p(E, **kw), _p(E, **kw), _p(E, **kw)
            b.qkv_w, b.qkv_b = _p(3 * E, E, **kw), _p(3 * E, **kw)  # [q | k | v]
            b.o_w, b.o_b = _p(E, E, **kw), _p(E, **kw)
            b.fc1_w, b.fc1_b, b.fc2_w, b.fc2_b = _p(I, E, **kw), _p(I, **kw), _p(E, I, **kw), _p(E, **kw)
            self.blocks.append(b)
        self.post_w, self.post_b = (_p(E, **kw), _p(E, **kw)) if self.post else (None, None)
        M = E * self.k ** 2
        self.mlp_ln_w, self.mlp_ln_b = _p(M, **kw), _p(M, **kw)
        self.mlp_w1, self.mlp_b1 = _p(out_width, M, **kw), _p(out_width, **kw)
        self.mlp_w2, self.mlp_b2 = _p(out_width, out_width, **kw), _p(out_width, **kw)

    @property
    def tokens_per_tile(self):
        return (self.side // self.k) ** 2

    def targets(self, rest):
        """Checkpoint name under the tower (``embeddings.*``, ``encoder.*``,
        ``post_layernorm.*``) or ``mlp1.*`` -> [(param, rows)]."""
        top = {"embeddings.patch_embedding.weight": "patch_w", "embeddings.patch_embedding.bias": "patch_b",
               "embeddings.position_embedding.weight": "pos", "post_layernorm.weight": "post_w",
               "post_layernorm.bias": "post_b", "mlp1.0.weight": "mlp_ln_w", "mlp1.0.bias": "mlp_ln_b",
               "mlp1.1.weight": "mlp_w1", "mlp1.1.bias": "mlp_b1", "mlp1.3.weight": "mlp_w2", "mlp1.3.bias": "mlp_b2"}
        if rest in top:
            return [] if top[rest].startswith("post") and not self.post else [(top[rest], None)]
        parts = rest.split(".")
        if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
            return []
        i, key = int(parts[2]), ".".join(parts[3:])
        if i >= self.depth:  # layers past select_layer never run
            return []
        E = self.E
        sub = {"layer_norm1.weight": ("ln1_w", None), "layer_norm1.bias": ("ln1_b", None),
               "layer_norm2.weight": ("ln2_w", None), "layer_norm2.bias": ("ln2_b", None),
               "self_attn.out_proj.weight": ("o_w", None), "self_attn.out_proj.bias": ("o_b", None),
               "mlp.fc1.weight": ("fc1_w", None), "mlp.fc1.bias": ("fc1_b", None),
               "mlp.fc2.weight": ("fc2_w", None), "mlp.fc2.bias": ("fc2_b", None)}
        for j, n in enumerate("qkv"):
            sub[f"self_attn.{n}_proj.weight"] = ("qkv_w", slice(j * E, (j + 1) * E))
            sub[f"self_attn.{n}_proj.bias"] = ("qkv_b", slice(j * E, (j + 1) * E))
        return [(f"blocks.{i}.{sub[key][0]}", sub[key][1])] if key in sub else []

    def forward(self, tiles):
        """tiles: (N, 3, S, S) normalised pixels (pyengine.image_tiles). On the CPU in passes
        of at most CPU_PASS patches (pyengine.models.qwen_vl.cpu_passes)."""
        passes = cpu_passes(tiles, [self.side ** 2] * tiles.shape[0])
        if passes is None:
            return self._forward(tiles)
        return torch.cat([self._forward(tiles[i:j]) for i, j, _, _ in passes])

    def _forward(self, tiles):
        ops, E, nh, hd, p, g, k = self.ops, self.E, self.nh, self.hd, self.patch, self.side, self.k
        n = tiles.shape[0]
        # The patch convolution (stride = kernel) as a linear map of each (C, p, p) patch.
        x = tiles.to(self.patch_w.dtype).view(n, -1, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, -1)
        x = (F.linear(x, self.patch_w, self.patch_b).view(n, g * g, E) + self.pos).view(n * g * g, E)
        cu = torch.arange(0, (n + 1) * g * g, g * g, dtype=torch.int32, device=x.device)
        res = None
        for i, b in enumerate(self.blocks):
            h, res = ops.add_layer_norm(x, res, b.ln1_w, b.ln1_b, self.eps)
            q, kk, v = F.linear(h, b.qkv_w, b.qkv_b).view(-1, 3, nh, hd).unbind(1)
            a = tile_attention(ops, q, kk, v, cu, g * g, hd ** -0.5, dense=x.is_cuda)
            h, res = ops.add_layer_norm(F.linear(a.reshape(-1, E), b.o_w, b.o_b), res, b.ln2_w, b.ln2_b, self.eps)
            x = F.linear(self.act(F.linear(h, b.fc1_w, b.fc1_b)), b.fc2_w, b.fc2_b)
        if res is not None:
            x = x + res
        if self.post:
            x = ops.add_layer_norm(x, None, self.post_w, self.post_b, self.eps)[0]
        # k x k neighbouring patches -> one token, their features side by side (row-major).
        x = x.view(n, g // k, k, g // k, k, E).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k * E)
        x = ops.add_layer_norm(x, None, self.mlp_ln_w, self.mlp_ln_b, 1e-5)[0]
        return F.linear(F.gelu(F.linear(x, self.mlp_w1, self.mlp_b1)), self.mlp_w2, self.mlp_b2)


class LlamaNemotronVLForSequenceClassification(DecoderForSequenceClassification):
    """forward(batch) -> (B, num_labels) fp32; batch.mm carries the batch's image tiles.

    LoRA adapters apply to the language model's layers and the head; an adapter that names
    a vision-tower weight is refused when loaded."""

    image_processor = TileProcessor
    # The rerankers' prompt, "question:{query} \n \n passage:{document}", with the pair's
    # images in front (vLLM's examples/pooling/score/template/nemotron-vl-rerank.jinja
    # moves one document image there; this moves every image of the pair).
    score_template = ("{{ '<image> ' * (query ~ document).count('<image>') }}"
                      "question:{{ query | replace('<image>', '') }} \n \n passage:{{ document | replace('<image>', '') }}")

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        llm, vc = getattr(config, "llm_config", None), getattr(config, "vision_config", None)
        if llm is None or vc is None or isinstance(llm, dict) or isinstance(vc, dict):
            raise ValueError(f"{arch}: config.json needs an llm_config and a vision_config, each with a model_type")
        if getattr(vc, "model_type", None) != "siglip_vision_model":
            raise ValueError(f"{arch}: vision model {getattr(vc, 'model_type', None)!r} is not supported (only "
                             "SigLIP, siglip_vision_model)")
        outer = {a: getattr(config, a) for a in _OUTER if getattr(config, a, None) is not None}
        # The reranker config's own defaults; its llm_config's pooling and temperature
        # are not the classifier's.
        outer.setdefault("pooling", "last")
        outer.setdefault("temperature", 1.0)
        super().__init__(ConfigView(llm, **outer), arch, dtype, device, ops, pooling)
        size = int(getattr(config, "force_image_size", None) or vc.image_size)
        if size != vc.image_size:
            raise ValueError(f"{arch}: force_image_size={size} differs from the vision tower's image_size="
                             f"{vc.image_size}; its learned positions would need resampling")
        self.vision = SiglipTower(vc, int(getattr(config, "select_layer", -1)),
                                  getattr(config, "downsample_ratio", 0.5), self.H, dtype, device, ops)
        self.image_token_id = int(getattr(config, "img_context_token_id", 128258))
        if self.image_token_id >= self.vocab_size:
            raise ValueError(f"{arch}: img_context_token_id={self.image_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")

    def _embed(self, batch):
        x = super()._embed(batch)
        if batch.mm is not None and batch.mm.grids:
            feats = self.vision(batch.mm.pixel_values)
            x[batch.input_ids == self.image_token_id] = feats.to(x.dtype)
        return x

    def param_targets(self, name):
        name = name[len("model."):] if name.startswith("model.") else name
        if name.startswith("mlp1."):
            return [("vision." + p, rows, None) for p, rows in self.vision.targets(name)]
        for pre in ("vision_model.vision_model.", "vision_model."):  # SigLIP's model, or its transformer
            if name.startswith(pre):
                return [("vision." + p, rows, None) for p, rows in self.vision.targets(name[len(pre):])]
        if name.startswith("language_model."):
            return super().param_targets("model." + name[len("language_model."):])
        return super().param_targets(name)

    def load_weights(self, weights):
        super().load_weights(linear_patches(weights, "patch_embedding.weight", self.vision.E))

    def _expected(self, params):
        out = []
        for n in super()._expected(params):
            if n.startswith("vision.blocks.") and n.rsplit(".", 1)[-1] in ("qkv_w", "qkv_b"):
                E = self.vision.E
                out += [f"{n}[{slice(j * E, (j + 1) * E)}]" for j in range(3)]
            else:
                out.append(n)
        return out
