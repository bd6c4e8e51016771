"""CUDA graphs over bucketed batch shapes (pyengine.cuda_graph).

On the CPU: the buckets, the padded batch layout, and the runner's bookkeeping (static
buffer, one capture per bucket, replay reading new inputs, the graph limit) with the
capture replaced by a recorded eager forward over the same static views. On a GPU: real
captures against the eager engine.
"""
import random

import pytest
import torch
from transformers import AutoConfig, BertConfig

from pyengine import LLM
from pyengine.batch import RaggedBatch
from pyengine import cuda_graph
from pyengine.cuda_graph import GraphRunner, seq_buckets, token_buckets
from tiny import save_tiny

_BERT = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
_QWEN3 = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=512, pad_token_id=0, num_labels=3)


class RecordedGraphs(GraphRunner):
    """The runner with its capture swapped for a recorded eager forward: "replay" runs the
    model again on the batch captured first, whose tensors are views of the static
    buffer, and writes the static output. A new batch reaches the replay only through
    the buffer, as on a GPU; and as there, capturing computes nothing (NaN until the
    first replay)."""

    def _capture(self, batch, lora_batch):
        out = self._forward(batch, lora_batch).fill_(float("nan"))

        def replay():
            out.copy_(self._forward(batch, lora_batch))

        return replay, out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, cfg, tok in (("bert", BertConfig(**_BERT), "wordpiece"),
                           ("qwen3", AutoConfig.for_model("qwen3", **_QWEN3), "decoder")):
        path = tmp_path_factory.mktemp(name)
        save_tiny(path, cfg, tokenizer=tok, std=0.1)
        out[name] = str(path)
    return out


def _prompts(lens, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(n)] for n in lens]


def _eager(model, prompts, types=None):
    with torch.inference_mode():
        return model(RaggedBatch.build(prompts, types))


def test_buckets_cover_every_size_in_order():
    for max_tokens in (100, 2048, 2049, 16384 + 256):
        t = token_buckets(max_tokens)
        assert t == sorted(set(t)) and t[-1] == max_tokens and t[0] >= 1
        # Steps are 128 tokens up to 2048 and 256 above: the padding is bounded.
        assert all(b - a <= (128 if b <= 2048 else 256) for a, b in zip([0] + t, t))
    for max_seqs in (1, 3, 16, 257):
        s = seq_buckets(max_seqs)
        assert s == sorted(set(s)) and s[-1] == max_seqs and s[0] == 1
        assert all(b - a <= 16 for a, b in zip(s, s[1:]))


@pytest.mark.parametrize("T, B, want", [
    (1, 1, (128, 2)),          # the smallest buckets; the padding sequence takes 127 tokens
    (127, 1, (128, 2)),        # exactly full: one spare token for the one padding sequence
    (128, 1, (256, 2)),        # no spare token: the next token bucket
    (500, 15, (512, 16)),      # one spare sequence slot is enough
    (500, 16, (640, 32)),      # none spare: 16 padding sequences need 16 tokens, past 512
    (16384, 256, (16384 + 256, 258)),  # the largest batch the engine schedules
])
def test_bucket_leaves_room_for_padding(T, B, want):
    runner = GraphRunner(torch.nn.Identity(), 16384, 256, 512, "cpu")
    assert runner.bucket(T, B) == want
    Tb, Bb = want
    assert Tb - T >= Bb - B >= 1


def test_padding_sequences_never_pass_max_seqlen():
    """A model with few positions needs more padding sequences for the same spare tokens."""
    runner = GraphRunner(torch.nn.Identity(), 16384, 256, 8, "cpu")
    for T, B in ((1, 1), (100, 13), (2000, 250), (2048, 256)):
        Tb, Bb = runner.bucket(T, B)
        assert Bb - B <= Tb - T <= (Bb - B) * 8, (T, B, Tb, Bb)


