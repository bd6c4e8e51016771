"""Model registry keyed by the config's ``architectures``."""
from __future__ import annotations

import importlib

# architecture -> "module:class". Each class takes (config, arch, dtype, device, ops,
# pooling) and has forward(batch) -> (B, num_labels) fp32 logits, load_weights(iter),
# num_labels, vocab_size, max_model_len and default_pooling. Models that take LoRA
# adapters also list ``lora_weights`` and ``head_params``, map checkpoint names with
# ``param_targets(name)`` and take forward(batch, lora).
_REGISTRY = {
    "BertForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "ErnieForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "RobertaForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "XLMRobertaForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "CamembertForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "ElectraForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
    "DistilBertForSequenceClassification": "pyengine.models.bert:BertForSequenceClassification",
}
_DECODER = "pyengine.models.decoder:DecoderForSequenceClassification"
# Sequence classifiers with their own head (score.weight / classifier.*).
for _a in ("Qwen2", "Qwen3", "Llama", "Mistral", "Gemma", "GPT2", "LlamaBidirectional", "GteNew", "New", "Phi3"):
    _REGISTRY[f"{_a}ForSequenceClassification"] = _DECODER
# Causal LMs and bare backbones: classifiers only through conversion (convert="classify",
# automatic under "auto"), with a head from classifier_from_token or a score.weight.
_CONVERT_ONLY = {f"{a}{s}" for a in ("Qwen2", "Qwen3", "Llama", "Mistral", "Gemma", "Phi3")
                 for s in ("ForCausalLM", "Model")}
_CONVERT_ONLY |= {"GPT2LMHeadModel", "GPT2Model"}
for _a in _CONVERT_ONLY:
    _REGISTRY[_a] = _DECODER
_REGISTRY["JambaForSequenceClassification"] = "pyengine.models.jamba:JambaForSequenceClassification"
_REGISTRY["ModernBertForSequenceClassification"] = "pyengine.models.modernbert:ModernBertForSequenceClassification"
_REGISTRY["DebertaV2ForSequenceClassification"] = "pyengine.models.deberta:DebertaV2ForSequenceClassification"
# Vision-language: the Qwen2 decoder behind a vision tower; images through multi_modal_data.
_VL = "pyengine.models.qwen_vl:QwenVLForSequenceClassification"
for _a in ("Qwen2VL", "Qwen2_5_VL", "Qwen3VL"):
    _REGISTRY[f"{_a}ForSequenceClassification"] = _VL
    _REGISTRY[f"{_a}ForConditionalGeneration"] = _VL
    _CONVERT_ONLY.add(f"{_a}ForConditionalGeneration")
# Gemma 2 and Gemma 3's language models (Gemma 3's multimodal wrapper too, text prompts only).
_GEMMA3 = "pyengine.models.gemma3:Gemma3ForSequenceClassification"
for _a in ("Gemma3TextForSequenceClassification", "Gemma3ForSequenceClassification", "Gemma3ForCausalLM",
           "Gemma3ForConditionalGeneration", "Gemma2ForSequenceClassification", "Gemma2ForCausalLM"):
    _REGISTRY[_a] = _GEMMA3
_CONVERT_ONLY |= {"Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "Gemma2ForCausalLM"}
# Granite (Granite Guardian as a yes/no head): Llama with multipliers.
_GRANITE = "pyengine.models.granite:GraniteForSequenceClassification"
for _a in ("GraniteForCausalLM", "GraniteModel", "GraniteForSequenceClassification"):
    _REGISTRY[_a] = _GRANITE
_CONVERT_ONLY |= {"GraniteForCausalLM", "GraniteModel"}
# jina-reranker-m0's own name, and vLLM's for it.
_REGISTRY["JinaVLForRanking"] = _REGISTRY["JinaVLForSequenceClassification"] = "pyengine.models.qwen_vl:JinaVLForRanking"
# NVIDIA's Llama-Nemotron VL rerankers: SigLIP in front of the bidirectional Llama.
_REGISTRY["LlamaNemotronVLForSequenceClassification"] = \
    "pyengine.models.nemotron_vl:LlamaNemotronVLForSequenceClassification"
_REGISTRY["Qwen2ForRewardModel"] = "pyengine.models.decoder:Qwen2RewardModel"
# Mixture-of-experts decoders: the decoder with sparse feed-forward layers.
_MOE = "pyengine.models.moe:MoeDecoderForSequenceClassification"
for _a in ("Qwen3Moe", "Qwen2Moe", "Mixtral"):
    _REGISTRY[f"{_a}ForSequenceClassification"] = _MOE
    for _s in ("ForCausalLM", "Model"):
        _REGISTRY[_a + _s] = _MOE
        _CONVERT_ONLY.add(_a + _s)
_VL_MOE = "pyengine.models.qwen_vl:QwenVLMoeForSequenceClassification"
_REGISTRY["Qwen3VLMoeForSequenceClassification"] = _REGISTRY["Qwen3VLMoeForConditionalGeneration"] = _VL_MOE
_CONVERT_ONLY.add("Qwen3VLMoeForConditionalGeneration")
# InternLM2's reward models (remote code, read without it), and its causal LMs converted.
_INTERNLM2 = "pyengine.models.internlm2:InternLM2ForSequenceClassification"
_REGISTRY["InternLM2ForRewardModel"] = _REGISTRY["InternLM2ForCausalLM"] = _INTERNLM2
_CONVERT_ONLY.add("InternLM2ForCausalLM")
# The model classes that build a head from LM rows (classifier_from_token).
_TOKEN_HEADS = (_DECODER, _VL, _GEMMA3, _GRANITE, _MOE, _VL_MOE, _INTERNLM2)
# Architectures whose head has a fixed width whatever config.json says (as vLLM fixes them).
_NUM_LABELS = {"JinaVLForRanking": 1, "JinaVLForSequenceClassification": 1, "Qwen2ForRewardModel": 1,
               "InternLM2ForRewardModel": 1}


def supported_architectures():
    return sorted(_REGISTRY)


def resolve_architecture(config, convert="auto"):
    """The registered architecture this config runs as, or a clear error.

    convert: "auto" runs a classifier as itself and converts a causal LM or bare backbone
    (``*ForCausalLM`` / ``*Model``) into a last-token classifier; "classify" does the same
    and says so; "none" refuses conversion. Expands ``is_original_qwen3_reranker`` and
    validates ``classifier_from_token`` / ``method``, setting ``config.num_labels`` to the
    head's width (both changes are made on ``config``)."""
    from .convert import apply_shorthands, check_token_head

    apply_shorthands(config)
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise ValueError("config.json names no 'architectures'; set one with "
                         "hf_overrides={'architectures': [...]}")
    arch = next((a for a in archs if a in _REGISTRY), None)
    if arch is None:
        raise ValueError(f"unknown architecture {archs}; supported: {', '.join(supported_architectures())}")
    if arch in _CONVERT_ONLY and convert == "none":
        raise ValueError(f"{arch} has no classification head; pass convert='classify' (or 'auto') to classify "
                         "its last token")
    if check_token_head(config) and _REGISTRY[arch] not in _TOKEN_HEADS:
        raise ValueError(f"classifier_from_token is only supported for decoder models, not {arch}")
    if arch in _NUM_LABELS:
        config.num_labels = _NUM_LABELS[arch]
    return arch


def model_class(arch):
    mod, cls = _REGISTRY[arch].split(":")
    return getattr(importlib.import_module(mod), cls)
