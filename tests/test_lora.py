"""LoRA adapters against PEFT's own PeftModel over transformers' models, on the same
base weights and adapter files (on CPU); on a GPU, bf16 against the CPU fp32 engine."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, DistilBertConfig, RobertaConfig

from pyengine import LLM, LoRARequest
from test_engine import report
from tiny import save_tiny

ATOL = 1e-4  # DESIGN's fp32 CPU bar on probabilities
LENS = [1, 3, 9, 17, 33, 60, 2, 25]
_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_DEC = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=512,
            pad_token_id=0)

# name -> (config factory, LoraConfig keywords). Together they cover q/k/v pieces of a
# packed qkv weight (narrower k/v under GQA), gate|up packed, Conv1D (in, out) weights,
# a LoRA on the fp32 pooler (merged), heads saved whole, rsLoRA and per-module
# rank/alpha patterns.
FAMILIES = {
    # q and v only (k's rows of qkv get no delta); pooler.dense and output dense too
    "bert": (lambda n: BertConfig(vocab_size=160, max_position_embeddings=64, num_labels=n, **_BERT),
             dict(target_modules=["query", "value", "dense"])),
    # classifier.dense/out_proj saved whole (modules_to_save), positions offset
    "roberta": (lambda n: RobertaConfig(vocab_size=160, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1,
                                        num_labels=n, **_BERT),
                dict(target_modules=["query", "key", "value", "intermediate.dense"])),
    # every linear, GQA 4:1, rsLoRA scale, per-module rank and alpha
    "qwen3": (lambda n: AutoConfig.for_model("qwen3", num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                             num_labels=n, **_DEC),
              dict(target_modules="all-linear", use_rslora=True, rank_pattern={"o_proj": 2},
                   alpha_pattern={"down_proj": 3.0})),
    # Conv1D weights stored (in, out): PEFT's fan_in_fan_out
    "gpt2": (lambda n: AutoConfig.for_model("gpt2", vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                            pad_token_id=0, num_labels=n),
             dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    # Gemma 3: sandwich norms and two rotary tables around the adapted projections
    "gemma3": (lambda n: AutoConfig.for_model("gemma3_text", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              sliding_window=4, query_pre_attn_scalar=16, num_labels=n, **_DEC),
               dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])),
    # DistilBERT's own names (q_lin ... lin1); its whole head (pre_classifier too) saved
    "distilbert": (lambda n: DistilBertConfig(vocab_size=160, max_position_embeddings=64, dim=32, n_layers=2, n_heads=4,
                                              hidden_dim=64, dropout=0.0, attention_dropout=0.0, num_labels=n),
                   dict(target_modules=["q_lin", "v_lin", "out_lin", "lin1"],
                        modules_to_save=["pre_classifier", "classifier"])),
}


def make_adapter(base_path, out, seed, r=4, **kw):
    """A PEFT sequence-classification LoRA with random A and B (not PEFT's zero B) and a
    perturbed copy of the head, saved to ``out``."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_path)
    cfg = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=r, lora_alpha=2 * r, init_lora_weights=False, **kw)
    model = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def peft_model(base_path, adapter=None):
    model = AutoModelForSequenceClassification.from_pretrained(base_path, attn_implementation="eager").eval()
    if adapter is None:
        return model
    return pytest.importorskip("peft").PeftModel.from_pretrained(model, adapter).eval()


def write_adapter(base_path, out, suffixes, r=4, seed=0, b_std=0.3):
    """A LoRA adapter in PEFT's file format written without PEFT: random A and B (B's
    entries N(0, b_std)) on every linear layer of the transformers model whose name ends
    in one of ``suffixes``."""
    model = AutoModelForSequenceClassification.from_pretrained(base_path)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or w.ndim != 2 or not name.endswith(tuple(suffixes)):
            continue
        # Conv1D keeps (in, out); the LoRA pair is a Linear's either way.
        n_in, n_out = w.shape if type(mod).__name__ == "Conv1D" else w.shape[::-1]
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * n_in ** -0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * b_std
    out.mkdir()
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r}))
    return out


