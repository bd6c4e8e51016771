"""The engine on the torch backend against transformers' own BERT-family models."""
import random
import time

import pytest
import torch
from transformers import BertConfig, DistilBertConfig, ElectraConfig, ErnieConfig, RobertaConfig, XLMRobertaConfig

from pyengine import LLM, PoolerConfig, PoolingParams
from pyengine.outputs import PoolingOutput
from tiny import WORDS, save_tiny

ATOL = 1e-4  # DESIGN's fp32 CPU bar on probabilities

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# arch name -> (config factory, tokenizer kind)
FAMILIES = {
    # WordPiece tokenizer, token_type_ids from the tokenizer, pooler dense+tanh head
    "bert": (lambda **kw: BertConfig(vocab_size=160, max_position_embeddings=64, **_COMMON, **kw), "wordpiece"),
    # positions offset by padding_idx + 1, classifier.dense/out_proj head
    "roberta": (lambda **kw: RobertaConfig(vocab_size=320, max_position_embeddings=66, pad_token_id=1,
                                           type_vocab_size=1, **_COMMON, **kw), "roberta"),
    "xlm-roberta": (lambda **kw: XLMRobertaConfig(vocab_size=320, max_position_embeddings=66, pad_token_id=1,
                                                  type_vocab_size=1, **_COMMON, **kw), "roberta"),
    # task-type embedding row added to every token
    "ernie": (lambda **kw: ErnieConfig(vocab_size=160, max_position_embeddings=64, use_task_id=True,
                                       task_type_vocab_size=3, **_COMMON, **kw), "wordpiece"),
    # embeddings narrower than the layers (a projection between), dense+GELU head
    "electra": (lambda **kw: ElectraConfig(vocab_size=160, max_position_embeddings=64, embedding_size=32,
                                           **_COMMON, **kw), "wordpiece"),
    # q_lin/k_lin/... names, no token types, pre_classifier+ReLU head, LayerNorm eps not in its config
    "distilbert": (lambda **kw: DistilBertConfig(vocab_size=160, max_position_embeddings=64, dim=64, n_layers=2,
                                                 n_heads=4, hidden_dim=128, dropout=0.0, attention_dropout=0.0,
                                                 **kw), "wordpiece"),
}


def random_texts(n, rng, max_words=20):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


def hf_probs(model, tok, texts, act, pairs=None):
    """transformers' forward one prompt at a time (no padding at all), fp32 head."""
    out = []
    for i, t in enumerate(texts):
        enc = tok(t, text_pair=None if pairs is None else pairs[i], return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits.float()[0]
        out.append({"softmax": logits.softmax(-1), "sigmoid": logits.sigmoid(), "identity": logits}[act])
    return torch.stack(out)


def report(got, ref):
    diff = (got - ref).abs()
    i = int(diff.max(dim=-1).values.argmax())
    return f"max |diff| {diff.max():.3e} at prompt {i}: got {got[i].tolist()} want {ref[i].tolist()}"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    factory, tok_kind = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model, tok = save_tiny(path, factory(num_labels=3), tokenizer=tok_kind)
    return request.param, path, model, tok


def test_classify_matches_transformers(family):
    # Mixed lengths in one call: batches hold sequences of different lengths.
    name, path, model, tok = family
    rng = random.Random(1)
    texts = random_texts(24, rng) + ["a"]
    llm = LLM(str(path))
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    ref = hf_probs(model, tok, texts, "softmax")
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)
    assert (got.sum(-1) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("problem_type,num_labels,act", [
    ("multi_label_classification", 4, "sigmoid"),  # sigmoid per label
    ("regression", 1, "identity"),                 # raw value
    (None, 1, "sigmoid"),                          # unset with one label -> sigmoid
    ("single_label_classification", 2, "softmax"),
])
def test_activation_by_problem_type(tmp_path, problem_type, num_labels, act):
    factory, tok_kind = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=num_labels, problem_type=problem_type), seed=3)
    texts = random_texts(10, random.Random(2))
    llm = LLM(str(tmp_path))
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    ref = hf_probs(model, tok, texts, act)
    assert got.shape == (10, num_labels)
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)
    raw = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_activation=False, use_tqdm=False)])
    ref_raw = hf_probs(model, tok, texts, "identity")
    assert torch.allclose(raw, ref_raw, atol=ATOL, rtol=0), report(raw, ref_raw)


def test_unknown_problem_type_is_refused(tmp_path):
    factory, _ = FAMILIES["bert"]
    save_tiny(tmp_path, factory(num_labels=3, problem_type="ordinal_regression"))
    with pytest.raises(ValueError, match="unknown problem_type 'ordinal_regression'"):
        LLM(str(tmp_path))


def test_pooler_config_use_activation_false_is_the_default(tmp_path):
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=3), seed=4)
    texts = random_texts(4, random.Random(5))
    llm = LLM(str(tmp_path), pooler_config=PoolerConfig(use_activation=False))
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    ref = hf_probs(model, tok, texts, "identity")
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)
    # a call's own use_activation still wins over the default
    soft = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_activation=True, use_tqdm=False)])
    assert torch.allclose(soft, ref.softmax(-1), atol=ATOL, rtol=0), report(soft, ref.softmax(-1))


def test_lengths_one_to_max_model_len(family):
    # Token-id prompts from 1 token up to exactly max_model_len in one call.
    name, path, model, tok = family
    llm = LLM(str(path))
    limit = llm.engine.max_model_len
    g = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    lens = [1, 2, 3, 7, 16, limit - 1, limit]
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lens]
    got = torch.tensor([o.outputs.probs for o in llm.classify([{"prompt_token_ids": p} for p in prompts],
                                                               use_tqdm=False)])
    ref = []
    for p in prompts:
        with torch.no_grad():
            ref.append(model(input_ids=torch.tensor([p])).logits[0].float().softmax(-1))
    ref = torch.stack(ref)
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)


def test_pad_tokens_inside_prompts(family):
    # A pad token inside a token prompt is a token like any other, except that RoBERTa's
    # positions skip it (transformers counts the non-pad tokens only), in every batch.
    name, path, model, tok = family
    pad = model.config.pad_token_id
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(5, model.config.vocab_size, (n,), generator=g).tolist() for n in (6, 9, 12)]
    prompts[0][2] = prompts[1][-1] = pad
    prompts[2][3] = prompts[2][4] = pad
    llm = LLM(str(path))
    got = torch.tensor([o.outputs.probs for o in llm.classify([{"prompt_token_ids": p} for p in prompts],
                                                               use_tqdm=False)])
    with torch.no_grad():
        ref = torch.stack([model(input_ids=torch.tensor([p])).logits[0].float().softmax(-1) for p in prompts])
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)


def test_batch_invariance(family):
    # A prompt's result must not depend on its batch mates (fp32: 1e-5).
    name, path, model, tok = family
    texts = random_texts(40, random.Random(7))
    llm = LLM(str(path))
    packed = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    alone = torch.tensor([llm.classify(t, use_tqdm=False)[0].outputs.probs for t in texts[:8]])
    assert torch.allclose(packed[:8], alone, atol=1e-5, rtol=0), report(packed[:8], alone)
    small = LLM(str(path), max_num_seqs=3, max_num_batched_tokens=64)
    cut = torch.tensor([o.outputs.probs for o in small.classify(texts, use_tqdm=False)])
    assert torch.allclose(packed, cut, atol=1e-5, rtol=0), report(packed, cut)


def test_encode_equals_classify(family):
    name, path, model, tok = family
    texts = random_texts(6, random.Random(9))
    llm = LLM(str(path))
    enc = llm.encode(texts, pooling_task="classify", use_tqdm=False)
    cls = llm.classify(texts, use_tqdm=False)
    for e, c in zip(enc, cls):
        assert isinstance(e.outputs.data, torch.Tensor) and e.outputs.data.dtype == torch.float32
        assert e.outputs.data.tolist() == c.outputs.probs
        assert e.prompt_token_ids == c.prompt_token_ids


