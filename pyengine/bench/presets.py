"""Model presets: configs with random weights, saved once so every provider loads
the same checkpoint (nothing is downloaded).

Weights are redrawn so every linear layer keeps unit scale (std 1/sqrt(fan_in),
embeddings std 1): transformers' std-0.02 init makes every prompt's probabilities
nearly equal, which would hide any difference between providers. Speed does not
depend on the values.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile

import torch

_BERT = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
             architectures=["BertForSequenceClassification"])
_QWEN = dict(vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
             pad_token_id=151643, bos_token_id=151643, eos_token_id=151645)

# name -> (transformers config class name, config kwargs)
PRESETS = {
    "minilm-l6": ("BertConfig", dict(_BERT, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, num_labels=1)),
    "bert-base": ("BertConfig", dict(_BERT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, num_labels=2)),
    "qwen3-0.6b": ("Qwen3Config", dict(_QWEN, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                                       num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                                       max_position_embeddings=40960, num_labels=1,
                                       architectures=["Qwen3ForSequenceClassification"])),
    "qwen2-1.5b": ("Qwen2Config", dict(_QWEN, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                       num_key_value_heads=2, intermediate_size=8960,
                                       max_position_embeddings=32768, num_labels=2,
                                       architectures=["Qwen2ForSequenceClassification"])),
    # gte-reranker-modernbert-base's shape: local windows of 128 tokens, a global layer every third
    "modernbert-base": ("ModernBertConfig", dict(vocab_size=50368, hidden_size=768, intermediate_size=1152,
                                                 num_hidden_layers=22, num_attention_heads=12,
                                                 max_position_embeddings=8192, num_labels=1, pad_token_id=50283,
                                                 bos_token_id=50281, eos_token_id=50282, cls_token_id=50281,
                                                 sep_token_id=50282,
                                                 architectures=["ModernBertForSequenceClassification"])),
    # mxbai-rerank-base-v1's shape (DeBERTa-v3-base): relative attention in 256 log buckets
    "deberta-v3-base": ("DebertaV2Config", dict(vocab_size=128100, hidden_size=768, num_hidden_layers=12,
                                                num_attention_heads=12, intermediate_size=3072,
                                                max_position_embeddings=512, relative_attention=True,
                                                position_buckets=256, pos_att_type=["p2c", "c2p"], share_att_key=True,
                                                norm_rel_ebd="layer_norm", position_biased_input=False,
                                                type_vocab_size=0, pad_token_id=0, num_labels=1,
                                                architectures=["DebertaV2ForSequenceClassification"])),
    # Qwen3-30B-A3B's layer (128 experts of 768, top 8, renormalised); 48 layers in the
    # checkpoint, fewer with --layers (random weights of all 48 take 61 GB in bf16)
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(_QWEN, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                             num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                                             moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                             norm_topk_prob=True, tie_word_embeddings=False,
                                             max_position_embeddings=40960, num_labels=1,
                                             architectures=["Qwen3MoeForSequenceClassification"])),
    "tiny": ("BertConfig", dict(_BERT, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=1024, num_labels=2)),
}
GPU_PRESETS = ("minilm-l6", "bert-base", "qwen3-0.6b", "qwen2-1.5b")
CPU_PRESETS = ("tiny",)

# Encoders whose prompts are wrapped in begin/end ids, and which attend both ways.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "ernie", "camembert", "electra", "distilbert", "modernbert",
                 "deberta-v2"}
_HEAD_NAMES = ("classifier", "score", "pooler", "head")


def preset_config(name: str, layers: int | None = None):
    """The transformers config of preset ``name``, with num_hidden_layers=layers if given."""
    import transformers

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    cls_name, kw = PRESETS[name]
    kw = dict(kw)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return getattr(transformers, cls_name)(**kw)


def architecture_missing(config) -> str | None:
    """Why pyengine cannot run ``config`` (its architecture is not registered), or None."""
    from ..models import resolve_architecture

    try:
        resolve_architecture(config)
    except ValueError as e:
        return str(e)
    return None


def _randomize(model, seed):
    dev = next(model.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0.0, mod.weight.shape[1] ** -0.5, generator=g)
            elif isinstance(mod, torch.nn.Embedding):
                mod.weight.normal_(0.0, 1.0, generator=g)


@contextlib.contextmanager
def building(path: str, marker: str):
    """Build a cache entry atomically: yields a new temporary directory beside ``path`` to
    write it in, renamed to ``path`` when the block ends without error and removed in any
    case, so that a run killed part-way leaves nothing that passes a check for ``path``'s
    ``marker`` file. Where a concurrent run finished ``path`` first, its copy stays."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}-", dir=parent)
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, marker)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_checkpoint(name: str, config, cache_dir: str, dtype: torch.dtype, device, seed: int = 0) -> str:
    """Save a randomly initialised ``config`` model (weights in ``dtype``) under
    ``cache_dir``, unless a finished copy is there already. Returns its directory."""
    from transformers import AutoModelForSequenceClassification

    key = hashlib.sha1(f"{config.to_json_string()}|{dtype}|{seed}".encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{name}-{key}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    with building(path, "config.json") as tmp:
        torch.manual_seed(seed)
        with torch.device(device):  # initialise on the GPU: a CPU init of 1.5B weights takes minutes
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        _randomize(model, seed)
        model.save_pretrained(tmp)
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the providers' peak memory must not see this model
    return path


def model_facts(config) -> dict:
    """What the harness needs of a model: encoder or decoder, begin/end ids of
    synthetic prompts, ids never to draw, the length limit, and the per-token shape
    for FLOP counting."""
    encoder = config.model_type in ENCODER_TYPES
    ends = None
    if encoder:
        if config.model_type in ("bert", "ernie", "electra", "distilbert"):
            ends = (101, 102) if config.vocab_size > 102 else None  # [CLS], [SEP] in BERT vocabularies
        elif config.model_type == "modernbert":
            ends = (config.cls_token_id, config.sep_token_id)
        elif config.model_type == "deberta-v2":
            ends = (1, 2)  # [CLS], [SEP] in the DeBERTa-v3 vocabulary
        else:
            ends = (config.bos_token_id, config.eos_token_id)
            ends = None if None in ends else ends
    limit = config.max_position_embeddings
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= (config.pad_token_id or 0) + 1  # positions start at padding_idx + 1
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    specials = [getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")]
    return {"encoder": encoder, "ends": ends, "special_ids": [s for s in specials if isinstance(s, int)],
            "max_len": limit, "layers": config.num_hidden_layers, "heads": heads, "head_dim": head_dim}


def linear_params(config) -> int:
    """Weights a token goes through in the per-token linear layers (attention and MLP;
    embeddings and the per-sequence head excluded), counted on a meta-device model. A
    mixture of experts counts its router and, of its experts' weights (fused 3-D tensors in
    transformers 5, or one Linear per expert), the share a token's top k of E use."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    total = 0.0
    for module_name, module in model.named_modules():
        path = module_name.split(".")
        if any(h in path for h in _HEAD_NAMES):
            continue
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Linear):
                if name != "weight":
                    continue
            elif p.dim() < 2 or not ("experts" in path or path[-1] in ("gate", "router")):
                continue  # embeddings, norms
            share = top_k / experts if experts and top_k and "experts" in path else 1.0
            total += p.numel() * share
    return int(total)


def workload_flops(config, lengths, linear: int | None = None) -> float:
    """Matmul FLOPs of one pass over ``lengths``: 2 * linear params * tokens plus
    attention (QK^T and PV: 4 * L^2 * heads * head_dim per layer, half of it for
    causal models, which skip the masked half; sliding-window layers are counted as full
    ones, so ModernBERT's count is an upper bound). linear: linear_params(config) if known."""
    f = model_facts(config)
    linear = linear_params(config) if linear is None else linear
    attn = 4 * sum(n * n for n in lengths) * f["heads"] * f["head_dim"] * f["layers"]
    return 2.0 * linear * sum(lengths) + (attn if f["encoder"] else attn / 2)