def test_bucket_none_past_the_largest():
    runner = GraphRunner(torch.nn.Identity(), 1024, 8, 512, "cpu")
    assert runner.bucket(1024, 8) is not None  # the engine's largest batch
    Tmax, Bmax = runner.tokens[-1], runner.seqs[-1]
    assert runner.bucket(Tmax - 1, 1) == (Tmax, 2)
    assert runner.bucket(Tmax, 1) is None and runner.bucket(10, Bmax) is None


def test_padded_batch_layout():
    """Real sequences first, untouched; padding sequences of >= 1 token take the rest;
    the same shape lands at the same addresses."""
    prompts = [[5, 6, 7], [8], [9, 10]]
    types = [[0, 1, 1], None, [1, 0]]
    Tb, Bb = 16, 6
    buf = torch.empty(RaggedBatch.padded_nbytes(64, 8), dtype=torch.uint8)
    batch = RaggedBatch.build_padded(prompts, types, Tb, Bb, 32, buf)
    ref = RaggedBatch.build(prompts, types)
    assert batch.num_tokens == Tb and batch.seq_lens == [3, 1, 2] and batch.max_seqlen == 32
    cu = batch.cu_seqlens.tolist()
    assert cu[:4] == ref.cu_seqlens.tolist() and cu[-1] == Tb and len(cu) == Bb + 1
    pad_lens = [b - a for a, b in zip(cu[3:], cu[4:])]
    assert min(pad_lens) >= 1 and max(pad_lens) - min(pad_lens) <= 1  # split evenly
    for name in ("input_ids", "positions", "token_type_ids"):
        torch.testing.assert_close(getattr(batch, name)[:6], getattr(ref, name), msg=name)
    assert batch.input_ids[6:].eq(0).all() and batch.token_type_ids[6:].eq(0).all()
    starts = torch.repeat_interleave(torch.tensor(cu[:-1]), torch.tensor([b - a for a, b in zip(cu, cu[1:])]))
    torch.testing.assert_close(batch.positions, torch.arange(Tb) - starts)
    again = RaggedBatch.build_padded([[1] * 5], None, Tb, Bb, 32, buf)
    for name in ("input_ids", "positions", "token_type_ids", "cu_seqlens"):
        assert getattr(again, name).data_ptr() == getattr(batch, name).data_ptr(), name
    with pytest.raises(ValueError, match="at least one token and at most 32"):
        RaggedBatch.build_padded(prompts, None, 7, 6, 32, buf)
    with pytest.raises(ValueError, match="at least one token and at most 2"):
        RaggedBatch.build_padded(prompts, None, 16, 6, 2, buf)  # 10 spare tokens, 3 sequences of <= 2


@pytest.mark.parametrize("name, pooling", [
    ("bert", None),     # CLS: the last layer on pooled rows only, pooler head
    ("bert", "MEAN"),   # every row pooled: padding sequences must not leak into real means
    ("qwen3", None),    # last token, causal GQA, final norm on pooled rows
])
def test_recorded_runner_matches_the_unpadded_forward(models, name, pooling):
    model = LLM(models[name], kernel_backend="torch", pooler_config={"pooling_type": pooling}).engine.model
    runner = RecordedGraphs(model, 256, 16, 128, "cpu")
    # Batches 1 and 2 share a bucket (one capture, then a replay on new inputs); 3 and
    # 4 need others.
    batches = [[5, 17, 40], [9, 30, 3], [1], [100, 64, 2, 2, 7, 50]]
    rng = random.Random(1)
    with torch.inference_mode():
        for i, lens in enumerate(batches):
            prompts = _prompts(lens, model.vocab_size, seed=i)
            # BERT's segment ids must reach the padded buffer too (one prompt keeps None).
            types = [None] + [[rng.randrange(2) for _ in p] for p in prompts[1:]] if name == "bert" else None
            got = runner(prompts, types)
            want = _eager(model, prompts, types)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"batch {i} {lens}: {m}")
    assert set(runner.graphs) == {(*runner.bucket(n, b), 0) for n, b in ((63, 3), (1, 1), (225, 6))}