def test_input_forms_and_output_order(tmp_path):
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=2))
    llm = LLM(str(tmp_path))
    texts = random_texts(5, random.Random(4))
    ids = tok(texts[1])["input_ids"]
    mixed = [texts[0], {"prompt_token_ids": ids}, {"prompt": texts[2]}, texts[3], texts[4]]
    outs = llm.classify(mixed, use_tqdm=False)
    ref = hf_probs(model, tok, texts, "softmax")
    got = torch.tensor([o.outputs.probs for o in outs])
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)
    assert outs[1].prompt_token_ids == ids
    alone = torch.tensor(llm.classify(texts[0], use_tqdm=False)[0].outputs.probs)
    assert torch.allclose(alone, got[0], atol=1e-5, rtol=0)


def test_model_instance_and_tokenizer_object(tmp_path):
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=3))
    texts = random_texts(6, random.Random(11))
    llm = LLM(model, tokenizer=tok)
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    ref = hf_probs(model, tok, texts, "softmax")
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)


def test_model_instance_runs_as_its_own_class(tmp_path):
    """An instance is loaded as the class it is: one built with from_config (its config
    names no architecture) and one fine-tuned from a base checkpoint (its config names the
    base class) run and match transformers."""
    from transformers import AutoModelForSequenceClassification, BertForMaskedLM

    from tiny import randomize

    factory, _ = FAMILIES["bert"]
    cfg = factory(num_labels=2)
    ids = [{"prompt_token_ids": [2, 17, 30, 41, 3]}]
    fresh = randomize(AutoModelForSequenceClassification.from_config(cfg), 0.3, 5).eval()
    assert not getattr(fresh.config, "architectures", None)
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    tuned = randomize(AutoModelForSequenceClassification.from_pretrained(tmp_path / "mlm", num_labels=2), 0.3, 6).eval()
    assert tuned.config.architectures == ["BertForMaskedLM"]
    for model in (fresh, tuned):
        got = torch.tensor(LLM(model).classify(ids, use_tqdm=False)[0].outputs.probs)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids[0]["prompt_token_ids"]])).logits[0].softmax(-1)
        assert torch.allclose(got, want, atol=ATOL, rtol=0), (got, want)


@pytest.mark.parametrize("override, match", [
    # transformers runs this causal; the BERT stack here attends both ways
    ({"is_decoder": True}, "is_decoder=True \\(causal self-attention\\) is not supported"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key' is not supported"),
])
def test_bert_options_this_stack_does_not_run_are_refused(tmp_path, override, match):
    factory, _ = FAMILIES["bert"]
    save_tiny(tmp_path, factory(num_labels=2))
    with pytest.raises(ValueError, match=match):
        LLM(str(tmp_path), kernel_backend="torch", hf_overrides=override)


def test_checkpoints_that_would_load_wrong_are_refused(tmp_path):
    """A tokenizer without its vocabulary, an unreadable tokenizer.json, a quantized
    checkpoint, a weight the config has no place for: clear errors when the engine is
    built, not wrong numbers."""
    import json
    import os

    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig

    factory, _ = FAMILIES["bert"]
    for name in ("novocab", "corrupt"):
        save_tiny(tmp_path / name, factory(num_labels=2))
    os.remove(tmp_path / "novocab" / "tokenizer.json")
    os.remove(tmp_path / "novocab" / "vocab.txt")
    with pytest.raises(ValueError, match="has tokenizer settings but no vocabulary"):
        LLM(str(tmp_path / "novocab"))
    (tmp_path / "corrupt" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load the tokenizer from"):
        LLM(str(tmp_path / "corrupt"))
    llama = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        pad_token_id=0, attention_bias=True)
    save_tiny(tmp_path / "biased", llama, tokenizer=None)
    with pytest.raises(ValueError, match=r"holds a weight for 'layers.0.qkv_b', which this model.*does not have"):
        LLM(str(tmp_path / "biased"), hf_overrides={"attention_bias": False})
    # fp8 weights with their scales, as a quantized checkpoint stores them
    save_tiny(tmp_path / "fp8", llama, tokenizer=None)
    sd = load_file(tmp_path / "fp8" / "model.safetensors")
    key = next(k for k in sd if k.endswith("mlp.down_proj.weight"))
    sd[key], sd[key[:-6] + "weight_scale"] = sd[key].to(torch.float8_e4m3fn), torch.ones(1)
    save_file(sd, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weight .*down_w.* is stored as torch.float8_e4m3fn"):
        LLM(str(tmp_path / "fp8"))
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8"}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quantized \(quantization_config, quant_method='fbgemm_fp8'\)"):
        LLM(str(tmp_path / "fp8"))


def test_sharded_and_bin_checkpoints(tmp_path):
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path / "a", factory(num_labels=2))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    tok.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    tok.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    texts = random_texts(5, random.Random(12))
    ref = hf_probs(model, tok, texts, "softmax")
    for d in ("sharded", "bin"):
        got = torch.tensor([o.outputs.probs for o in LLM(str(tmp_path / d)).classify(texts, use_tqdm=False)])
        assert torch.allclose(got, ref, atol=ATOL, rtol=0), f"{d}: " + report(got, ref)


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ce")
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(path, factory(num_labels=1), seed=5)
    return path, model, tok


def test_score_matches_transformers_pairs(cross_encoder):
    # token_type_ids of the pair encoding reach the model.
    path, model, tok = cross_encoder
    rng = random.Random(13)
    q = random_texts(1, rng, 6)[0]
    docs = random_texts(7, rng)
    llm = LLM(str(path))
    got = torch.tensor([o.outputs.score for o in llm.score(q, docs, use_tqdm=False)])
    ref = hf_probs(model, tok, [q] * len(docs), "sigmoid", pairs=docs)[:, 0]
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got[:, None], ref[:, None])
    enc = tok(q, docs[0])
    assert 1 in enc["token_type_ids"]
    # N:N and 1:1 agree with 1:N.
    nn_ = torch.tensor([o.outputs.score for o in llm.score([q] * 7, docs, use_tqdm=False)])
    one = llm.score(q, docs[3], use_tqdm=False)[0].outputs.score
    assert torch.allclose(nn_, got, atol=1e-6) and abs(one - got[3].item()) < 1e-6
    # Without token types the scores differ: the check above could fail.
    flat = LLM(str(path)).classify([{"prompt_token_ids": tok(q, d)["input_ids"]} for d in docs], use_tqdm=False)
    assert max(abs(f.outputs.probs[0] - g.item()) for f, g in zip(flat, got)) > 1e-4
    # A document of text parts reads as vLLM joins them: one line each (not glued into one word)
    parts = {"content": [{"type": "text", "text": "the cat"}, {"type": "text", "text": "sat on a mat"}]}
    from_parts, lines = llm.score(q, [parts, "the cat\nsat on a mat"], use_tqdm=False)
    assert from_parts.prompt_token_ids == lines.prompt_token_ids == tok(q, "the cat\nsat on a mat")["input_ids"]
    assert from_parts.prompt_token_ids != tok(q, "the catsat on a mat")["input_ids"]


@pytest.mark.parametrize("field, fn, act", [
    # sentence-transformers' current field, and the older CrossEncoder config field
    ("sentence_transformers", "torch.nn.modules.linear.Identity", "identity"),
    ("sbert_ce_default_activation_function", "torch.nn.modules.linear.Identity", "identity"),
    ("sentence_transformers", "torch.nn.modules.activation.Sigmoid", "sigmoid"),
    # a Softmax over one logit would score every pair 1.0: read as vLLM does, a sigmoid
    ("sentence_transformers", "torch.nn.modules.activation.Softmax", "sigmoid"),
])
def test_score_activation_from_sentence_transformers(tmp_path, field, fn, act):
    factory, _ = FAMILIES["bert"]
    cfg = factory(num_labels=1)
    setattr(cfg, field, {"activation_fn": fn} if field == "sentence_transformers" else fn)
    model, tok = save_tiny(tmp_path, cfg, seed=6)
    llm = LLM(str(tmp_path))
    got = torch.tensor([o.outputs.score for o in llm.score("the cat", ["a dog", "the mat"], use_tqdm=False)])
    ref = hf_probs(model, tok, ["the cat"] * 2, act, pairs=["a dog", "the mat"])[:, 0]
    raw = hf_probs(model, tok, ["the cat"] * 2, "identity", pairs=["a dog", "the mat"])[:, 0]
    assert (raw - raw.sigmoid()).abs().min() > 1e-3  # identity and sigmoid differ here
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got[:, None], ref[:, None])


