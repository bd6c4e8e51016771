"""Model registry keyed by the config's ``architectures``."""
from __future__ import annotations

import importlib

# architecture -> "module:class". Each class takes (config, arch, dtype, device, ops,
# pooling) and has forward(batch) -> (B, num_labels) fp32 logits, load_weights(iter),
# num_labels, vocab_size, max_model_len and default_pooling.
_REGISTRY = {
    "BertForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "ErnieForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "RobertaForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "XLMRobertaForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "CamembertForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
}


def supported_architectures():
    return sorted(_REGISTRY)


def resolve_architecture(config, convert="auto"):
    """The registered architecture this config runs as, or a clear error."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise ValueError("config.json names no 'architectures'; set one with "
                         "hf_overrides={'architectures': [...]}")
    for arch in archs:
        if arch in _REGISTRY:
            return arch
    raise ValueError(f"unknown architecture {archs}; supported: {', '.join(supported_architectures())}")


def model_class(arch):
    mod, cls = _REGISTRY[arch].split(":")
    return getattr(importlib.import_module(mod), cls)