def test_recorded_runner_with_triton_kernels(models):
    """The Triton kernels (interpreter) on a padded batch: the padding sequences are
    ordinary sequences to them."""
    llm = LLM(models["bert"], kernel_backend="triton")
    model = llm.engine.model
    runner = RecordedGraphs(model, 128, 4, 128, "cpu")
    with torch.inference_mode():
        for seed, lens in enumerate(([3, 9], [6, 1])):
            prompts = _prompts(lens, model.vocab_size, seed)
            torch.testing.assert_close(runner(prompts), _eager(model, prompts), atol=1e-5, rtol=0)
    assert len(runner.graphs) == 1


def test_past_max_graphs_runs_eagerly(models):
    llm = LLM(models["bert"], kernel_backend="torch")
    model = llm.engine.model
    runner = RecordedGraphs(model, 1024, 8, 128, "cpu", max_graphs=1)
    with torch.inference_mode():
        # captured; past the limit (two new buckets); a replay of the captured one
        for seed, lens in enumerate(([4], [100, 100], [100, 2], [7])):
            prompts = _prompts(lens, model.vocab_size, seed)
            torch.testing.assert_close(runner(prompts), _eager(model, prompts), atol=1e-5, rtol=0)
        assert runner(_prompts([2000], model.vocab_size, 0)) is None  # fits no bucket
    assert list(runner.graphs) == [(128, 2, 0)] and runner.eager_runs == 3


def test_failed_capture_turns_graphs_off(models):
    """A capture that raises warns once and leaves every later batch to the eager path;
    the batch whose capture failed still gets its (eager) result."""
    class Broken(GraphRunner):
        def _capture(self, batch, lora_batch):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = LLM(models["bert"], kernel_backend="torch").engine.model
    runner = Broken(model, 256, 4, 128, "cpu")
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="running eagerly from now on: RuntimeError: operation not permitted"):
            got = runner([[1, 2, 3]])
        torch.testing.assert_close(got, _eager(model, [[1, 2, 3]]), atol=1e-5, rtol=0)
        assert runner([[4, 5]]) is None and runner.disabled and not runner.graphs


@pytest.mark.parametrize("name, pooling", [("bert", None), ("bert", "MEAN"), ("qwen3", None), ("qwen3", "MEAN")])
def test_graph_ops_name_every_op_the_forward_calls(models, name, pooling):
    """graph_ops decides whether a forward may be captured: it must list every op called."""
    llm = LLM(models[name], kernel_backend="torch", pooler_config={"pooling_type": pooling})
    model, called = llm.engine.model, set()
    real = model.ops

    class Recording:
        def __getattr__(self, op):
            called.add(op)
            return getattr(real, op)

    model.ops = Recording()
    try:
        _eager(model, _prompts([3, 7], model.vocab_size, seed=0))
    finally:
        model.ops = real
    assert called and called <= set(model.graph_ops), called - set(model.graph_ops)


def test_engine_launches_through_the_runner(models):
    """LLM.classify with the engine's graph runner in place (recorded captures on CPU),
    two batches in flight: the same results as the eager engine."""
    prompts = [{"prompt_token_ids": p} for p in _prompts([5, 40, 1, 77, 12, 3, 60, 9], 160, seed=3)]
    kw = dict(kernel_backend="torch", max_num_seqs=3, max_num_batched_tokens=128)
    ref = [o.outputs.probs for o in LLM(models["bert"], **kw).classify(prompts, use_tqdm=False)]
    llm = LLM(models["bert"], **kw)
    eng = llm.engine
    eng.graphs = RecordedGraphs(eng.model, 128, 3, eng.max_model_len, "cpu")
    eng.pipeline_depth = 2
    got = [o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=0)
    assert eng.graphs.graphs, "no batch went through the runner"