def test_unsupported_sentence_transformers_activation_is_refused(tmp_path):
    factory, _ = FAMILIES["bert"]
    cfg = factory(num_labels=1)
    cfg.sentence_transformers = {"activation_fn": "torch.nn.modules.activation.Tanh"}
    save_tiny(tmp_path, cfg, seed=6)
    with pytest.raises(ValueError, match="unsupported sentence-transformers activation_fn "
                                         "'torch.nn.modules.activation.Tanh'"):
        LLM(str(tmp_path)).score("the cat", ["a dog"], use_tqdm=False)


@pytest.mark.parametrize("side", ["left", "right", None])
def test_truncation(tmp_path, side):
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=2))
    llm = LLM(str(tmp_path))
    text = "the cat sat on a mat and the dog was there who what where"
    k = 6
    out = llm.classify(text, truncate_prompt_tokens=k, truncation_side=side, use_tqdm=False)[0]
    full = tok(text)["input_ids"]
    keep = full[1:-1][:k - 2] if side == "right" else full[1:-1][-(k - 2):]  # unset means left
    want = [full[0]] + keep + [full[-1]]  # [CLS] ... [SEP] kept, as transformers truncates
    assert out.prompt_token_ids == want
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([want])).logits[0].softmax(-1)
    assert torch.allclose(torch.tensor(out.outputs.probs), ref, atol=ATOL, rtol=0)
    # Token-id prompts are cut directly: right keeps the first k, left the last k.
    ids = llm.classify({"prompt_token_ids": full}, truncate_prompt_tokens=k, truncation_side=side,
                       use_tqdm=False)[0]
    assert ids.prompt_token_ids == (full[:k] if side == "right" else full[-k:])
    # vLLM's tokenization_kwargs: the same cuts, in either of its forms; a bare list of token
    # ids is one prompt, as vLLM takes it
    for kwargs in ({"truncate_prompt_tokens": k, "truncation_side": side}, {"truncation": True, "max_length": k}):
        if "truncation" in kwargs and side is not None:
            kwargs["truncation_side"] = side
        again = llm.classify(text, tokenization_kwargs=kwargs, use_tqdm=False)[0]
        assert again.prompt_token_ids == want, kwargs
        bare = llm.classify(full, tokenization_kwargs=kwargs, use_tqdm=False)[0]
        assert bare.prompt_token_ids == ids.prompt_token_ids, kwargs


def test_truncation_below_the_special_tokens_is_an_error(tmp_path):
    # BERT adds 2 special tokens to a text and 3 to a pair: a smaller limit cannot be
    # kept (the tokenizer would return the text uncut), so it is refused up front.
    factory, _ = FAMILIES["bert"]
    save_tiny(tmp_path, factory(num_labels=1))
    llm = LLM(str(tmp_path), max_model_len=16)
    text = " ".join(["cat"] * 40)
    with pytest.raises(ValueError, match=r"prompts\[1\]: truncate_prompt_tokens=1 keeps fewer tokens than the 2 "
                                         r"special tokens this model adds to a text; pass at least 2"):
        llm.classify([{"prompt_token_ids": [5, 6, 7]}, text], truncate_prompt_tokens=1, use_tqdm=False)
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens=2 .* 3 special tokens .* text pair"):
        llm.score(text, text, truncate_prompt_tokens=2, use_tqdm=False)
    # At the limit itself every content token goes, the special tokens stay.
    assert len(llm.classify(text, truncate_prompt_tokens=2, use_tqdm=False)[0].prompt_token_ids) == 2
    assert len(llm.score(text, text, truncate_prompt_tokens=3, use_tqdm=False)[0].prompt_token_ids) == 3
    # Token ids get no special tokens: any positive limit cuts them.
    assert llm.classify({"prompt_token_ids": [5, 6, 7]}, truncate_prompt_tokens=1,
                        use_tqdm=False)[0].prompt_token_ids == [7]


def test_truncate_minus_one_is_max_model_len(tmp_path):
    factory, _ = FAMILIES["bert"]
    save_tiny(tmp_path, factory(num_labels=2))
    llm = LLM(str(tmp_path), max_model_len=16)
    long = " ".join(["cat"] * 40)
    out = llm.classify(long, truncate_prompt_tokens=-1, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == 16
    with pytest.raises(ValueError, match=r"prompts\[0\] has 42 tokens, more than max_model_len=16"):
        llm.classify(long, use_tqdm=False)
    # the limit itself runs, one token more does not
    assert len(llm.classify({"prompt_token_ids": [2] + [7] * 14 + [3]}, use_tqdm=False)[0].prompt_token_ids) == 16
    with pytest.raises(ValueError, match=r"prompts\[0\] has 17 tokens, more than max_model_len=16"):
        llm.classify({"prompt_token_ids": [2] + [7] * 15 + [3]}, use_tqdm=False)


def test_logit_bias_and_scale(tmp_path):
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=3))
    texts = random_texts(5, random.Random(3))
    llm = LLM(str(tmp_path), pooler_config=PoolerConfig(logit_bias=0.7, logit_scale=2.5))
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    raw = hf_probs(model, tok, texts, "identity")
    ref = ((raw - 0.7) * 2.5).softmax(-1)
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)
    mean = LLM(str(tmp_path), pooler_config={"pooling_type": "MEAN"})
    enc = tok(texts[0], return_tensors="pt")
    with torch.no_grad():
        h = model.bert(**enc).last_hidden_state.mean(1)
        ref_mean = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(h))).softmax(-1)[0]
    got_mean = torch.tensor(mean.classify(texts[0], use_tqdm=False)[0].outputs.probs)
    assert torch.allclose(got_mean, ref_mean, atol=ATOL, rtol=0)
    # vLLM's newer name for it
    vllm_name = LLM(str(tmp_path), pooler_config=PoolerConfig(seq_pooling_type="mean"))
    assert vllm_name.classify(texts[0], use_tqdm=False)[0].outputs.probs == got_mean.tolist()
    with pytest.raises(ValueError, match="disagree"):
        PoolerConfig(pooling_type="CLS", seq_pooling_type="MEAN")


def test_logit_bias_under_sigmoid_and_in_mixed_batches(tmp_path):
    """Softmax cannot see a scalar bias; one label's sigmoid can. A batch that mixes
    use_activation true and false runs each kind's rows as their own calls do."""
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=1), seed=8)
    texts = random_texts(6, random.Random(4))
    llm = LLM(str(tmp_path), pooler_config=PoolerConfig(logit_bias=0.7, logit_scale=2.5))
    raw = hf_probs(model, tok, texts, "identity")
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    ref = ((raw - 0.7) * 2.5).sigmoid()
    assert (ref - (raw * 2.5).sigmoid()).abs().max() > 0.05  # the bias shows
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)
    plain = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_activation=False, use_tqdm=False)])
    params = [PoolingParams(use_activation=i % 2 == 0) for i in range(len(texts))]
    mixed = torch.tensor([o.outputs.probs for o in llm.classify(texts, pooling_params=params, use_tqdm=False)])
    want = torch.stack([got[i] if i % 2 == 0 else plain[i] for i in range(len(texts))])
    assert torch.allclose(mixed, want, atol=1e-6, rtol=0), report(mixed, want)


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad")
    factory, _ = FAMILIES["bert"]
    save_tiny(path, factory(num_labels=3))
    return LLM(str(path), max_model_len=16), path


