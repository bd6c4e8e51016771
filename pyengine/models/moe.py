"""Mixture-of-experts decoders as classifiers: Qwen3-MoE, Qwen2-MoE and Mixtral (and
Qwen3-VL-MoE's language model, pyengine.models.qwen_vl), the
decoder of :mod:`pyengine.models.decoder` with sparse feed-forward layers.

A sparse layer routes each token to ``num_experts_per_tok`` of its experts: a softmax
over the router's logits in fp32, the top k kept (renormalised to sum to 1 for Mixtral,
Qwen3-VL-MoE and where ``norm_topk_prob`` is set), each expert a SwiGLU MLP; Qwen2-MoE adds a shared
expert scaled by sigmoid(x w_gate). Which layers are sparse: every ``decoder_sparse_step``-th
one not listed in ``mlp_only_layers`` (Qwen), every one (Mixtral); the others keep the
dense MLP. The experts run in ``ops.expert_matmul`` (one Triton launch for all experts,
no host sync, so CUDA graphs hold it; the torch reference, a matmul per expert, reads
the counts on the host), and each token's k outputs are added in a fixed order, so a
result does not depend on the batch. LoRA adapters apply to the attention weights and
the head.

Checkpoint names: ``mlp.experts.{e}.{gate,up,down}_proj`` (Qwen), ``block_sparse_moe.experts.{e}.w1/w3/w2``
(Mixtral), or the stacked ``experts.gate_up_proj`` (E, 2I, H) / ``experts.down_proj`` (E, H, I)
(or each expert transposed, as Qwen3-VL-MoE's checkpoints store them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoder import DecoderForSequenceClassification, _cfg, _p

# Per-expert checkpoint names -> which part of the expert: [gate | up] halves, or down.
_EXPERT = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def _expert(t, e, rows):
    """Expert e of a stacked (E, rows, cols) weight, or of one stored (E, cols, rows)."""
    w = t[e]
    return w.t() if w.shape[0] != rows and w.shape[1] == rows else w


class MoeDecoderForSequenceClassification(DecoderForSequenceClassification):
    """forward(batch) -> (B, num_labels) fp32; sparse layers hold router_w (E, H),
    experts_up (E, 2I, H) packed [gate | up], experts_down (E, H, I), and for Qwen2-MoE
    shared_up (2S, H), shared_down (H, S), shared_gate (1, H)."""

    # Graphs need expert_matmul off its torch reference, which reads counts on the host.
    graph_ops = DecoderForSequenceClassification.graph_ops + ("expert_matmul",)
    lora_weights = ("qkv_w", "o_w")

    def _sparse(self, i):
        c = self.config
        if _cfg(c, "num_experts", "num_local_experts", default=0) < 1:
            return False
        return i not in (getattr(c, "mlp_only_layers", None) or []) and \
            (i + 1) % (getattr(c, "decoder_sparse_step", 1) or 1) == 0

    def _build_mlp(self, i, m, bias, kw):
        if not self._sparse(i):
            return super()._build_mlp(i, m, bias, kw)
        c, H = self.config, self.H
        E = _cfg(c, "num_experts", "num_local_experts")
        k = c.num_experts_per_tok
        if not 1 <= k <= E:
            raise ValueError(f"{self.arch}: num_experts_per_tok={k} must be between 1 and the {E} experts")
        self.top_k, self.Ie = k, _cfg(c, "moe_intermediate_size", default=self.I)
        # Mixtral always renormalises the kept probabilities and weighs in fp32; Qwen
        # renormalises where norm_topk_prob says (Qwen3-VL-MoE's config has none: always)
        # and rounds the weights to the model dtype.
        self.mixtral = self.arch.startswith("Mixtral")
        self.norm_topk = self.mixtral or bool(getattr(c, "norm_topk_prob", True))
        m.router_w = _p(E, H, **kw)
        m.experts_up, m.experts_down = _p(E, 2 * self.Ie, H, **kw), _p(E, H, self.Ie, **kw)
        S = getattr(c, "shared_expert_intermediate_size", 0) or 0
        if S:
            m.shared_up, m.shared_down, m.shared_gate = _p(2 * S, H, **kw), _p(H, S, **kw), _p(1, H, **kw)

    def _mlp(self, layer, h, d):
        if not hasattr(layer, "router_w"):
            return super()._mlp(layer, h, d)
        T, k = h.shape[0], self.top_k
        probs = torch.softmax(F.linear(h, layer.router_w).float(), dim=-1)
        weights, experts = torch.topk(probs, k, dim=-1)  # (T, k)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        if not self.mixtral:
            weights = weights.to(h.dtype)
        # Each (token, slot) pair through its expert; the k weighed outputs of a token
        # added in slot order.
        u = self.ops.gated_act(self.ops.expert_matmul(h, layer.experts_up, experts), self.act)
        y = self.ops.expert_matmul(u, layer.experts_down, experts, weights, per_pair=True)
        out = y.view(T, k, -1).sum(1)
        if hasattr(layer, "shared_up"):
            s = F.linear(self.ops.gated_act(F.linear(h, layer.shared_up), self.act), layer.shared_down)
            out = out + torch.sigmoid(F.linear(h, layer.shared_gate)) * s
        return out

    # ------------------------------------------------------------------ weights
    def _targets(self, rest):
        parts = rest.split(".")
        if len(parts) < 4 or parts[0] != "layers" or parts[2] not in ("mlp", "block_sparse_moe"):
            return super()._targets(rest)
        i, key = int(parts[1]), ".".join(parts[3:])
        layer, p = self.layers[i], f"layers.{i}."
        if not hasattr(layer, "router_w"):
            return super()._targets(rest) if parts[2] == "mlp" else []
        Ie, S = self.Ie, getattr(layer, "shared_down", None)
        rows = {"gate": slice(0, Ie), "up": slice(Ie, 2 * Ie)}
        E = layer.router_w.shape[0]
        if key == "gate.weight":
            return [(p + "router_w", None, None)]
        # The stacked layout is put expert by expert, so either layout marks the same slots.
        # Qwen3-VL-MoE's own checkpoints store each expert transposed, (H, 2I) and (I, H).
        if key == "experts.gate_up_proj":
            return [(p + "experts_up", (e, r), lambda t, e=e, r=r: _expert(t, e, 2 * Ie)[r])
                    for e in range(E) for r in rows.values()]
        if key == "experts.down_proj":
            return [(p + "experts_down", e, lambda t, e=e: _expert(t, e, self.H)) for e in range(E)]
        if parts[3] == "experts" and len(parts) == 7 and parts[5] in _EXPERT and parts[6] == "weight":
            e, kind = int(parts[4]), _EXPERT[parts[5]]
            if kind == "down":
                return [(p + "experts_down", e, None)]
            return [(p + "experts_up", (e, rows[kind]), None)]
        if S is not None:
            n = S.shape[1]
            shared = {"shared_expert.gate_proj.weight": ("shared_up", slice(0, n)),
                      "shared_expert.up_proj.weight": ("shared_up", slice(n, 2 * n)),
                      "shared_expert.down_proj.weight": ("shared_down", None),
                      "shared_expert_gate.weight": ("shared_gate", None)}
            if key in shared:
                return [(p + shared[key][0], shared[key][1], None)]
        return []

    def _expected(self, params):
        """Every parameter; the experts' per expert (and [gate | up] per half), the shared
        expert's packed rows per half."""
        out = []
        for n in super()._expected(params):
            leaf = n.rsplit(".", 1)[-1]
            if leaf not in ("experts_up", "experts_down", "shared_up"):
                out.append(n)
                continue
            t = params[n]
            if leaf == "experts_down":
                out += [f"{n}[{e}]" for e in range(t.shape[0])]
            elif leaf == "experts_up":
                half = t.shape[1] // 2
                out += [f"{n}[{(e, r)}]" for e in range(t.shape[0]) for r in (slice(0, half), slice(half, 2 * half))]
            else:
                half = t.shape[0] // 2
                out += [f"{n}[{r}]" for r in (slice(0, half), slice(half, 2 * half))]
        return out
