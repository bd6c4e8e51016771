"""Gemma 2 and Gemma 3 (text) as last-token classifiers: ``Gemma2ForSequenceClassification``,
``Gemma3TextForSequenceClassification``, ``Gemma3ForSequenceClassification``, and their
causal LMs converted (the language model only: images are refused, as for any text model).

Gemma's decoder (embeddings scaled by sqrt(hidden), (1 + w) RMSNorms, GELU-tanh gate)
with "sandwich" norms (the attention and MLP outputs are normed before they join the
residual stream), queries scaled by ``query_pre_attn_scalar ** -0.5``, and sliding-window
layers between global ones. Gemma 2 soft-caps the attention scores
(``attn_logit_softcapping``: c * tanh(s / c)); Gemma 3 norms q and k per head instead (its
config's ``attn_logit_softcapping`` is ignored, as transformers ignores it) and
gives each layer type its own rotary base (``rope_parameters`` per layer type, or
``rope_local_base_freq`` in older configs). Bidirectional attention (EmbeddingGemma) is
refused, and so is a yes/no head read from an LM whose logits are soft-capped.
"""
from __future__ import annotations

from . import rope
from .decoder import ConfigView, DecoderForSequenceClassification, _p, language_config

# Checkpoint norm names (below "model.layers.N.") that differ from the Llama layout's.
_SANDWICH = {"post_attention_layernorm.weight": "post_attn_w", "pre_feedforward_layernorm.weight": "ln2_w",
             "post_feedforward_layernorm.weight": "post_ff_w"}


class Gemma3ForSequenceClassification(DecoderForSequenceClassification):
    """forward(batch) -> (B, num_labels) fp32 logits of the last tokens."""

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        text = language_config(config)
        if getattr(text, "classifier_from_token", None) is not None and \
                getattr(text, "final_logit_softcapping", None) is not None:
            raise ValueError(f"{arch}: classifier_from_token with final_logit_softcapping="
                             f"{text.final_logit_softcapping}: the capped LM logits are not a linear head")
        full = rope.layer_type_parameters(text, "full_attention", "rope_theta", 1_000_000.0)
        local = rope.layer_type_parameters(text, "sliding_attention", "rope_local_base_freq", 10_000.0)
        super().__init__(ConfigView(text, rope_parameters=full, rope_scaling=None), arch, dtype, device, ops,
                         pooling)
        self.config = text
        kw = dict(dtype=dtype, device=device)
        for layer in self.layers:
            layer.post_attn_w, layer.post_ff_w = _p(self.H, **kw), _p(self.H, **kw)
        self.scales = [float(getattr(text, "query_pre_attn_scalar", self.hd)) ** -0.5] * self.num_layers
        # Gemma 3's config keeps the field, but transformers' Gemma 3 attention never applies it.
        softcap = getattr(text, "attn_logit_softcapping", None) if arch.startswith("Gemma2") else None
        if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
            raise ValueError(f"{arch}: attn_logit_softcapping must be a positive number, got {softcap!r}")
        self.softcap = float(softcap) if softcap is not None else None
        table = rope.cos_sin_table(ConfigView(text, rope_parameters=local, rope_scaling=None), self.hd,
                                   self.max_model_len, device)
        self.register_buffer("cos_sin_local", table, persistent=False)

    def _rope(self, batch, i):
        return batch.positions, (self.cos_sin if self.windows[i] is None else self.cos_sin_local)

    def _sandwich(self, x, w):
        return self.ops.add_rms_norm(x, None, w, self.eps, self.fam.norm_offset)[0]

    def _attn_out(self, i, layer, o):
        return self._sandwich(o, layer.post_attn_w)

    def _layer_out(self, i, m, batch):
        return self._sandwich(m, self.layers[i].post_ff_w)

    @staticmethod
    def _text_name(name):
        """The multimodal wrapper's language-model names as the text model's: the hub's
        language_model.model.* / language_model.lm_head.*, transformers' model.language_model.*."""
        for wrapped, plain in (("language_model.model.", "model."), ("model.language_model.", "model."),
                               ("language_model.lm_head.", "lm_head.")):
            if name.startswith(wrapped):
                return plain + name[len(wrapped):]
        return name

    def load_weights(self, weights):
        super().load_weights((self._text_name(n), t) for n, t in weights)

    def param_targets(self, name):
        name = self._text_name(name)
        parts = name.split(".", 3)
        if parts[:2] == ["model", "layers"] and len(parts) == 4 and parts[3] in _SANDWICH:
            return [(f"layers.{parts[2]}.{_SANDWICH[parts[3]]}", None, None)]
        return super().param_targets(name)