def prompts_for(lens, seed, vocab=150):
    g = torch.Generator().manual_seed(seed)
    # ids from 5 up: clear of every tiny tokenizer's special and pad ids
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lens]


def reference(model, prompts):
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits.float()[0].softmax(-1) for p in prompts])


def probs(outs):
    return torch.tensor([o.outputs.probs for o in outs])


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    factory, kw = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    save_tiny(path, factory(3), tokenizer=None)
    a = make_adapter(path, path / "lora_a", seed=1, **kw)
    b = make_adapter(path, path / "lora_b", seed=2, r=8, **kw)
    return request.param, path, a, b


def test_mixed_adapters_match_peft(family):
    """One call mixing two adapters and the base model, cut into several batches: each
    prompt gets its own adapter's numbers."""
    _, path, a, b = family
    prompts = prompts_for(LENS * 3, seed=3)
    reqs = [LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b)), None]
    which = [reqs[i % 3] for i in range(len(prompts))]
    llm = LLM(str(path), kernel_backend="torch", enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=4)
    got = probs(llm.classify([{"prompt_token_ids": p} for p in prompts], lora_request=which, use_tqdm=False))
    refs = {None: reference(peft_model(path), prompts)}
    for r in reqs[:2]:
        refs[r] = reference(peft_model(path, r.lora_path), prompts)
        assert (refs[r] - refs[None]).abs().max() > 0.05, "the adapter barely changes the model: a weak test"
    ref = torch.stack([refs[w][i] for i, w in enumerate(which)])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m: f"{m}\n{report(got, ref)}")


def test_one_adapter_for_every_prompt_is_batch_invariant(family):
    _, path, a, _ = family
    prompts = prompts_for(LENS, seed=4)
    req = LoRARequest("a", 7, str(a))
    llm = LLM(str(path), kernel_backend="torch", enable_lora=True, max_lora_rank=8)
    packed = probs(llm.classify([{"prompt_token_ids": p} for p in prompts], lora_request=req, use_tqdm=False))
    alone = torch.cat([probs(llm.classify([{"prompt_token_ids": p}], lora_request=req, use_tqdm=False))
                       for p in prompts])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ engine plumbing
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_lora")
    factory, kw = FAMILIES["bert"]
    save_tiny(path, factory(3), tokenizer="wordpiece")
    return path, make_adapter(path, path / "a", seed=5, **kw), make_adapter(path, path / "b", seed=6, **kw)


def test_score_and_text_prompts_with_an_adapter(tmp_path):
    """score() on a cross-encoder adapter: pairs tokenised as the tokenizer does, the
    adapter's head, sigmoid."""
    factory, kw = FAMILIES["bert"]
    _, tok = save_tiny(tmp_path, factory(1), tokenizer="wordpiece")
    a = make_adapter(tmp_path, tmp_path / "a", seed=8, **kw)
    llm = LLM(str(tmp_path), kernel_backend="torch", enable_lora=True)
    docs = ["the cat sat on a mat", "why is it blue", "no"]
    got = torch.tensor([o.outputs.score for o in llm.score("where is the cat", docs, use_tqdm=False,
                                                           lora_request=LoRARequest("a", 1, str(a)))])
    model = peft_model(tmp_path, a)
    with torch.no_grad():
        ref = torch.stack([model(**tok("where is the cat", text_pair=d, return_tensors="pt")).logits[0, 0].sigmoid()
                           for d in docs])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_least_recently_used_adapter_is_dropped_and_reloaded(bert):
    path, a, b = bert
    prompts = prompts_for([4, 11, 30], seed=9)
    ra, rb = LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b))
    llm = LLM(str(path), kernel_backend="torch", enable_lora=True, max_loras=1)
    ref = {r: reference(peft_model(path, r.lora_path), prompts) for r in (ra, rb)}
    for r in (ra, rb, ra):
        got = probs(llm.classify([{"prompt_token_ids": p} for p in prompts], lora_request=r, use_tqdm=False))
        torch.testing.assert_close(got, ref[r], atol=ATOL, rtol=0)
        assert [x.name for x in llm.engine.lora.loaded()] == [r.lora_name]
        # the drops are emptied at each launch, CUDA graphs or not: the list stays bounded
        assert not llm.engine.lora.dropped


