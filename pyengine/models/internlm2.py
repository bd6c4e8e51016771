"""InternLM2 (``InternLM2ForRewardModel``: internlm2-1_8b/7b/20b-reward; and
``InternLM2ForCausalLM`` converted) on the Llama decoder.

The checkpoint is remote code, read here without running it: its config is Llama's with
the same fields, its names differ (tok_embeddings, attention.wqkv / wo, feed_forward.w1 /
w3 / w2, attention_norm / ffn_norm, output for the LM head), its wqkv (and its bias,
with wo's, where ``bias`` is set) packs q, k and v per kv head: for each kv head, its
group of query heads, then its key, then its value.
The reward model's head is ``v_head`` (hidden -> 1, no bias) read at the last token, as
its own scoring code reads it at the last token of the conversation; that code ends the
conversation with the reward token (id 92527), which a prompt must carry too.
"""
from __future__ import annotations

from .decoder import DecoderForSequenceClassification

_NAMES = {"attention.wo.weight": "self_attn.o_proj.weight", "attention.wo.bias": "self_attn.o_proj.bias",
          "feed_forward.w1.weight": "mlp.gate_proj.weight",
          "feed_forward.w3.weight": "mlp.up_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
          "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}


class InternLM2ForSequenceClassification(DecoderForSequenceClassification):
    """forward(batch) -> (B, num_labels) fp32: the reward (or the converted head) of each
    sequence's last token."""

    lm_head_names = ("output.weight",)

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        # wqkv and wo carry biases where the config's "bias" says (InternLM2's default: true)
        config.attention_bias = bool(getattr(config, "bias", True))
        super().__init__(config, arch, dtype, device, ops, pooling)

    def _targets(self, rest):
        top = {"tok_embeddings.weight": "embed_tokens.weight"}
        parts = rest.split(".")
        if rest in top:
            return super()._targets(top[rest])
        if parts[0] != "layers" or len(parts) < 3:
            return super()._targets(rest)
        key = ".".join(parts[2:])
        if key in ("attention.wqkv.weight", "attention.wqkv.bias"):
            nh, nkv, hd = self.nh, self.nkv, self.hd
            g = nh // nkv

            def part(t, which):
                # (kv heads, group + 2, hd, ...): per kv head its g query heads, its key, its value
                t = t.view(nkv, g + 2, hd, *t.shape[1:])
                sel = {"q": t[:, :g], "k": t[:, g], "v": t[:, g + 1]}[which]
                return sel.reshape(-1, *t.shape[3:])
            rows = {"q": slice(0, nh * hd), "k": slice(nh * hd, (nh + nkv) * hd),
                    "v": slice((nh + nkv) * hd, (nh + 2 * nkv) * hd)}
            param = "qkv_w" if key.endswith("weight") else "qkv_b"
            return [(f"layers.{parts[1]}.{param}", rows[w], lambda t, w=w: part(t, w)) for w in "qkv"]
        if key in _NAMES:
            return super()._targets(f"layers.{parts[1]}.{_NAMES[key]}")
        return []

    def param_targets(self, name):
        if name == "v_head.weight":
            return [] if self.token_head else [("score_w", None, None)]
        return super().param_targets(name)