def test_empty_and_numpy_prompt_lists_as_vllm_takes_them(small_llm):
    """No prompts give no outputs (vLLM returns []), still after the arguments are checked;
    a numpy array of strings is a list of prompts."""
    import asyncio

    import numpy as np
    from pyengine import AsyncLLM

    llm, _ = small_llm
    assert llm.classify([], use_tqdm=False) == [] and llm.encode([], use_tqdm=False) == []
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be"):
        llm.classify([], truncate_prompt_tokens=0)
    texts = ["the cat sat", "a dog"]
    got = llm.classify(np.array(texts), use_tqdm=False)
    assert [o.outputs.probs for o in got] == [o.outputs.probs for o in llm.classify(texts, use_tqdm=False)]
    assert [o.prompt_token_ids for o in llm.classify(np.array(texts, dtype=object), use_tqdm=False)] == \
        [o.prompt_token_ids for o in got]
    assert asyncio.run(AsyncLLM(llm.config.model).classify([])) == []


@pytest.mark.parametrize("call,err,match", [
    (lambda l: l.classify(["the cat", " ".join(["dog"] * 30)]), ValueError,
     r"prompts\[1\] has 32 tokens, more than max_model_len=16"),
    (lambda l: l.classify(["the cat", ""]), ValueError, r"prompts\[1\] is empty"),
    (lambda l: l.classify([{"prompt_token_ids": []}]), ValueError, r"prompts\[0\] is empty"),
    (lambda l: l.classify([{"prompt_token_ids": [2, 5, 100000]}]), ValueError,
     r"prompts\[0\] has token id 100000 outside the vocabulary \[0, 160\)"),
    (lambda l: l.classify([{"prompt_token_ids": [2, -1]}]), ValueError, r"token id -1 outside"),
    # one check over the whole call's tokens still names the prompt (here the third)
    (lambda l: l.classify(["the cat", {"prompt_token_ids": [2, 5]}, {"prompt_token_ids": [4, 160, 3]}]),
     ValueError, r"prompts\[2\] has token id 160 outside the vocabulary"),
    # beyond int64
    (lambda l: l.classify([{"prompt_token_ids": [2, 5]}, {"prompt_token_ids": [3, 2 ** 70]}]), ValueError,
     r"prompts\[1\] has token id 1180591620717411303424 outside the vocabulary"),
    (lambda l: l.classify([3, "x"]), TypeError, r"prompts\[0\] must be a str, a dict or a list of token ids, got int"),
    (lambda l: l.classify([[2, 5], [2, 1.5]]), TypeError, r"prompts\[1\] must be a list of ints; element 1 is float"),
    (lambda l: l.classify([2, 5], tokenization_kwargs={"padding": True}), ValueError,
     r"tokenization_kwargs \['padding'\] are not supported"),
    (lambda l: l.classify([2, 5], tokenization_kwargs={"max_length": 3}), ValueError, "only with truncation=True"),
    (lambda l: l.classify([2, 5], truncate_prompt_tokens=3, tokenization_kwargs={"truncate_prompt_tokens": 3}),
     ValueError, "both as a keyword and in tokenization_kwargs"),
    (lambda l: l.classify([{"prompt_token_ids": [2, True, 3]}]), TypeError, r"must be a list of ints"),
    (lambda l: l.classify([{"prompt_token_ids": [2, 3.0]}]), TypeError, r"must be a list of ints"),
    (lambda l: l.classify([{"text": "x"}]), ValueError, r"unknown key\(s\) \['text'\]"),
    (lambda l: l.classify([{"cache_salt": "x"}]), ValueError, r"without 'prompt' or 'prompt_token_ids'"),
    (lambda l: l.classify([{"prompt": "x", "multi_modal_data": {"image": None}}]), ValueError,
     r"prompts\[0\] has images or videos, but this model takes text only"),
    (lambda l: l.classify([{"prompt": "x", "multi_modal_data": {"video": None}}]), ValueError,
     r"prompts\[0\] has images or videos, but this model takes text only"),
    (lambda l: l.classify([{"prompt": "x", "multi_modal_data": {"audio": None}}]), ValueError,
     r"has \['audio'\]: only 'image' and 'video' are supported"),
    (lambda l: l.classify([{"prompt_token_ids": [2, 5], "token_type_ids": [0]}]), ValueError,
     r"token_type_ids'\] has 1 entries for 2 token ids"),
    (lambda l: l.classify([{"prompt_token_ids": [2, 5], "token_type_ids": [0, 7]}]), ValueError,
     r"token type id 7 outside the model's token types \[0, 2\)"),
    (lambda l: l.classify([{"prompt": "x", "token_type_ids": [0]}]), ValueError, "go with prompt_token_ids"),
    (lambda l: l.classify([{"prompt_token_ids": torch.tensor([[2, 5]])}]), TypeError, "1-D integer array"),
    (lambda l: l.classify([{"prompt_token_ids": torch.tensor([2.0, 5.0])}]), TypeError, "1-D integer array"),
    (lambda l: l.classify("cat", truncate_prompt_tokens=0), ValueError, "truncate_prompt_tokens must be"),
    (lambda l: l.classify("cat", truncate_prompt_tokens=99), ValueError, "greater than max_model_len=16"),
    (lambda l: l.classify("cat", truncate_prompt_tokens=4, truncation_side="middle"), ValueError,
     "truncation_side must be"),
    (lambda l: l.classify("cat", use_activation="yes"), TypeError, "use_activation must be"),
    (lambda l: l.score("q", ["a", "b"]), ValueError, r"num_labels == 1.*num_labels=3"),
    (lambda l: l.encode("cat", pooling_task="embed"), ValueError, "pooling_task='embed' is not supported"),
])
def test_bad_input_raises_before_work(small_llm, call, err, match):
    llm, _ = small_llm
    with pytest.raises(err, match=match):
        call(llm)
    assert not llm.engine.has_unfinished()


def test_token_ids_with_types_and_arrays(cross_encoder, tmp_path):
    """A pre-tokenised pair with its token_type_ids runs as the text pair does; integer
    numpy arrays and torch tensors pass as token ids; a checkpoint without tokenizer
    files takes token ids only (transformers would build an empty-vocabulary tokenizer)."""
    import numpy as np

    path, _, tok = cross_encoder
    llm = LLM(str(path))
    enc = tok("where is the cat", text_pair="on a mat")
    want = llm.score("where is the cat", "on a mat", use_activation=False, use_tqdm=False)[0].outputs.score
    prompts = [{"prompt_token_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"]},
               {"prompt_token_ids": np.array(enc["input_ids"]), "token_type_ids": torch.tensor(enc["token_type_ids"])},
               {"prompt_token_ids": torch.tensor(enc["input_ids"])}]
    got = [o.outputs.probs[0] for o in llm.classify(prompts, use_activation=False, use_tqdm=False)]
    assert got[0] == pytest.approx(want, abs=1e-5) and got[1] == pytest.approx(want, abs=1e-5)
    assert abs(got[2] - want) > 1e-3, "token types made no difference: a weak test"
    cut = llm.classify(prompts[:1], truncate_prompt_tokens=4, truncation_side="right", use_tqdm=False)[0]
    assert cut.prompt_token_ids == enc["input_ids"][:4]
    # Cut from the left, the types go with their tokens (the last ones are the pair's 1s).
    ids, types = enc["input_ids"], enc["token_type_ids"]
    left = llm.classify(prompts[:1], truncate_prompt_tokens=5, truncation_side="left", use_activation=False,
                        use_tqdm=False)[0]
    kept = llm.classify([{"prompt_token_ids": ids[-5:], "token_type_ids": types[-5:]}], use_activation=False,
                        use_tqdm=False)[0]
    assert types[-5:] != types[:5] and left.prompt_token_ids == ids[-5:]
    assert left.outputs.probs == pytest.approx(kept.outputs.probs, abs=1e-6)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((path / f).read_bytes())
    no_tok = LLM(str(bare))
    assert no_tok.get_tokenizer() is None
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        no_tok.classify("the cat", use_tqdm=False)
    assert no_tok.classify(prompts[:1], use_tqdm=False)[0].outputs.probs == llm.classify(
        prompts[:1], use_tqdm=False)[0].outputs.probs
    with pytest.raises(ValueError, match="has no tokenizer files"):
        LLM(str(path), tokenizer=str(bare))