def test_one_batch_mixes_adapters_in_runs(bert):
    """Two adapters and the base model in one call under a budget that holds them all: one
    batch, each adapter's sequences in one run, each prompt with its own numbers."""
    path, a, b = bert
    prompts = prompts_for([5, 12, 3, 30, 8, 1, 19, 7, 2], seed=17)
    ra, rb = LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b))
    which = [ra, None, rb, rb, None, ra, ra, rb, None]
    llm = LLM(str(path), kernel_backend="torch", enable_lora=True, max_loras=2)
    core, seen = llm.engine, []
    launch = core.launch_batch

    def spy(prompts_, activations, loras=None):
        seen.append([None if x is None else x.name for x in loras])
        return launch(prompts_, activations, loras)

    core.launch_batch = spy
    got = probs(llm.classify([{"prompt_token_ids": p} for p in prompts], lora_request=which, use_tqdm=False))
    assert len(seen) == 1, seen
    runs = [k for i, k in enumerate(seen[0]) if i == 0 or k != seen[0][i - 1]]
    assert sorted(runs, key=str) == sorted([None, "a", "b"], key=str), seen  # one run per adapter
    refs = {None: reference(peft_model(path), prompts), ra: reference(peft_model(path, a), prompts),
            rb: reference(peft_model(path, b), prompts)}
    ref = torch.stack([refs[w][i] for i, w in enumerate(which)])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m: f"{m}\n{report(got, ref)}")


def test_adapter_on_the_triton_kernels(tmp_path):
    """Qwen3 with an adapter on the Triton kernels (interpreter on CPU): the LoRA deltas
    land in the packed qkv that qk_norm_rotary then rewrites in place, and in gate|up
    before gated_act; a mixed call matches the torch backend."""
    factory, _ = FAMILIES["qwen3"]
    save_tiny(tmp_path, factory(3), tokenizer=None)
    a = write_adapter(tmp_path, tmp_path / "a", ["q_proj", "k_proj", "gate_proj", "up_proj", "o_proj"], seed=18)
    prompts = [{"prompt_token_ids": p} for p in prompts_for([1, 5, 9], seed=19)]
    which = [LoRARequest("a", 1, str(a)), None, LoRARequest("a", 1, str(a))]
    torch_llm = LLM(str(tmp_path), kernel_backend="torch", enable_lora=True)
    ref = probs(torch_llm.classify(prompts, lora_request=which, use_tqdm=False))
    base = probs(torch_llm.classify(prompts, use_tqdm=False))
    assert (ref - base)[[0, 2]].abs().max() > 0.05, "the adapter changes nothing: a weak test"
    got = probs(LLM(str(tmp_path), kernel_backend="triton", enable_lora=True).classify(
        prompts, lora_request=which, use_tqdm=False))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_a_reused_id_never_shares_a_batch_with_the_dropped_adapter(bert):
    """max_loras=1: adapter a (id 1) is dropped while its requests wait, and another
    adapter is loaded under id 1; the waiting requests keep their own adapter."""
    from pyengine.engine import Request
    from pyengine.inputs import TokenizedPrompt

    path, a, b = bert
    prompts = prompts_for([4, 9, 15, 6], seed=16)
    core = LLM(str(path), kernel_backend="torch", enable_lora=True, max_loras=1).engine
    (first,) = core.lora_adapters(LoRARequest("a", 1, str(a)), 1)
    core.lora_adapters(LoRARequest("b", 2, str(b)), 1)  # drops a
    (second,) = core.lora_adapters(LoRARequest("b-again", 1, str(b)), 1)
    assert first.id == second.id and first.key != second.key
    reqs = [Request(str(i), TokenizedPrompt(p), "softmax", first if i % 2 else second) for i, p in enumerate(prompts)]
    for r in reqs:
        core.add_request(r)
    while core.has_unfinished():
        core.step()
    ref = {first: reference(peft_model(path, a), prompts), second: reference(peft_model(path, b), prompts)}
    got = torch.stack([r.output for r in reqs])
    torch.testing.assert_close(got, torch.stack([ref[r.lora][i] for i, r in enumerate(reqs)]), atol=ATOL, rtol=0)


