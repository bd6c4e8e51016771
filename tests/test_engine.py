"""The engine on the torch backend against transformers' own BERT-family models."""
import random

import pytest
import torch
from transformers import BertConfig, ErnieConfig, RobertaConfig, XLMRobertaConfig

from pyengine import LLM, PoolerConfig
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


def test_score_activation_from_sentence_transformers(tmp_path):
    factory, _ = FAMILIES["bert"]
    cfg = factory(num_labels=1)
    cfg.sentence_transformers = {"activation_fn": "torch.nn.modules.linear.Identity"}
    model, tok = save_tiny(tmp_path, cfg, seed=6)
    llm = LLM(str(tmp_path))
    got = torch.tensor([o.outputs.score for o in llm.score("the cat", ["a dog", "the mat"], use_tqdm=False)])
    ref = hf_probs(model, tok, ["the cat"] * 2, "identity", pairs=["a dog", "the mat"])[:, 0]
    assert torch.allclose(got, ref, atol=ATOL, rtol=0)


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


def test_truncate_minus_one_is_max_model_len(tmp_path):
    factory, _ = FAMILIES["bert"]
    save_tiny(tmp_path, factory(num_labels=2))
    llm = LLM(str(tmp_path), max_model_len=16)
    long = " ".join(["cat"] * 40)
    out = llm.classify(long, truncate_prompt_tokens=-1, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == 16
    with pytest.raises(ValueError, match=r"prompts\[0\] has 42 tokens, more than max_model_len=16"):
        llm.classify(long, use_tqdm=False)


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


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad")
    factory, _ = FAMILIES["bert"]
    save_tiny(path, factory(num_labels=3))
    return LLM(str(path), max_model_len=16), path


@pytest.mark.parametrize("call,err,match", [
    (lambda l: l.classify(["the cat", " ".join(["dog"] * 30)]), ValueError,
     r"prompts\[1\] has 32 tokens, more than max_model_len=16"),
    (lambda l: l.classify(["the cat", ""]), ValueError, r"prompts\[1\] is empty"),
    (lambda l: l.classify([{"prompt_token_ids": []}]), ValueError, r"prompts\[0\] is empty"),
    (lambda l: l.classify([{"prompt_token_ids": [2, 5, 100000]}]), ValueError,
     r"prompts\[0\] has token id 100000 outside the vocabulary \[0, 160\)"),
    (lambda l: l.classify([{"prompt_token_ids": [2, -1]}]), ValueError, r"token id -1 outside"),
    (lambda l: l.classify([3]), TypeError, r"prompts\[0\] must be a str or a dict, got int"),
    (lambda l: l.classify([{"text": "x"}]), ValueError, r"without 'prompt' or 'prompt_token_ids'"),
    (lambda l: l.classify([]), ValueError, "empty list"),
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


def test_mismatched_pairs(cross_encoder):
    path, _, _ = cross_encoder
    llm = LLM(str(path))
    with pytest.raises(ValueError, match="1:1, 1:N or N:N; got 2 queries and 3 documents"):
        llm.score(["a", "b"], ["c", "d", "e"])
    with pytest.raises(ValueError, match=r"data_2\[1\] is empty"):
        llm.score("a", ["c", ""])


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
    with pytest.raises(ValueError, match="max_num_seqs must be a positive int"):
        LLM(str(good), max_num_seqs=0)
    with pytest.raises(ValueError, match="max_model_len=64 is larger than max_num_batched_tokens=32"):
        LLM(str(good), max_model_len=64, max_num_batched_tokens=32)
    assert LLM(str(good), max_num_batched_tokens=32).engine.max_model_len == 32
    with pytest.raises(ValueError, match="dtype must be"):
        LLM(str(good), dtype="int8")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        LLM(str(good), kernel_backend="opencl")
    with pytest.raises(RuntimeError, match="'cuda' is not available on cpu"):
        LLM(str(good), kernel_backend="cuda", device="cpu")


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
    run = core.run_batch

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(core, "run_batch", boom)
    with pytest.raises(BatchError, match="RuntimeError: boom") as info:
        core.step()
    assert info.value.request_ids == ["s"]
    assert list(core.waiting) == ["l"]
    monkeypatch.setattr(core, "run_batch", run)
    finished = core.step()
    assert [r.request_id for r in finished] == ["l"] and finished[0].output.shape == (3,)
    assert not core.has_unfinished()