def test_outputs_have_vllm_classes(cross_encoder):
    """classify / score / encode outputs as vLLM's: the task outputs subclass
    PoolingRequestOutput, carry num_cached_tokens (0, no prefix cache), and are built from
    the pooling output by from_base."""
    from pyengine import ClassificationRequestOutput, PoolingRequestOutput, ScoringRequestOutput

    path, _, _ = cross_encoder
    llm = LLM(str(path))
    (enc,) = llm.encode("the cat", pooling_task="classify", use_tqdm=False)
    (cls,) = llm.classify("the cat", use_tqdm=False)
    (sc,) = llm.score("the cat", "a dog", use_tqdm=False)
    for o, kind in ((enc, PoolingRequestOutput), (cls, ClassificationRequestOutput), (sc, ScoringRequestOutput)):
        assert isinstance(o, kind) and isinstance(o, PoolingRequestOutput), type(o)
        assert o.num_cached_tokens == 0 and o.finished is True
    again = ClassificationRequestOutput.from_base(enc)
    assert again.outputs.probs == cls.outputs.probs and again.prompt_token_ids == cls.prompt_token_ids
    assert again.outputs.num_classes == 1 and again.request_id == enc.request_id
    assert ScoringRequestOutput.from_base(enc).outputs.score == enc.outputs.data.item()
    with pytest.raises(ValueError, match="one output per pair, got 2"):
        ScoringRequestOutput.from_base(PoolingRequestOutput("x", PoolingOutput(torch.rand(2)), [1]))


def test_mismatched_pairs(cross_encoder):
    path, _, _ = cross_encoder
    llm = LLM(str(path))
    with pytest.raises(ValueError, match="1:1, 1:N or N:N; got 2 items in data_1 and 3 in data_2"):
        llm.score(["a", "b"], ["c", "d", "e"])
    with pytest.raises(ValueError, match="1:1, 1:N or N:N; got 2 items in data_1 and 1 in data_2"):
        llm.score(["a", "b"], "c")
    with pytest.raises(ValueError, match=r"data_2\[1\] is empty"):
        llm.score("a", ["c", ""])
    # A lone surrogate (JSON's "\ud800") is not Unicode the tokenizer takes: the error names
    # the prompt, where the tokenizer's own names none.
    with pytest.raises(ValueError, match=r"pairs\[1\] is not valid Unicode \(its second text\)"):
        llm.score("a", ["c", "d \udfff"])
    with pytest.raises(ValueError, match=r"prompts\[2\] is not valid Unicode: surrogates not allowed at character 4"):
        llm.classify(["a", "b", "the \ud800 cat"], use_tqdm=False)


def test_bad_model_and_engine_args(tmp_path, small_llm):
    _, good = small_llm
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    cfg.architectures = ["FancyNewForSequenceClassification"]
    (tmp_path / "unknown").mkdir()
    cfg.save_pretrained(tmp_path / "unknown")
    with pytest.raises(ValueError, match=r"unknown architecture \['FancyNewForSequenceClassification'\]"):
        LLM(str(tmp_path / "unknown"))
    (tmp_path / "noweights").mkdir()
    BertConfig.from_pretrained(good).save_pretrained(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="no weights"):
        LLM(str(tmp_path / "noweights"))
    (tmp_path / "corrupt").mkdir()
    BertConfig.from_pretrained(good).save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt or unreadable weight file"):
        LLM(str(tmp_path / "corrupt"))
    with pytest.raises(ValueError, match="exceeds the model's maximum 64"):
        LLM(str(good), max_model_len=100)
    # RoBERTa's positions start after its pad token: without one the model is not defined
    save_tiny(tmp_path / "roberta", FAMILIES["roberta"][0](), tokenizer="roberta")
    with pytest.raises(ValueError, match="pad_token_id must be a non-negative int .* got None"):
        LLM(str(tmp_path / "roberta"), hf_overrides={"pad_token_id": None})
    with pytest.raises(ValueError, match="max_num_seqs must be a positive int"):
        LLM(str(good), max_num_seqs=0)
    with pytest.raises(ValueError, match="max_model_len must be a positive int or None, got True"):
        LLM(str(good), max_model_len=True)
    with pytest.raises(TypeError, match="logit_scale must be a number, got bool"):
        PoolerConfig(logit_scale=True)
    with pytest.raises(ValueError, match="logit_scale must not be 0"):
        PoolerConfig(logit_scale=0)
    assert PoolerConfig(use_activation=None).use_activation is True  # vLLM's default, None
    with pytest.raises(ValueError, match="logit_bias must be finite, got nan"):
        LLM(str(good), pooler_config={"logit_bias": float("nan")})
    with pytest.raises(ValueError, match="max_model_len=64 is larger than max_num_batched_tokens=32"):
        LLM(str(good), max_model_len=64, max_num_batched_tokens=32)
    assert LLM(str(good), max_num_batched_tokens=32).engine.max_model_len == 32
    with pytest.raises(ValueError, match="dtype must be"):
        LLM(str(good), dtype="int8")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        LLM(str(good), kernel_backend="opencl")
    with pytest.raises(RuntimeError, match="'cuda' is not available on cpu"):
        LLM(str(good), kernel_backend="cuda", device="cpu")
    with pytest.raises(ValueError, match="runs pooling models only"):
        LLM(str(good), runner="generate")
    with pytest.raises(ValueError, match="max_lora_rank must be a positive int"):
        LLM(str(good), enable_lora=True, max_lora_rank=0)
    with pytest.raises(TypeError, match="enable_lora must be a bool"):
        LLM(str(good), enable_lora="yes")


def test_pooling_params_per_prompt(small_llm, tmp_path):
    """vLLM's PoolingParams, one for all or one per prompt: each prompt gets the same
    numbers as a keyword call on it alone (truncation and activation of its own)."""
    llm, _ = small_llm
    long_text, short = " ".join(WORDS[:20]), "the cat sat"
    params = [PoolingParams(truncate_prompt_tokens=5), PoolingParams(use_activation=False),
              PoolingParams(truncate_prompt_tokens=-1, use_activation=False), PoolingParams()]
    prompts = [long_text, short, long_text[:60], {"prompt_token_ids": [2, 9, 10, 11, 12, 13, 3]}]
    got = llm.classify(prompts, pooling_params=params, use_tqdm=False)
    for p, prm, o in zip(prompts, params, got):
        (want,) = llm.classify([p], truncate_prompt_tokens=prm.truncate_prompt_tokens,
                               use_activation=prm.use_activation, use_tqdm=False)
        assert o.prompt_token_ids == want.prompt_token_ids
        # the batch differs (one prompt alone): DESIGN's fp32 batch-invariance bar
        torch.testing.assert_close(torch.tensor(o.outputs.probs), torch.tensor(want.outputs.probs), atol=1e-5, rtol=0)
    assert len(got[0].prompt_token_ids) == 5
    # vLLM's positional form, encode(prompts, pooling_params), and one PoolingParams for all
    one = PoolingParams(truncate_prompt_tokens=4, use_activation=False)
    enc = llm.encode([long_text, short], one, use_tqdm=False)
    kw = llm.encode([long_text, short], truncate_prompt_tokens=4, use_activation=False, use_tqdm=False)
    assert all(torch.equal(a.outputs.data, b.outputs.data) for a, b in zip(enc, kw))
    # ... with vLLM's pooling_task keyword beside it, and classify's own second argument
    task = llm.encode([long_text, short], one, pooling_task="classify", use_tqdm=False)
    cls = llm.classify([long_text, short], one.clone(), use_tqdm=False)
    assert one.clone() == one and one.clone() is not one and PoolingParams(extra_kwargs={}).extra_kwargs == {}
    assert all(torch.equal(a.outputs.data, b.outputs.data) for a, b in zip(task, kw))
    assert [c.outputs.probs for c in cls] == [b.outputs.data.tolist() for b in kw]
    positional = llm.encode([short], "classify", use_tqdm=False)[0]  # the task in the second place, as before
    assert torch.equal(positional.outputs.data, llm.encode([short], pooling_task="classify", use_tqdm=False)[0]
                       .outputs.data)
    for call, exc, match in [
        (lambda: llm.classify([short], pooling_params=one, use_activation=True), ValueError, "not both"),
        (lambda: llm.classify([short, short], pooling_params=[one]), ValueError, "1 entries for 2 prompts"),
        (lambda: llm.classify([short], pooling_params={"use_activation": False}), TypeError, "PoolingParams"),
        (lambda: llm.classify([short], pooling_params=PoolingParams(task="score")), ValueError, "to a classify"),
        (lambda: PoolingParams(dimensions=8), ValueError, "embedding models"),
        (lambda: PoolingParams(normalize=True), ValueError, "normalize applies to embedding models"),
        (lambda: PoolingParams(step_tag_id=5), ValueError, "step_tag_id applies to step reward models"),
        (lambda: PoolingParams(extra_kwargs={"k": 1}), ValueError, r"extra_kwargs \['k'\]: .* plugin poolers"),
        (lambda: PoolingParams(truncate_prompt_tokens=0), ValueError, "truncate_prompt_tokens"),
    ]:
        with pytest.raises(exc, match=match):
            call()
    ce_path = tmp_path / "ce"
    save_tiny(ce_path, FAMILIES["bert"][0](num_labels=1))
    ce = LLM(str(ce_path))
    a = ce.score("where is the cat", ["on a mat", "no"], pooling_params=PoolingParams(use_activation=False),
                 use_tqdm=False)
    b = ce.score("where is the cat", ["on a mat", "no"], use_activation=False, use_tqdm=False)
    assert [x.outputs.score for x in a] == [x.outputs.score for x in b]
    with pytest.raises(TypeError, match="one PoolingParams for every pair"):
        ce.score("a", ["b"], pooling_params=[one])
    # vLLM's task names for a score call (its newest "classify", its older "score"), and
    # its older names for use_activation
    for params in (PoolingParams(use_activation=False, task="classify"), PoolingParams(softmax=False, task="score"),
                   PoolingParams(activation=False)):
        c = ce.score("where is the cat", ["on a mat", "no"], pooling_params=params, use_tqdm=False)
        assert [x.outputs.score for x in c] == [x.outputs.score for x in b], params
    assert [x.outputs.score for x in a] != [x.outputs.score for x in ce.score("where is the cat", ["on a mat", "no"],
                                                                              use_tqdm=False)]