def test_graphs_per_adapter_and_mixed_batches_eager(bert):
    """With a graph runner in place (recorded captures on CPU): a batch whose prompts all
    run one adapter replays a graph of that adapter's own (the padding rows get its deltas
    too, harmlessly); a batch mixing an adapter and the base model runs eagerly; each
    gets its own numbers."""
    from test_cuda_graph import RecordedGraphs

    path, a, b = bert
    prompts = [{"prompt_token_ids": p} for p in prompts_for([5, 20, 9, 33], seed=10)]
    ids = [p["prompt_token_ids"] for p in prompts]
    ra, rb = LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b))
    llm = LLM(str(path), kernel_backend="torch", enable_lora=True, max_loras=2, max_num_batched_tokens=128)
    eng = llm.engine
    eng.graphs = RecordedGraphs(eng.model, 128, 256, eng.max_model_len, "cpu")
    refs = {r: reference(peft_model(path, r.lora_path), ids) for r in (ra, rb)}
    refs[None] = reference(peft_model(path), ids)
    for r in (ra, rb, None, ra):  # the second run of a replays a's graph
        got = probs(llm.classify(prompts, lora_request=r, use_tqdm=False))
        torch.testing.assert_close(got, refs[r], atol=ATOL, rtol=0)
    keys = {key[2] for key in eng.graphs.graphs}
    assert len(keys) == 3 and 0 in keys, eng.graphs.graphs.keys()  # a's, b's and the base model's
    assert eng.graphs.eager_runs == 3  # each set's first batch ran eagerly before its capture
    n_graphs = len(eng.graphs.graphs)
    mixed = probs(llm.classify(prompts, lora_request=[ra, None, ra, None], use_tqdm=False))
    assert len(eng.graphs.graphs) == n_graphs and eng.graphs.eager_runs == 3, "a mixed batch used the runner"
    want = torch.stack([refs[r][i] for i, r in enumerate([ra, None, ra, None])])
    torch.testing.assert_close(mixed, want, atol=ATOL, rtol=0)

