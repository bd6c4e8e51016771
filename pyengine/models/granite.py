"""IBM Granite (``GraniteForCausalLM``, e.g. the Granite Guardian risk classifiers read as
yes/no heads) converted into a last-token classifier.

Llama's decoder with four multipliers from the config: the embeddings times
``embedding_multiplier``, the attention scores scaled by ``attention_multiplier`` (in
place of 1/sqrt(head_dim)), each attention and MLP output times ``residual_multiplier``
before it joins the residual stream, and the LM logits divided by ``logits_scaling`` (so a
head built from the LM rows, ``classifier_from_token``, is divided too).
"""
from __future__ import annotations

from .decoder import DecoderForSequenceClassification


class GraniteForSequenceClassification(DecoderForSequenceClassification):
    """forward(batch) -> (B, num_labels) fp32 logits of the last tokens."""

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        super().__init__(config, arch, dtype, device, ops, pooling)
        self.scales = [float(getattr(config, "attention_multiplier", self.hd ** -0.5))] * self.num_layers
        self.embedding_multiplier = float(getattr(config, "embedding_multiplier", 1.0))
        self.residual_multiplier = float(getattr(config, "residual_multiplier", 1.0))
        self.logits_scaling = float(getattr(config, "logits_scaling", 1.0))

    def _embed(self, batch):
        return super()._embed(batch) * self.embedding_multiplier

    def _attn_out(self, i, layer, o):
        return o * self.residual_multiplier

    def _layer_out(self, i, m, batch):
        return m * self.residual_multiplier

    def _load_token_head(self, sink, lm_rows, emb_rows):
        super()._load_token_head(sink, lm_rows, emb_rows)
        # The LM's logits are divided by logits_scaling; a head made of its rows is too.
        self.score_w.data.div_(self.logits_scaling)