def test_use_tqdm_callable_makes_the_bar(small_llm):
    """vLLM's use_tqdm may be a callable (a tqdm class): it makes the progress bar."""
    from tqdm import tqdm

    llm, _ = small_llm
    made = []

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, disable=True, **kwargs)

    out = llm.classify(["the cat", "a dog", "the mat"], use_tqdm=Bar)
    assert [m["total"] for m in made] == [3] and made[0]["desc"] == "Classifying"
    assert [o.outputs.probs for o in out] == [o.outputs.probs for o in llm.classify(["the cat", "a dog", "the mat"],
                                                                                     use_tqdm=False)]


def test_vllm_constructor_keywords(small_llm):
    """The LLM keywords vLLM scripts pass that change nothing here are taken (checked); more
    than one GPU per engine, or a task this engine does not run, is refused."""
    llm, path = small_llm
    same = LLM(str(path), max_model_len=16, task="classify", trust_remote_code=True, seed=0, tensor_parallel_size=1,
               gpu_memory_utilization=0.9)
    a = same.encode(["the cat", "a dog"], use_tqdm=False)
    b = llm.encode(["the cat", "a dog"], use_tqdm=False)
    assert a[0].outputs == b[0].outputs and a[0].outputs != b[1].outputs  # PoolingOutput compares its tensors
    for kwargs, err, match in [({"tensor_parallel_size": 2}, ValueError, "one model per GPU"),
                               ({"data_parallel_size": 4}, ValueError, "one model per GPU"),
                               ({"task": "embed"}, ValueError, "task='embed' is not supported"),
                               ({"gpu_memory_utilization": 1.5}, ValueError, r"in \(0, 1\]"),
                               ({"seed": "0"}, TypeError, "seed must be an int"),
                               ({"swap_space": 4}, TypeError, "swap_space")]:
        with pytest.raises(err, match=match):
            LLM(str(path), **kwargs)


def test_none_adapters_need_no_lora(small_llm):
    """lora_request=[None, ...]: the base model for every prompt, LoRA enabled or not (vLLM)."""
    llm, _ = small_llm
    a = llm.classify(["the cat", "a dog"], lora_request=[None, None], use_tqdm=False)
    b = llm.classify(["the cat", "a dog"], use_tqdm=False)
    assert [x.outputs.probs for x in a] == [x.outputs.probs for x in b]


def test_tokenisation_in_chunks_with_a_progress_bar(cross_encoder, capsys):
    """Text is tokenised a chunk at a time (here 3 texts, to see several), with a
    "Tokenizing" bar past one chunk: the same token ids and numbers as in one call."""
    path, _, tok = cross_encoder
    llm = LLM(str(path))
    texts = [" ".join(WORDS[i:i + 3 + i % 5]) for i in range(8)]
    whole = llm.score("where is the cat", texts, use_tqdm=False)
    llm.engine.inputs.CHUNK = 3
    chunked = llm.score("where is the cat", texts, use_tqdm=True)
    assert "Tokenizing" in capsys.readouterr().err
    assert [o.prompt_token_ids for o in chunked] == [tok("where is the cat", text_pair=t)["input_ids"] for t in texts]
    assert [o.outputs.score for o in chunked] == [o.outputs.score for o in whole]
    got = llm.classify(texts + [{"prompt_token_ids": [2, 7, 3]}], use_tqdm=False)
    assert [o.prompt_token_ids for o in got[:-1]] == [tok(t)["input_ids"] for t in texts]


def test_vllm_style_construction(small_llm):
    """The reference page's own call: LLM(model=..., runner="pooling")."""
    llm, good = small_llm
    (out,) = LLM(model=str(good), runner="pooling").classify("the cat sat", use_tqdm=False)
    assert out.outputs.probs == llm.classify("the cat sat", use_tqdm=False)[0].outputs.probs


def test_triton_backend_matches_transformers(tmp_path):
    # The whole BERT engine through the Triton kernels (the interpreter on CPU): fused
    # embedding + LayerNorm, varlen attention, add + LayerNorm, pooled gather and the
    # activation plug in through the op surface. Short prompts keep the interpreter fast.
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=3), seed=8)
    texts = ["the cat", "a dog sat on the mat", "why"]
    llm = LLM(str(tmp_path), kernel_backend="triton")
    assert {llm.engine.ops.chosen[k] for k in ("varlen_attention", "embed_layer_norm", "add_layer_norm",
                                                "activation")} == {"triton"}
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    ref = hf_probs(model, tok, texts, "softmax")
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)


def test_failed_batch_names_its_requests_and_leaves_the_rest(small_llm, monkeypatch):
    # A batch budget of 16 tokens puts the two requests in separate batches.
    from pyengine.engine import BatchError, Request
    from pyengine.inputs import TokenizedPrompt

    llm, _ = small_llm
    core = llm.engine
    monkeypatch.setattr(core.cfg, "max_num_batched_tokens", 16)
    short, long_ = Request("s", TokenizedPrompt([2, 5, 3]), None), Request("l", TokenizedPrompt([2] * 15), None)
    core.add_request(short)
    core.add_request(long_)
    launch = core.launch_batch

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(core, "launch_batch", boom)
    with pytest.raises(BatchError, match="RuntimeError: boom") as info:
        core.step()
    assert info.value.request_ids == ["s"]
    assert list(core.waiting) == ["l"]
    monkeypatch.setattr(core, "launch_batch", launch)
    finished = core.step()
    assert [r.request_id for r in finished] == ["l"] and finished[0].output.shape == (3,)
    assert not core.has_unfinished()