def test_dropped_adapters_free_their_graphs(bert):
    """max_loras=1: loading b drops a, and a's graphs go with it (freed on the engine's
    thread at the next launch); a request still holding a runs eagerly, with a, and
    captures nothing that would keep a's weights."""
    from test_cuda_graph import RecordedGraphs

    from pyengine.engine import Request
    from pyengine.inputs import TokenizedPrompt

    path, a, b = bert
    ids = prompts_for([5, 20, 9], seed=20)
    prompts = [{"prompt_token_ids": p} for p in ids]
    ra, rb = LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b))
    llm = LLM(str(path), kernel_backend="torch", enable_lora=True, max_loras=1, max_num_batched_tokens=128)
    eng = llm.engine
    eng.graphs = RecordedGraphs(eng.model, 128, 256, eng.max_model_len, "cpu")
    llm.classify(prompts, lora_request=ra, use_tqdm=False)
    (held,) = eng.lora_adapters(ra, 1)
    assert {k[2] for k in eng.graphs.graphs} == {held.key}
    llm.classify(prompts, lora_request=rb, use_tqdm=False)
    (kept,) = eng.lora_adapters(rb, 1)
    assert not eng.lora.holds(held) and {k[2] for k in eng.graphs.graphs} == {kept.key}
    reqs = [Request(f"late-{i}", TokenizedPrompt(p), "softmax", held) for i, p in enumerate(ids)]
    for r in reqs:
        eng.add_request(r)
    while eng.has_unfinished():
        eng.step()
    assert {k[2] for k in eng.graphs.graphs} == {kept.key}, "a dropped adapter's batch was captured"
    torch.testing.assert_close(torch.stack([r.output for r in reqs]), reference(peft_model(path, a), ids),
                               atol=ATOL, rtol=0)


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_adapters_fail_before_any_work(bert, tmp_path):
    path, a, _ = bert
    llm = LLM(str(path), kernel_backend="torch", enable_lora=True, max_lora_rank=8)
    other = tmp_path / "other"
    save_tiny(other, FAMILIES["bert"][0](2), tokenizer=None)  # two labels: its head does not fit
    qwen = tmp_path / "qwen"
    save_tiny(qwen, FAMILIES["qwen3"][0](3), tokenizer=None)
    (tmp_path / "empty").mkdir()
    deeper = FAMILIES["bert"][0](3)
    deeper.num_hidden_layers = 4  # the same width and head: only its layer count tells it apart
    save_tiny(tmp_path / "deeper", deeper, tokenizer=None)
    cases = [
        (LoRARequest("x", 1, str(tmp_path / "missing")), FileNotFoundError, "does not exist"),
        (LoRARequest("x", 1, str(make_adapter(tmp_path / "deeper", tmp_path / "deep_a", seed=1,
                                              target_modules=["query"], layers_to_transform=[3]))),
         ValueError, r"layer\.3\.attention\.self\.query adapts layer 3, but this model has 2 layers"),
        # PEFT's variants whose tensors are not a plain B @ A
        (LoRARequest("x", 1, str(_edited(a, tmp_path / "kasa", kasa_config={"r": 4}))), ValueError, "KaSA"),
        # a hand-edited config: clear errors, not a crash in the middle of loading
        (LoRARequest("x", 1, str(_edited(a, tmp_path / "ap_list", alpha_pattern=["query"]))), ValueError,
         "alpha_pattern must be an object of pattern -> number, got list"),
        (LoRARequest("x", 1, str(_edited(a, tmp_path / "ap_re", alpha_pattern={"query[": 8}))), ValueError,
         r"alpha_pattern key 'query\[' is not a regular expression"),
        (LoRARequest("x", 1, str(_edited(a, tmp_path / "ap_str", rank_pattern={"query": "8"}))), ValueError,
         r"rank_pattern\['query'\]='8' is not a positive number"),
        (LoRARequest("x", 1, str(tmp_path / "empty")), FileNotFoundError, "not a PEFT adapter"),
        (LoRARequest("x", 1, str(_edited(a, tmp_path / "dora", use_dora=True))), ValueError, "DoRA"),
        (LoRARequest("x", 1, str(_edited(a, tmp_path / "bias", bias="all"))), ValueError, "bias='all'"),
        (LoRARequest("x", 1, str(make_adapter(path, tmp_path / "big", seed=1, r=16, target_modules=["query"]))),
         ValueError, "rank 16, over max_lora_rank=8"),
        (LoRARequest("x", 1, str(make_adapter(path, tmp_path / "emb", seed=1, target_modules=["word_embeddings"]))),
         ValueError, "LoRA on embeddings"),
        (LoRARequest("x", 1, str(make_adapter(other, tmp_path / "labels", seed=1, target_modules=["query"]))),
         ValueError, r"classifier\.(weight|bias) has shape \(2"),
        (LoRARequest("x", 1, str(make_adapter(qwen, tmp_path / "qwen_a", seed=1, target_modules=["q_proj"]))),
         ValueError, "(saved weight score.weight has no counterpart|is not a linear layer) (in|of) this model"),
    ]
    prompts = [{"prompt_token_ids": p} for p in prompts_for([3, 8], seed=11)]
    for req, exc, needle in cases:
        with pytest.raises(exc, match=needle):
            llm.classify(prompts, lora_request=req, use_tqdm=False)
        assert not llm.engine.has_unfinished()
    good = LoRARequest("a", 1, str(a))
    llm.classify(prompts, lora_request=good, use_tqdm=False)
    with pytest.raises(ValueError, match="lora_int_id 1 is already used by adapter 'a'"):
        llm.classify(prompts, lora_request=LoRARequest("b", 1, str(tmp_path / "dora")), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_request has 1 entries for 2 prompts"):
        llm.classify(prompts, lora_request=[good], use_tqdm=False)
    with pytest.raises(TypeError, match="must be a LoRARequest"):
        llm.classify(prompts, lora_request=str(a), use_tqdm=False)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        LLM(str(path), kernel_backend="torch").classify(prompts, lora_request=good, use_tqdm=False)
    with pytest.raises(ValueError, match="lora_int_id must be an int >= 1"):
        LoRARequest("a", 0, str(a))


# ------------------------------------------------------------------ GPU
def test_adapter_written_without_peft_matches_merged_transformers(tmp_path):
    """The file format alone (no PEFT installed): the same numbers as transformers' model
    with each adapted weight merged in float64, W + (alpha / r) B A."""
    factory, _ = FAMILIES["qwen3"]
    save_tiny(tmp_path, factory(3), tokenizer=None)
    a = write_adapter(tmp_path, tmp_path / "a", ["q_proj", "v_proj", "up_proj", "down_proj"], seed=14)
    prompts = prompts_for([1, 6, 40, 13], seed=15)
    got = probs(LLM(str(tmp_path), kernel_backend="torch", enable_lora=True).classify(
        [{"prompt_token_ids": p} for p in prompts], lora_request=LoRARequest("a", 1, str(a)), use_tqdm=False))
    from safetensors.torch import load_file

    model = peft_model(tmp_path)
    lora = load_file(a / "adapter_model.safetensors")
    with torch.no_grad():
        for name, mod in model.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in lora:
                delta = lora[key.replace("lora_A", "lora_B")].double() @ lora[key].double() * 2.0
                mod.weight.copy_((mod.weight.double() + delta).float())
    ref = reference(model, prompts)
    assert (ref - reference(peft_model(tmp_path), prompts)).abs().max() > 0.05, "the adapter changes nothing"
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m: f"{m}\n{report(got, ref)}")


