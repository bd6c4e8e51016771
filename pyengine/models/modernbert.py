"""ModernBERT classifiers (``ModernBertForSequenceClassification``) over packed tokens.

A pre-norm bidirectional encoder on the decoder stack's ops: token embeddings through a
LayerNorm, then layers of rotary attention (fused Wqkv, no norm before the first layer's
attention) and a GeGLU MLP (``Wi`` holds [activated half | gate half]), LayerNorms without
biases unless ``norm_bias``. Every ``global_attn_every_n_layers``-th layer attends to the
whole sequence with ``global_rope_theta``; the others to ``local_attention // 2`` tokens on
each side with ``local_rope_theta`` (each layer type has its own rotary table). The final
norm runs per token, the sequence is pooled as ``classifier_pooling`` says (``cls``: the
first token, whose row alone runs the last layer's attention output and MLP; ``mean``),
and the head is dense -> ``classifier_activation`` -> LayerNorm -> classifier, in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import rope
from .decoder import ConfigView, DecoderForSequenceClassification, _p

_HEAD_ACTS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
              "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu,
              "tanh": torch.tanh}


def _rope_of(config, kind):
    """The flat rope settings of one layer type ("full_attention" / "sliding_attention")."""
    if kind == "full_attention":
        return rope.layer_type_parameters(config, kind, "global_rope_theta", 160000.0)
    return rope.layer_type_parameters(config, kind, "local_rope_theta", 10000.0)


class ModernBertForSequenceClassification(DecoderForSequenceClassification):
    """forward(batch) -> (B, num_labels) fp32 logits."""

    head_params = ("head_w", "head_b", "head_ln_w", "head_ln_b", "score_w", "score_b")

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        # The decoder's own rotary table is the full-attention layers'; the sliding ones'
        # is made below.
        flat = ConfigView(config, rope_parameters=_rope_of(config, "full_attention"),
                     pooling=getattr(config, "classifier_pooling", "cls"), norm_eps=getattr(config, "norm_eps", 1e-5))
        super().__init__(flat, arch, dtype, device, ops, pooling)
        self.config = config
        self.eps = float(flat.norm_eps)
        H, kw = self.H, dict(dtype=dtype, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        head_act = getattr(config, "classifier_activation", "gelu")
        if head_act not in _HEAD_ACTS:
            raise ValueError(f"{arch}: classifier_activation={head_act!r} is not supported; "
                             f"supported: {sorted(_HEAD_ACTS)}")
        self.head_act = _HEAD_ACTS[head_act]
        norm_bias = bool(getattr(config, "norm_bias", False))
        self.emb_ln_w, self.emb_ln_b = _p(H, **kw), (_p(H, **kw) if norm_bias else None)
        for i, layer in enumerate(self.layers):
            # Layer 0's attention reads the embedding norm's output directly.
            layer.ln1_w = None if i == 0 else layer.ln1_w
            if i == 0 or not norm_bias:
                layer.ln1_b = None
            if not norm_bias:
                layer.ln2_b = None
        if not norm_bias:
            self.norm_b = None
        self.head_w = _p(H, H, **f32)
        self.head_b = _p(H, **f32) if getattr(config, "classifier_bias", False) else None
        self.head_ln_w, self.head_ln_b = _p(H, **f32), (_p(H, **f32) if norm_bias else None)
        self.score_b = _p(self.num_labels, **f32)
        local = ConfigView(config, rope_parameters=_rope_of(config, "sliding_attention"))
        self.register_buffer("cos_sin_local", rope.cos_sin_table(local, self.hd, self.max_model_len, device),
                             persistent=False)

    def _pooling(self, config, pooling):
        if pooling is None and str(config.pooling).lower() not in ("cls", "mean"):
            raise ValueError(f"{self.arch}: classifier_pooling={config.pooling!r} is not supported "
                             "(cls or mean)")
        return super()._pooling(config, pooling or str(config.pooling).lower())

    def _window(self, config, i):
        types = getattr(config, "layer_types", None)
        if types is None:
            every = int(getattr(config, "global_attn_every_n_layers", 3))
            sliding = i % every != 0
        else:
            sliding = types[i] == "sliding_attention"
        # A query sees local_attention // 2 tokens on each side (and itself).
        half = int(getattr(config, "local_attention", 128)) // 2
        return (half, half) if sliding else None

    def _rope(self, batch, i):
        return batch.positions, (self.cos_sin if self.windows[i] is None else self.cos_sin_local)

    def _norm(self, x, residual, w, b):
        if w is None:  # layer 0 has no norm before its attention
            return x, x
        return super()._norm(x, residual, w, b)

    def _embed(self, batch):
        x = F.embedding(batch.input_ids, self.embed)
        return self.ops.add_layer_norm(x, None, self.emb_ln_w, self.emb_ln_b, self.eps)[0]

    def _head(self, pooled, p):
        h = F.linear(pooled, p.get("head_w", self.head_w), p.get("head_b", self.head_b))
        h = F.layer_norm(self.head_act(h), (self.H,), p.get("head_ln_w", self.head_ln_w),
                         p.get("head_ln_b", self.head_ln_b), self.eps)
        return F.linear(h, p.get("score_w", self.score_w), p.get("score_b", self.score_b))

    # ------------------------------------------------------------------ weights
    _TOP = {"model.embeddings.tok_embeddings.weight": "embed", "model.embeddings.norm.weight": "emb_ln_w",
            "model.embeddings.norm.bias": "emb_ln_b", "model.final_norm.weight": "norm_w",
            "model.final_norm.bias": "norm_b", "head.dense.weight": "head_w", "head.dense.bias": "head_b",
            "head.norm.weight": "head_ln_w", "head.norm.bias": "head_ln_b", "classifier.weight": "score_w",
            "classifier.bias": "score_b"}
    _LAYER = {"attn_norm.weight": "ln1_w", "attn_norm.bias": "ln1_b", "attn.Wqkv.weight": "qkv_w",
              "attn.Wqkv.bias": "qkv_b", "attn.Wo.weight": "o_w", "attn.Wo.bias": "o_b",
              "mlp_norm.weight": "ln2_w", "mlp_norm.bias": "ln2_b", "mlp.Wi.weight": "up_w", "mlp.Wi.bias": "up_b",
              "mlp.Wo.weight": "down_w", "mlp.Wo.bias": "down_b"}

    def param_targets(self, name):
        """Checkpoint name -> [(param, None, None)]; [] for names this model does not use
        (a checkpoint's bias where this config has none fails the loader's check)."""
        if name in self._TOP:
            return [(self._TOP[name], None, None)]
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and len(parts) > 3:
            key = ".".join(parts[3:])
            if key in self._LAYER:
                return [(f"layers.{parts[2]}.{self._LAYER[key]}", None, None)]
        return []

    def load_weights(self, weights):
        params = dict(self.named_parameters())

        def known(ws):
            for n, t in ws:
                for target, _, _ in self.param_targets(n):
                    if target not in params:
                        raise ValueError(f"{self.arch}: the checkpoint has {n}, which this config does not "
                                         "(norm_bias / attention_bias / mlp_bias / classifier_bias disagree)")
                yield n, t
        super().load_weights(known(weights))

    def _expected(self, params):
        return list(params)  # every weight is whole: Wqkv and Wi are packed as the checkpoint packs them