def test_a_failed_call_leaves_nothing_queued(small_llm, monkeypatch):
    """LLM.classify whose first batch fails drops the call's other requests, so the next
    call counts only its own."""
    from pyengine.engine import BatchError

    llm, _ = small_llm
    monkeypatch.setattr(llm.engine.cfg, "max_num_seqs", 2)
    launch, calls = llm.engine.launch_batch, []

    def first_fails(*args):
        calls.append(len(args[0]))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return launch(*args)

    monkeypatch.setattr(llm.engine, "launch_batch", first_fails)
    with pytest.raises(BatchError, match="boom"):
        llm.classify(["a cat", "the dog", "a mat", "why"], use_tqdm=False)
    assert not llm.engine.has_unfinished() and calls == [2]
    (out,) = llm.classify(["the cat"], use_tqdm=False)
    assert out.prompt_token_ids == llm.get_tokenizer()("the cat")["input_ids"]


def test_a_request_that_waited_too_long_runs_next(small_llm, monkeypatch):
    """Batches take the shortest prompts first; one that has waited past MAX_WAIT_S
    anchors the next batch instead, so a stream of short prompts cannot starve it."""
    from pyengine.engine import Request
    from pyengine.inputs import TokenizedPrompt

    llm, _ = small_llm
    core = llm.engine
    monkeypatch.setattr(core.cfg, "max_num_seqs", 2)
    long_ids = [2] + [9] * 20 + [3]
    core.add_request(Request("old", TokenizedPrompt(long_ids), None, arrival=time.monotonic() - 10 * core.MAX_WAIT_S))
    for i in range(4):
        core.add_request(Request(f"s{i}", TokenizedPrompt([2, 9, 3]), None))
    assert "old" in [r.request_id for r in core.step()]
    while core.has_unfinished():
        core.step()
    # The same queue with a fresh long request: the short ones go first.
    core.add_request(Request("new", TokenizedPrompt(long_ids), None))
    for i in range(4):
        core.add_request(Request(f"t{i}", TokenizedPrompt([2, 9, 3]), None))
    assert "new" not in [r.request_id for r in core.step()]
    while core.has_unfinished():
        core.step()


# ------------------------------------------------------------------ batches in flight
# On CUDA the engine keeps two batches in flight; on the CPU a launch finishes the work,
# so these tests set pipeline_depth=2 and stand a logged event in for the CUDA one.
@pytest.fixture(scope="module")
def pipe_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    factory, _ = FAMILIES["bert"]
    save_tiny(path, factory(num_labels=3), seed=4)
    return path


class _Event:
    """A completed event that logs its wait and can raise the error a device would."""

    def __init__(self, pipe, k):
        self.pipe, self.k = pipe, k

    def synchronize(self):
        self.pipe.log.append(("wait", self.k))
        if self.k in self.pipe.fail_wait:
            raise RuntimeError(f"device fault in batch {self.k}")

    def query(self):
        return True


class Pipeline:
    """Wraps a core's launch_batch: numbers the launches, logs launches and waits, and
    fails the launches or waits it is told to."""

    def __init__(self, core, monkeypatch):
        self.log, self.batches, self.fail_launch, self.fail_wait = [], [], set(), set()
        launch = core.launch_batch

        def wrapped(prompts, activations, lora=None):
            k = len(self.batches)
            self.batches.append([p.token_ids for p in prompts])
            self.log.append(("launch", k))
            if k in self.fail_launch:
                raise RuntimeError(f"launch {k} failed")
            pending = launch(prompts, activations, lora)
            pending.ready = _Event(self, k)
            return pending

        monkeypatch.setattr(core, "launch_batch", wrapped)


def _llm(path, depth, **kw):
    """An LLM with ``depth`` batches in flight whose batching does not depend on timing
    (no request ever counts as waited too long), so two runs cut the same batches."""
    llm = LLM(str(path), **kw)
    llm.engine.pipeline_depth = depth
    llm.engine.MAX_WAIT_S = float("inf")
    return llm


def _prompts(n, seed, vocab=160, max_len=12, head=(2,)):
    """n distinct token-id prompts of 1 to max_len tokens (a batch's prompts name its requests)."""
    g, out = random.Random(seed), {}
    while len(out) < n:
        p = list(head) + [g.randrange(5, vocab) for _ in range(g.randint(0, max_len - 1 - len(head)))] + [3]
        out[tuple(p)] = p
    return list(out.values())


def _queue(core, prompts, prefix="r", act="softmax"):
    from pyengine.engine import Request
    from pyengine.inputs import TokenizedPrompt

    reqs = [Request(f"{prefix}{i}", TokenizedPrompt(p), act) for i, p in enumerate(prompts)]
    for r in reqs:
        core.add_request(r)
    return reqs


def _reference(path, prompts, **kw):
    """Outputs of the synchronous path (depth 1) with the same batching, by token ids."""
    core = _llm(path, 1, **kw).engine
    reqs = _queue(core, prompts)
    while core.has_unfinished():
        core.step()
    return [r.output for r in reqs]


