"""From pooled fp32 logits to outputs: the activation and its bias and scale.

Gathering the pooled rows and the fp32 head live in each model's forward (so a model
can skip work for tokens that are never pooled); this module owns the semantics that
are the same for every model.
"""
from __future__ import annotations

import torch

# sentence-transformers' CrossEncoder stores its activation as a class path.
_ST_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.Identity": "identity",
    "torch.nn.modules.activation.Softmax": "softmax",
    "torch.nn.Softmax": "softmax",
}


def classify_activation(config) -> str:
    """The activation of /classify, from problem_type and num_labels (as transformers'
    loss choice): regression -> identity; multi-label -> sigmoid; single-label or
    unset -> sigmoid when num_labels < 2, else softmax."""
    problem = getattr(config, "problem_type", None)
    if problem == "regression":
        return "identity"
    if problem == "multi_label_classification":
        return "sigmoid"
    if problem not in (None, "single_label_classification"):
        raise ValueError(f"unknown problem_type {problem!r}")
    return "sigmoid" if config.num_labels < 2 else "softmax"


def score_activation(config) -> str:
    """The activation of score(): the model's sentence-transformers activation_fn
    where given, else sigmoid."""
    st = getattr(config, "sentence_transformers", None) or {}
    fn = st.get("activation_fn") if isinstance(st, dict) else None
    fn = fn or getattr(config, "sbert_ce_default_activation_function", None)
    if fn is None:
        return "sigmoid"
    if fn not in _ST_ACTIVATIONS:
        raise ValueError(f"unsupported sentence-transformers activation_fn {fn!r}; "
                         f"supported: {sorted(_ST_ACTIVATIONS)}")
    act = _ST_ACTIVATIONS[fn]
    # a softmax over a cross-encoder's one logit is 1.0 for every pair; vLLM reads the
    # Softmax class as its classify activation, which is a sigmoid below two labels
    return "sigmoid" if act == "softmax" and config.num_labels < 2 else act


class Pooler:
    """Applies act((logits - logit_bias) * logit_scale) per row, or returns raw logits
    for the rows whose request asked for use_activation=False."""

    def __init__(self, ops, pooler_config):
        self.ops = ops
        self.cfg = pooler_config

    def __call__(self, logits: torch.Tensor, kinds: list[str | None]) -> torch.Tensor:
        """logits: (B, L) fp32; kinds: per row an activation name, or None for raw
        logits. Returns (B, L) fp32."""
        out = logits.float()
        by_kind: dict[str, list[int]] = {}
        for i, k in enumerate(kinds):
            if k is not None:
                by_kind.setdefault(k, []).append(i)
        if len(by_kind) == 1 and len(next(iter(by_kind.values()))) == len(kinds):
            return self.ops.activation(out, next(iter(by_kind)), self.cfg.logit_bias, self.cfg.logit_scale)
        out = out.clone()
        for kind, rows in by_kind.items():
            idx = torch.tensor(rows, device=out.device)
            out[idx] = self.ops.activation(out[idx], kind, self.cfg.logit_bias, self.cfg.logit_scale)
        return out