@pytest.mark.gpu
@pytest.mark.parametrize("name,suffixes", [
    ("bert", ["query", "key", "value", "dense"]),  # the pooler's dense merged into the fp32 head
    ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),  # GQA, gate|up
])
def test_adapters_in_bf16_on_gpu(name, suffixes, tmp_path):
    """bf16 on the default kernels against the CPU fp32 engine (checked against PEFT
    above), DESIGN's bf16 bar: half the prompts with an adapter (batches mixing both run
    eagerly), then every prompt with it (graphs of the adapter's own), then none (the base
    model's graphs)."""
    factory, _ = FAMILIES[name]
    # Weights of N(0, 0.1) and a milder adapter: with the CPU tests' N(0, 0.3) these tiny
    # models turn bf16 rounding into probability errors over 2e-2 in plain torch too.
    save_tiny(tmp_path, factory(3), tokenizer=None, std=0.1)
    a = write_adapter(tmp_path, tmp_path / "a", suffixes, seed=12, b_std=0.15)
    lora = LoRARequest("a", 1, str(a))
    prompts = [{"prompt_token_ids": p} for p in prompts_for([1, 7, 60, 33, 5, 50, 17, 2] * 4, seed=13)]
    calls = [[lora if i % 2 else None for i in range(len(prompts))], lora, None]
    llm = LLM(str(tmp_path), dtype="bfloat16", enable_lora=True, max_num_seqs=8)
    assert llm.engine.graphs is not None
    got = [probs(llm.classify(prompts, lora_request=r, use_tqdm=False)) for r in calls]
    keys = {key[2] for key in llm.engine.graphs.graphs}
    assert 0 in keys and len(keys) == 2, "the base model's and the adapter's batches did not each replay graphs"
    cpu = LLM(str(tmp_path), device="cpu", kernel_backend="torch", enable_lora=True)
    refs = [probs(cpu.classify(prompts, lora_request=r, use_tqdm=False)) for r in calls]
    assert (refs[1] - refs[2]).abs().max() > 0.05, "the adapter changes nothing: a weak test"
    for g, r in zip(got, refs):
        assert (g - r).abs().max() < 2e-2, report(g, r)
        assert (g.argmax(-1) == r.argmax(-1)).float().mean() >= 0.99