def test_two_in_flight_equals_the_synchronous_path(pipe_path, cross_encoder):
    # Many ragged prompts in small batches: bit-identical to depth 1, for classify and
    # for scoring (token types, and per-request activations in one batch).
    texts = random_texts(300, random.Random(21), max_words=30)
    llm1 = _llm(pipe_path, 1, max_num_seqs=7, max_num_batched_tokens=96)
    llm2 = _llm(pipe_path, 2, max_num_seqs=7, max_num_batched_tokens=96)
    a = [o.outputs.data for o in llm1.encode(texts, use_tqdm=False)]
    b = [o.outputs.data for o in llm2.encode(texts, use_tqdm=False)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    path, _, _ = cross_encoder
    s1, s2 = _llm(path, 1, max_num_seqs=5), _llm(path, 3, max_num_seqs=5)
    q, docs = "who sat on the mat", random_texts(40, random.Random(22))
    assert [o.outputs.score for o in s1.score(q, docs, use_tqdm=False)] == \
           [o.outputs.score for o in s2.score(q, docs, use_tqdm=False)]
    # Raw logits and activations mixed in one batch.
    core1, core2 = s1.engine, s2.engine
    prompts = _prompts(30, 23)
    outs = []
    for core in (core1, core2):
        reqs = _queue(core, prompts[:15], "a", None) + _queue(core, prompts[15:], "b", "sigmoid")
        while core.has_unfinished():
            core.step()
        outs.append(torch.stack([r.output for r in reqs]))
    assert torch.equal(*outs)


def test_next_batch_launches_before_the_previous_is_awaited(pipe_path, monkeypatch):
    core = _llm(pipe_path, 2, max_num_seqs=4).engine
    pipe = Pipeline(core, monkeypatch)
    prompts = _prompts(10, 24)
    reqs = _queue(core, prompts)
    finished = []
    while core.has_unfinished():
        finished.append(core.step())
    assert pipe.log == [("launch", 0), ("launch", 1), ("wait", 0), ("launch", 2), ("wait", 1), ("wait", 2)]
    assert [len(f) for f in finished] == [4, 4, 2]
    assert core.step() == [] and core.num_unfinished() == 0
    ref = _reference(pipe_path, prompts, max_num_seqs=4)
    assert all(torch.equal(r.output, o) for r, o in zip(reqs, ref))


def test_has_unfinished_counts_batches_in_flight(pipe_path, monkeypatch):
    core = _llm(pipe_path, 2, max_num_seqs=3).engine
    pipe = Pipeline(core, monkeypatch)
    _queue(core, _prompts(6, 25))
    assert core.num_unfinished() == 6
    first = core.step()
    assert len(first) == 3 and pipe.log[-1] == ("wait", 0)
    # Nothing waits any more; the second batch is launched and not yet awaited.
    assert len(core.waiting) == 0 and len(core.running) == 3
    assert core.has_unfinished() and core.num_unfinished() == 3
    assert len(core.step()) == 3 and not core.has_unfinished() and core.num_unfinished() == 0


def test_abort_of_a_request_in_flight_drops_its_output(pipe_path, monkeypatch):
    core = _llm(pipe_path, 2, max_num_seqs=4).engine
    pipe = Pipeline(core, monkeypatch)
    prompts = _prompts(12, 26)
    reqs = _queue(core, prompts)
    first = core.step()  # batches 0 and 1 launched, 0 finished
    in_flight = list(core.running)
    assert len(first) == 4 and len(in_flight) == 4
    core.abort([in_flight[1], "no-such-id"])
    assert core.num_unfinished() == 7 and in_flight[1] not in core.running
    second = core.step()  # launches 2, finishes 1 without the aborted request
    assert [r.request_id for r in second] == [in_flight[0]] + in_flight[2:]
    aborted = next(r for r in reqs if r.request_id == in_flight[1])
    assert aborted.output is None
    # Aborting the whole batch in flight: it is never awaited, and nothing is returned for it.
    core.abort(list(core.running))
    assert core.running == {} and not core.has_unfinished() and core.num_unfinished() == 0
    assert core.step() == []
    assert pipe.log == [("launch", 0), ("launch", 1), ("wait", 0), ("launch", 2), ("wait", 1)]
    ref = _reference(pipe_path, prompts, max_num_seqs=4)
    for r, o in zip(reqs, ref):
        if r.output is not None:
            assert torch.equal(r.output, o)
    # A new request may reuse an aborted id; the engine still works.
    _queue(core, prompts[:1], prefix=in_flight[1])
    assert len(core.step()) == 1 and not core.has_unfinished()


@pytest.mark.parametrize("where", ["wait", "launch"])
def test_a_failed_batch_names_its_requests_and_the_other_in_flight_completes(pipe_path, monkeypatch, where):
    # Batch 1 fails while batch 0 (a failed launch) or batch 2 (a failed wait) is in
    # flight: the error names batch 1's requests only, the other batch still delivers.
    from pyengine.engine import BatchError

    core = _llm(pipe_path, 2, max_num_seqs=4).engine
    pipe = Pipeline(core, monkeypatch)
    prompts = _prompts(14, 27)
    reqs = _queue(core, prompts)
    by_id = {r.request_id: r for r in reqs}
    finished = []
    if where == "wait":
        pipe.fail_wait.add(1)
        finished += core.step()  # launches batches 0 and 1, finishes 0
        batch1 = set(core.running)
        with pytest.raises(BatchError, match="RuntimeError: device fault in batch 1") as info:
            core.step()  # launches batch 2, then waits for batch 1
        assert pipe.log == [("launch", 0), ("launch", 1), ("wait", 0), ("launch", 2), ("wait", 1)]
    else:
        pipe.fail_launch.add(1)
        with pytest.raises(BatchError, match="RuntimeError: launch 1 failed") as info:
            core.step()  # batch 0 launched, batch 1's launch fails
        batch1 = set(info.value.request_ids)
        assert pipe.log == [("launch", 0), ("launch", 1)]
    assert len(info.value.request_ids) == len(batch1) == 4
    assert set(info.value.request_ids) == batch1
    assert sorted(by_id[i].prompt.token_ids for i in batch1) == sorted(pipe.batches[1])
    assert not batch1 & set(core.running) and not batch1 & set(core.waiting)
    assert core.num_unfinished() == 14 - len(finished) - 4 and core.has_unfinished()
    # The other batch in flight completes; the engine carries on with the rest.
    while core.has_unfinished():
        finished += core.step()
    assert len(finished) == 10 and pipe.log[-1] == ("wait", 3)
    assert ("wait", 1) not in pipe.log if where == "launch" else True
    ref = dict(zip(by_id, _reference(pipe_path, prompts, max_num_seqs=4)))
    assert {r.request_id for r in finished} == set(by_id) - batch1
    for r in reqs:
        assert (r.output is None) == (r.request_id in batch1)
        if r.output is not None:
            assert torch.equal(r.output, ref[r.request_id])


def test_async_engine_with_two_batches_in_flight(pipe_path, monkeypatch):
    # The server's driver over a depth-2 core: concurrent callers get the synchronous
    # path's results (to the batch-invariance bar: their batches differ); a fault in one
    # batch fails exactly the callers with a sequence in it; a cancelled caller's
    # sequences are dropped; the loop carries on.
    import asyncio

    from pyengine.async_engine import AsyncEngine
    from pyengine.inputs import TokenizedPrompt

    prompts = _prompts(60, 28)
    ref = {tuple(p): o for p, o in zip(prompts, _reference(pipe_path, prompts, max_num_seqs=4))}
    core = _llm(pipe_path, 2, max_num_seqs=4).engine
    pipe = Pipeline(core, monkeypatch)
    pipe.fail_wait.add(2)
    engine = AsyncEngine(core)
    groups = [prompts[i:i + 3] for i in range(0, len(prompts), 3)]

    async def main():
        async def one(group):
            return await engine.run([TokenizedPrompt(p) for p in group], "softmax")

        cancelled = asyncio.ensure_future(one(_prompts(40, 29, head=(2, 4))))
        await asyncio.sleep(0)
        cancelled.cancel()
        results = await asyncio.gather(*(one(g) for g in groups), return_exceptions=True)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return results

    try:
        results = asyncio.run(main())
        wait_until = time.monotonic() + 20
        while engine.num_waiting() and time.monotonic() < wait_until:
            time.sleep(0.01)
        assert engine.num_waiting() == 0 and not core.has_unfinished()
    finally:
        engine.shutdown()
    failed = {tuple(p) for p in pipe.batches[2]}
    assert ("wait", 2) in pipe.log and any(isinstance(r, torch.Tensor) for r in results)
    for group, res in zip(groups, results):
        if any(tuple(p) in failed for p in group):
            assert isinstance(res, RuntimeError) and "device fault in batch 2" in str(res)
        else:
            # Batches here form as callers arrive: equal to the batch-invariance bar.
            assert torch.allclose(res, torch.stack([ref[tuple(p)] for p in group]), atol=1e-5, rtol=0)


def test_token_ids_of_an_int_subclass_are_ints(small_llm):
    """The exact-int fast path of the token check falls back for int subclasses."""
    import enum

    class Tok(enum.IntEnum):
        A = 2
        B = 5

    llm, _ = small_llm
    (plain,) = llm.classify([{"prompt_token_ids": [2, 5]}], use_tqdm=False)
    (sub,) = llm.classify([{"prompt_token_ids": [Tok.A, Tok.B]}], use_tqdm=False)
    assert sub.outputs.probs == plain.outputs.probs


def test_cpu_batches_are_filled_to_the_cpu_target(tmp_path):
    # On the CPU the engine fills batches to CPU_BATCH_TOKENS (faster than one large
    # pass: less works out of cache) while prompts up to max_model_len still run, a longer
    # one alone; the results are those of one large batch.
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=3), seed=3)
    texts = random_texts(12, random.Random(4)) + [" ".join(["dog"] * 40)]
    llm = LLM(str(tmp_path))
    ref = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    llm.engine.CPU_BATCH_TOKENS = 24
    sizes, real = [], llm.engine.launch_batch

    def spy(prompts, *args):
        sizes.append(sum(len(p.token_ids) for p in prompts))
        return real(prompts, *args)
    llm.engine.launch_batch = spy
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    long = len(tok(texts[-1])["input_ids"])
    assert long > 24 and long in sizes and len(sizes) > 2, sizes
    assert all(n <= 24 for n in sizes if n != long), sizes
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), report(got, ref)
    assert torch.allclose(got, hf_probs(model, tok, texts, "softmax"), atol=ATOL, rtol=0)


@pytest.mark.gpu
def test_a_model_on_another_gpu_than_the_current_one(tmp_path):
    """Triton launches on torch's current device: the engine makes its own device current
    for each batch, so a model on cuda:1 runs there while cuda:0 is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    factory, _ = FAMILIES["bert"]
    model, tok = save_tiny(tmp_path, factory(num_labels=3), seed=9)
    texts = random_texts(8, random.Random(6))
    torch.cuda.set_device(0)
    llm = LLM(str(tmp_path), device="cuda:1", dtype="float32", kernel_backend="triton")
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    ref = hf_probs(model, tok, texts, "softmax")
    assert torch.allclose(got, ref, atol=1e-3, rtol=0), report(got, ref)
