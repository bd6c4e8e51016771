"""Causal LM -> classifier conversion: which head a decoder checkpoint gets.

Three sources, decided from the config (after ``hf_overrides``):

* ``classifier_from_token`` + ``method``: rows of the LM head (or of the input
  embedding where the head is tied). ``from_2_way_softmax`` with tokens
  [false, true] keeps one row ``W[true] - W[false]``, num_labels = 1, sigmoid:
  sigmoid(h . (w_t - w_f)) is exactly softmax([h . w_f, h . w_t])[1], without the
  vocabulary-sized matmul. ``no_post_processing`` keeps ``W[token_ids]``, num_labels
  = len(tokens).
* otherwise a ``score.weight`` in the checkpoint (a ``*ForSequenceClassification``,
  or a causal LM saved with one);
* neither: an error at load time naming both ways out.

``is_original_qwen3_reranker: true`` is shorthand for Qwen3-Reranker checkpoints:
classifier_from_token ["no", "yes"], method from_2_way_softmax, architecture
Qwen3ForSequenceClassification.
"""
from __future__ import annotations

METHODS = ("from_2_way_softmax", "no_post_processing")


def apply_shorthands(config):
    """Expand ``is_original_qwen3_reranker`` in place (explicit keys win). A Qwen3-VL
    checkpoint (Qwen3-VL-Reranker) keeps its vision-language architecture; anything else
    becomes the Qwen3 text classifier, as vLLM routes the original Qwen3-Reranker."""
    if getattr(config, "is_original_qwen3_reranker", False):
        if getattr(config, "classifier_from_token", None) is None:
            config.classifier_from_token = ["no", "yes"]
        if getattr(config, "method", None) is None:
            config.method = "from_2_way_softmax"
        if not any(str(a).startswith("Qwen3VL") for a in getattr(config, "architectures", None) or []):
            config.architectures = ["Qwen3ForSequenceClassification"]


def check_token_head(config):
    """Validate classifier_from_token / method and set config.num_labels to the
    head's width. Returns True when the config asks for a token head."""
    tokens = getattr(config, "classifier_from_token", None)
    method = getattr(config, "method", None)
    if tokens is None:
        if method is not None:
            raise ValueError(f"hf_overrides method={method!r} needs classifier_from_token=[...]")
        return False
    if not isinstance(tokens, (list, tuple)) or not tokens or \
            not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tokens):
        raise ValueError(f"classifier_from_token must be a non-empty list of token strings or ids, got {tokens!r}")
    if method not in METHODS:
        raise ValueError(f"classifier_from_token needs method in {METHODS} (hf_overrides 'method'), got {method!r}")
    if method == "from_2_way_softmax" and len(tokens) != 2:
        raise ValueError(f"method 'from_2_way_softmax' needs exactly two tokens [false, true], got {list(tokens)}")
    config.num_labels = 1 if method == "from_2_way_softmax" else len(tokens)
    if method == "from_2_way_softmax":
        # Its one logit is the log-odds of the true token: sigmoid, whatever problem_type
        # the language model's config carries.
        config.problem_type = None
    return True


def resolve_token_ids(config, tokenizer):
    """Store config.classifier_token_ids (list[int]) for classifier_from_token, looking
    strings up in the tokenizer's vocabulary. A no-op without classifier_from_token."""
    tokens = getattr(config, "classifier_from_token", None)
    if tokens is None:
        return
    ids = []
    for t in tokens:
        if isinstance(t, int):
            ids.append(t)
            continue
        if tokenizer is None:
            raise ValueError(f"classifier_from_token {list(tokens)} names token strings, but no tokenizer could "
                             "be loaded; pass tokenizer=... or token ids")
        i = tokenizer.convert_tokens_to_ids(t)
        unk = getattr(tokenizer, "unk_token", None)
        if i is None or (i == getattr(tokenizer, "unk_token_id", None) and t != unk):
            raise ValueError(f"classifier_from_token: {t!r} is not a single token of the tokenizer's vocabulary")
        ids.append(int(i))
    # A vision-language config keeps the vocabulary in its text_config.
    vocab = getattr(getattr(config, "text_config", None), "vocab_size", None) or config.vocab_size
    for t, i in zip(tokens, ids):
        if not 0 <= i < vocab:
            raise ValueError(f"classifier_from_token: {t!r} -> id {i} is outside the vocabulary [0, {vocab})")
    config.classifier_token_ids = ids


def token_head(lm_rows, method):
    """lm_rows: (n, H) fp32 rows of the LM head for the listed tokens -> (L, H) head."""
    if method == "from_2_way_softmax":
        return (lm_rows[1] - lm_rows[0])[None]
    return lm_rows