def test_graphs_only_where_capturable(models):
    """Graphs need ops that never read cu_seqlens on the host and a model that declares
    its forward capturable; on CPU there are never graphs; enforce_eager is a bool."""
    from pyengine.models import model_class
    from pyengine.ops import resolve_ops

    ops = model_class("BertForSequenceClassification").graph_ops
    assert not resolve_ops("torch", "cpu").capturable(ops)  # the torch attention reads cu_seqlens
    assert resolve_ops("triton", "cpu").capturable(ops)
    assert resolve_ops("triton", "cpu").capturable(model_class("Qwen3ForSequenceClassification").graph_ops)
    assert not hasattr(model_class("JambaForSequenceClassification"), "graph_ops")  # its scan reads cu_seqlens
    model = LLM(models["bert"], kernel_backend="triton").engine.model
    cuda, triton, torch_ops = torch.device("cuda"), model.ops, resolve_ops("torch", "cpu")
    assert cuda_graph.wanted(cuda, False, model, triton)
    assert not cuda_graph.wanted(cuda, True, model, triton)  # enforce_eager
    assert not cuda_graph.wanted(cuda, False, model, torch_ops)
    assert not cuda_graph.wanted(torch.device("cpu"), False, model, triton)
    assert not cuda_graph.wanted(cuda, False, torch.nn.Identity(), triton)  # no graph_ops
    assert LLM(models["bert"], kernel_backend="torch").engine.graphs is None
    with pytest.raises(TypeError, match="enforce_eager must be a bool"):
        LLM(models["bert"], enforce_eager="yes")


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bert", "qwen3"])
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 1e-2)])
def test_graphs_match_eager_on_gpu(models, name, dtype, atol):
    """Real captures: many batches through few graphs, two batches in flight, against
    the same engine without graphs."""
    vocab = 160 if name == "bert" else 320
    rng = random.Random(0)
    lens = [rng.choice([1, 2, 5, 17, 64, 120]) for _ in range(200)]
    prompts = [{"prompt_token_ids": p} for p in _prompts(lens, vocab, seed=1)]
    kw = dict(device="cuda", dtype=dtype, max_num_seqs=16, max_num_batched_tokens=1024)
    graphs = LLM(models[name], **kw)
    eager = LLM(models[name], enforce_eager=True, **kw)
    assert graphs.engine.graphs is not None and eager.engine.graphs is None
    for _ in range(2):  # the second round replays graphs captured in the first
        got = torch.tensor([o.outputs.probs for o in graphs.classify(prompts, use_tqdm=False)])
        want = torch.tensor([o.outputs.probs for o in eager.classify(prompts, use_tqdm=False)])
        err = (got - want).abs().max().item()
        assert err < atol, f"{name} {dtype}: max |dprob| graphs vs eager {err:.3g}"
    runner = graphs.engine.graphs
    assert 0 < len(runner.graphs) < 40, sorted(runner.graphs)


@pytest.mark.gpu
def test_graphs_under_the_async_driver_on_gpu(models):
    """The server's driver: its worker thread captures and replays while concurrent
    callers' requests form batches as they arrive; every result equals the eager
    engine's (fp32)."""
    import asyncio

    from pyengine.async_engine import AsyncEngine
    from pyengine.inputs import TokenizedPrompt

    rng = random.Random(3)
    groups = [_prompts([rng.randint(1, 100) for _ in range(rng.randint(1, 5))], 160, seed=i) for i in range(48)]
    kw = dict(device="cuda", dtype="float32", max_num_seqs=8, max_num_batched_tokens=512)
    eager = LLM(models["bert"], enforce_eager=True, **kw)
    core = LLM(models["bert"], **kw).engine
    engine = AsyncEngine(core)

    async def main():
        return await asyncio.gather(*(engine.run([TokenizedPrompt(p) for p in g], "softmax") for g in groups))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    assert core.graphs.graphs and not core.graphs.disabled
    for g, got in zip(groups, results):
        want = torch.tensor([o.outputs.probs for o in eager.classify([{"prompt_token_ids": p} for p in g],
                                                                     use_tqdm=False)])
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
