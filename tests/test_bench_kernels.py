"""The op microbenchmark (pyengine.bench.kernels) runs on CPU in quick mode."""
import io
import json

import pytest
import torch

from pyengine.bench import kernels as kb

KERNEL_OPS = ("varlen_attention", "gather_pooled", "activation", "add_layer_norm", "add_rms_norm", "qk_norm_rotary",
              "rotary", "gated_act", "embed_layer_norm", "pooled_norm", "expert_matmul")


def test_quick_cpu_run_times_every_op(tmp_path):
    out = io.StringIO()
    path = tmp_path / "k.json"
    rows = kb.run("cpu", backends=["torch", "sdpa-padded"], quick=True, json_path=str(path), out=out)
    timed = {r["op"] for r in rows if r["backend"] == "torch" and r["ms"]}
    assert timed == set(KERNEL_OPS), [r for r in rows if r["error"]]
    assert all(r["error"] is None for r in rows if r["backend"] == "torch")
    sdpa = [r for r in rows if r["backend"] == "sdpa-padded" and r["ms"]]
    assert sdpa and all(r["tflops"] and r["vs_torch"] for r in sdpa)
    compute = ("varlen_attention", "expert_matmul")  # rated in TFLOP/s
    assert all(r["gbps"] and r["pct_copy"] for r in rows if r["backend"] == "torch" and r["op"] not in compute)
    assert all(r["tflops"] for r in rows if r["backend"] == "torch" and r["op"] == "expert_matmul")
    assert json.loads(path.read_text()) == rows
    assert "varlen_attention" in out.getvalue() and "GB/s" in out.getvalue()


def test_graph_timing_is_a_no_op_on_cpu():
    # CUDA-graph replay exists on CUDA only: on CPU the same rows come from wall-clock timing.
    rows = kb.run("cpu", backends=["torch"], quick=True, ops=["add_rms_norm"], out=io.StringIO(), graph=True)
    assert rows and all(r["timing"] == "events" and r["ms"] > 0 for r in rows)


def test_copy_bandwidth_is_a_positive_rate():
    # 16 MiB read and written in a measured time: a finite, positive figure.
    gbps = kb.copy_bandwidth("cpu", nbytes=16 << 20, repeats=3)
    assert 0.01 < gbps < 1e5


def test_attention_pairs():
    assert kb.attention_pairs([3]) == 9
    assert kb.attention_pairs([3], causal=True) == 6
    assert kb.attention_pairs([4, 4], causal=True, window=(1, 0)) == 2 * 7
    assert kb.attention_pairs([5], window=(0, 0)) == 5


def test_mixed_lengths_match_design():
    lens = kb.mixed_lengths()
    assert len(lens) == 2048 and min(lens) >= 8 and max(lens) <= 512
    assert 150 < sum(lens) / len(lens) < 170  # DESIGN: mean about 159


def test_main_rejects_unknown_names():
    with pytest.raises(SystemExit):
        kb.main(["--ops", "not_an_op"])
    with pytest.raises(SystemExit):
        kb.main(["--backends", "tpu"])


def _never_called(*args, **kwargs):
    raise AssertionError("work started despite a bad argument")


@pytest.mark.parametrize("argv,msg", [
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--device", "meta"], "--device 'meta': only cpu and cuda"),
    (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (["--repeats", "-5"], "--repeats must be a positive integer, got -5"),
    (["--json", "/nonexistent/dir/k.json"], "does not exist"),
    (["--json", "."], "'.' is a directory, not a file"),
])
def test_bad_arguments_are_clear_errors(argv, msg, capsys, monkeypatch):
    monkeypatch.setattr(kb, "copy_bandwidth", _never_called)  # refused before any work
    with pytest.raises(SystemExit) as e:
        kb.main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.no_gpu  # checks the no-GPU message
def test_cuda_device_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(kb, "copy_bandwidth", _never_called)
    with pytest.raises(SystemExit) as e:
        kb.main(["--device", "cuda"])
    assert e.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.no_gpu  # checks the backends a CPU lacks
def test_requested_backends_that_cannot_run_are_named(monkeypatch):
    # Off the interpreter Triton does not run on CPU; nor do the CUDA kernels or torch's varlen.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = io.StringIO()
    rows = kb.run("cpu", backends=["triton", "cuda", "torch-varlen"], ops=["activation"], out=out)
    assert {r["backend"] for r in rows} == {"torch"}
    text = out.getvalue()
    assert "backend triton skipped: on CPU Triton runs only in its interpreter" in text
    assert "backend cuda skipped: kernel backend 'cuda' is not available on cpu" in text
    assert "backend torch-varlen skipped: needs a CUDA device" in text
    out = io.StringIO()
    kb.run("cpu", ops=["activation"], out=out)
    assert "skipped" not in out.getvalue()  # none named: the default set, without notes


def test_repeats_is_honoured_in_quick_mode(monkeypatch, capsys):
    # --repeats given: the cases run that many times, quick or not (3 is only the quick default).
    asked = []

    def fake_time_call(fn, device, repeats=20, warmup=2, budget_ms=2000.0, min_repeats=3):
        asked.append(repeats)
        return 1.0
    monkeypatch.setattr(kb, "time_call", fake_time_call)
    monkeypatch.setattr(kb, "copy_bandwidth", lambda *args, **kwargs: 1.0)
    assert kb.main(["--device", "cpu", "--quick", "--repeats", "7", "--ops", "add_rms_norm",
                    "--backends", "torch"]) == 0
    assert asked == [7]
    asked.clear()
    kb.run("cpu", backends=["torch"], quick=True, ops=["add_rms_norm"], out=io.StringIO())
    assert asked == [kb.QUICK_REPEATS]


def test_time_call_runs_no_more_than_asked():
    # repeats below min_repeats: that many timed runs (plus the one that sizes them).
    n = []
    kb.time_call(lambda: n.append(1), "cpu", repeats=1, warmup=0)
    assert len(n) == 2
    n.clear()
    kb.time_call(lambda: n.append(1), "cpu", repeats=20, warmup=1, min_repeats=3)
    assert 1 + 1 + 3 <= len(n) <= 1 + 1 + 20


def test_op_sweep_help_lists_every_swept_op(capsys):
    with pytest.raises(SystemExit) as e:
        kb.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--op-sweep also time")
    sweep_help = text[start:text.index("--write-configs PATH", start)]
    assert "expert_matmul" in kb.SWEEP_CASES
    for op in kb.SWEEP_CASES:
        assert op in sweep_help, op


def test_attention_sweep_times_each_candidate(monkeypatch):
    # Interpreter run on the quick shapes (head dims 16 and 32): one small candidate per
    # head dim, checked against the launcher's default output.
    from pyengine.kernels import varlen_attention as va

    # The grouped candidate runs where it divides the kv group (gqa2: 4 heads over 2) and
    # is left out where it does not (gqa6 in quick mode: 3 heads over 1). BLOCK_N_FULL
    # shows as /nf where it differs from BLOCK_N (16x8/nf16 runs a wide block on the
    # 30-token prompt); the fp32 default spelt out in six fields is still the default.
    # Where the candidates do not list the built-in config, it is timed first (the 32
    # cases); head dims off the multiples of 16 take SWEEP_CONFIGS_PADDED.
    monkeypatch.setattr(va, "SWEEP_CONFIGS", {16: [(16, 16, 4, 1), (16, 8, 4, 1, 1, 16), (64, 32, 4, 2, 1, 32)],
                                              32: [(32, 16, 4, 1), (16, 16, 4, 1, 2)]})
    monkeypatch.setattr(va, "SWEEP_CONFIGS_PADDED", {32: [(16, 16, 4, 1)]})
    out = io.StringIO()
    rows = kb.attention_sweep("cpu", repeats=1, out=out)
    assert sorted((r["case"], r["backend"]) for r in rows) == [
        ("bidir-mha", "triton 16x16/w4/s1"), ("bidir-mha", "triton 16x8/w4/s1/nf16"),
        ("bidir-mha", "triton 64x32/w4/s2 default"), ("causal-gqa2", "triton 16x16/w4/s1/g2"),
        ("causal-gqa2", "triton 32x16/w4/s1"), ("causal-gqa2", "triton 64x32/w4/s2 default"),
        ("causal-gqa6", "triton 32x16/w4/s1"), ("causal-gqa6", "triton 64x32/w4/s2 default"),
        ("vision-tiles", "triton 16x16/w4/s1"),  # head dim 24, padded to 32
        ("vision-tiles", "triton 64x32/w4/s2 default")]
    assert [r["config"] for r in rows if "nf16" in r["backend"]] == [[16, 8, 4, 1, 1, 16]]
    for r in rows:
        assert r["error"] is None and r["ms"] > 0 and r["tflops"] > 0, r
        assert r["max_diff"] < 1e-4, r
        assert r["default"] == r["backend"].endswith(" default"), r
    # each case's shape key, as the launcher builds it (quick heads: 16/4 over 4/2 and 3/1)
    assert {(r["case"], r["tune_key"]) for r in rows} == {
        ("bidir-mha", "float32/d16/bidir/r1"), ("causal-gqa2", "float32/d32/causal/r2"),
        ("causal-gqa6", "float32/d32/causal/r3"), ("vision-tiles", "float32/d24/bidir/r1")}
    assert "config sweep" in out.getvalue()


def test_op_sweep_needs_cuda(capsys):
    # Checked before any timing starts: on CPU the command exits at once with the reason.
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit) as exc:
        kb.main(["--op-sweep"])
    assert exc.value.code == 2
    assert "--op-sweep needs a CUDA device" in capsys.readouterr().err


def _tiny_sweep_cases(device, quick=False):
    """The swept cases on 4 tokens (the interpreter runs each program as Python); every
    make() gives the same values, as the real cases do."""
    def randn(*shape):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))

    cu = torch.tensor([0, 1, 4], dtype=torch.int32)
    pos = torch.tensor([0, 0, 1, 2])
    cos_sin = torch.cat([torch.ones(3, 4), torch.zeros(3, 4)], 1)
    experts = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1]])

    def qk():
        qkv = randn(4, 4, 8)
        return qkv[:, :2], qkv[:, 2:3], torch.ones(8), torch.ones(8), pos, cos_sin, 1e-6
    return [kb.Case("gated_act", "silu", "T=4", lambda: (randn(4, 96), "silu"), bytes=4 * 144 * 4),
            kb.Case("gated_act", "gelu", "T=4", lambda: (randn(4, 96), "gelu"), bytes=4 * 144 * 4),
            kb.Case("qk_norm_rotary", "qwen3", "T=4", qk, bytes=4 * 4 * 48),
            kb.Case("gather_pooled", "mean", "T=4", lambda: (randn(4, 16), cu, "mean"), bytes=4 * 6 * 16),
            kb.Case("pooled_norm", "mean-layer", "T=4",
                    lambda: (randn(4, 16), cu, "mean", "layer", torch.ones(16), torch.zeros(16), 1e-6),
                    bytes=4 * 6 * 16),
            kb.Case("expert_matmul", "moe-up", "T=4 E=2 k=2",
                    lambda: (randn(4, 16), randn(2, 32, 16), experts), bytes=4 * 400, flops=2.0 * 8 * 32 * 16),
            kb.Case("expert_matmul", "moe-down", "T=4 E=2 k=2",
                    lambda: (randn(8, 16), randn(2, 16, 16), experts, randn(4, 2), True), bytes=4 * 400,
                    flops=2.0 * 8 * 16 * 16)]


def test_op_sweep_times_each_candidate(monkeypatch):
    # Interpreter run on 4-token cases, one candidate per op: each row timed and checked
    # against the op's default config; the CUDA loop is skipped on CPU.
    from pyengine.kernels import expert_matmul, gated_act, gather_pooled, pooled_norm, qk_norm_rotary

    for mod, cfg in ((gated_act, {"block": 16}), (qk_norm_rotary, {"heads": 1}),
                     (gather_pooled, {"block_h": 8, "block_t": 2, "stages": 2}),
                     (pooled_norm, {"block_t": 2, "splits": 2, "stages": 2}),
                     (expert_matmul, {"block_m": 16, "block_n": 16, "block_k": 16})):
        monkeypatch.setattr(mod, "SWEEP_CONFIGS", [cfg])
    monkeypatch.setattr(kb, "cases", _tiny_sweep_cases)
    out = io.StringIO()
    rows = kb.op_sweep("cpu", repeats=1, out=out)
    assert sorted((r["op"], r["case"], kb.config_label(r["config"])) for r in rows) == [
        ("expert_matmul", "moe-down", "block_m=16 block_n=16 block_k=16"), ("expert_matmul", "moe-down", "default"),
        ("expert_matmul", "moe-up", "block_m=16 block_n=16 block_k=16"), ("expert_matmul", "moe-up", "default"),
        ("gated_act", "gelu", "block=16"), ("gated_act", "gelu", "default"),
        ("gated_act", "silu", "block=16"), ("gated_act", "silu", "default"),
        ("gather_pooled", "mean", "block_h=8 block_t=2 stages=2"), ("gather_pooled", "mean", "default"),
        ("pooled_norm", "mean-layer", "block_t=2 splits=2 stages=2"), ("pooled_norm", "mean-layer", "default"),
        ("qk_norm_rotary", "qwen3", "default"), ("qk_norm_rotary", "qwen3", "heads=1")]
    for r in rows:
        assert r["error"] is None and r["backend"] == "triton" and r["ms"] > 0 and r["pct_copy"] > 0, r
        assert r["config"] is None or r["max_diff"] < 1e-5, r
    assert len(kb.best_configs(rows)) == 7
    assert "config sweep" in out.getvalue() and "best config per case" in out.getvalue()


def _never_launched(*args, **kwargs):
    raise AssertionError("launched despite a bad config")


@pytest.mark.parametrize("op,call,config,match", [
    ("gated_act", lambda m, c: m._launch(torch.randn(4, 16), "gelu", config=c), {"block": 48}, "power of two"),
    ("gated_act", lambda m, c: m._launch(torch.randn(4, 16), "gelu", config=c), {"warps": 4}, "unknown config key"),
    ("gated_act", lambda m, c: m._launch(torch.randn(4, 16), "silu", config=c), (1024, 4), "must be None or a dict"),
    ("qk_norm_rotary", lambda m, c: m._launch(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.ones(8),
                                              torch.ones(8), torch.arange(3), torch.randn(4, 8), 1e-6, config=c),
     {"heads": 0}, "positive int"),
    ("gather_pooled", lambda m, c: m._launch(torch.randn(5, 8), torch.tensor([0, 2, 5], dtype=torch.int32), "mean",
                                             config=c), {"num_warps": 64}, "at most 32"),
    ("gather_pooled", lambda m, c: m._launch(torch.randn(5, 8), torch.tensor([0, 2, 5], dtype=torch.int32), "last",
                                             config=c), {"stages": 2}, "pooling='mean' only"),
    ("pooled_norm", lambda m, c: m._launch(torch.randn(5, 8), torch.tensor([0, 2, 5], dtype=torch.int32), "last",
                                           "rms", torch.ones(8), None, 1e-6, config=c), {"splits": 2},
     "pooling='mean' only"),
    ("pooled_norm", lambda m, c: m._launch(torch.randn(5, 8), torch.tensor([0, 2, 5], dtype=torch.int32), "mean",
                                           "rms", torch.ones(8), None, 1e-6, config=c), {"stages": 3}, "at most 2"),
    ("pooled_norm", lambda m, c: m._launch(torch.randn(5, 8), torch.tensor([0, 2, 5], dtype=torch.int32), "mean",
                                           "rms", torch.ones(8), None, 1e-6, config=c), {"block_t": True},
     "positive int"),
    ("pooled_norm", lambda m, c: m._launch(torch.randn(5, 8), torch.tensor([0, 2, 5], dtype=torch.int32), "mean",
                                           "rms", torch.ones(8), None, 1e-6, config=c), {"async_stages": 3},
     "needs warp_rows=1"),
    ("pooled_norm", lambda m, c: m._launch(torch.randn(5, 8), torch.tensor([0, 2, 5], dtype=torch.int32), "mean",
                                           "rms", torch.ones(8), None, 1e-6, config=c),
     {"warp_rows": 1, "async_stages": 5}, "at most 4"),
])
def test_bad_config_raises_before_launch(monkeypatch, op, call, config, match):
    import importlib

    mod = importlib.import_module(f"pyengine.kernels.{op}")
    for name in dir(mod):
        if name.startswith("_") and name.endswith("_kernel"):
            monkeypatch.setattr(mod, name, type("Stub", (), {"__getitem__": lambda self, grid: _never_launched})())
    with pytest.raises(ValueError, match=f"{op}: .*{match}"):
        call(mod, config)


def test_cuda_sweep_only_where_cuda_ops_offers_one(monkeypatch):
    # The CUDA loop of --op-sweep runs an op only where pyengine.cuda_ops has a dict
    # SWEEP_CONFIGS naming it and the op's function takes config=; otherwise it is skipped.
    from types import SimpleNamespace

    from pyengine import cuda_ops

    cuda = torch.device("cuda")
    monkeypatch.setattr(kb.ops_mod, "resolve_ops",
                        lambda backend, device: SimpleNamespace(chosen={"pooled_norm": "cuda", "rotary": "cuda"}))
    assert kb._cuda_sweeps(torch.device("cpu")) == []
    monkeypatch.delattr(cuda_ops, "SWEEP_CONFIGS", raising=False)
    assert kb._cuda_sweeps(cuda) == []

    def without_config(hidden, cu_seqlens, pooling, norm_kind, weight, bias, eps, offset=0.0, residual=None):
        pass

    def with_config(hidden, cu_seqlens, pooling, norm_kind, weight, bias, eps, offset=0.0, residual=None,
                    config=None):
        pass
    monkeypatch.setattr(cuda_ops, "SWEEP_CONFIGS", {"pooled_norm": [{"a": 1}], "rotary": [{"b": 2}]}, raising=False)
    monkeypatch.setattr(cuda_ops, "pooled_norm", without_config)
    assert kb._cuda_sweeps(cuda) == []
    monkeypatch.setattr(cuda_ops, "pooled_norm", with_config)
    # rotary has no swept case: left out.
    assert kb._cuda_sweeps(cuda) == [("cuda", "pooled_norm", with_config, [None, {"a": 1}])]
    assert kb._cuda_sweeps(cuda, ops=["gated_act"]) == []


def test_sweep_jobs_list_every_launch_the_sweeps_make(monkeypatch):
    # The precompile job list: per attention case the built-in config (where the
    # candidates lack it) and the candidates that fit its kv groups, as the sweep times
    # them; per swept op its built-in config (None) and candidates.
    from pyengine.kernels import gated_act
    from pyengine.kernels import varlen_attention as va

    monkeypatch.setattr(va, "SWEEP_CONFIGS", {16: [(16, 16, 4, 1)], 32: [(32, 16, 4, 1), (16, 16, 4, 1, 2)]})
    monkeypatch.setattr(va, "SWEEP_CONFIGS_PADDED", {32: [(16, 16, 2, 1)]})
    monkeypatch.setattr(gated_act, "SWEEP_CONFIGS", [{"block": 16}])
    jobs = kb.sweep_jobs("cpu", attn=True, ops=["gated_act"])
    builtin = va.config_for(torch.float32, 16)
    assert jobs == [("varlen_attention", "bidir-mha", builtin), ("varlen_attention", "bidir-mha", (16, 16, 4, 1)),
                    ("varlen_attention", "causal-gqa2", builtin), ("varlen_attention", "causal-gqa2", (32, 16, 4, 1)),
                    ("varlen_attention", "causal-gqa2", (16, 16, 4, 1, 2)),
                    ("varlen_attention", "causal-gqa6", builtin), ("varlen_attention", "causal-gqa6", (32, 16, 4, 1)),
                    ("varlen_attention", "vision-tiles", builtin), ("varlen_attention", "vision-tiles", (16, 16, 2, 1)),
                    ("gated_act", "silu", None), ("gated_act", "silu", {"block": 16}),
                    ("gated_act", "gelu", None), ("gated_act", "gelu", {"block": 16})]
    assert [j for j in kb.sweep_jobs("cpu", attn=False, ops=None)] == []
    assert {j[0] for j in kb.sweep_jobs("cpu", attn=False, ops=[])} == set(kb.SWEEP_CASES)  # [] = every swept op


def test_precompile_runs_jobs_in_worker_processes(capsys):
    # Spawned workers (the interpreter here) launch each job once; a config its launcher
    # refuses is counted, not raised; the sweep itself reports it again.
    jobs = [("varlen_attention", "bidir-mha", (16, 16, 4, 1)), ("gated_act", "silu", {"block": 16}),
            ("gated_act", "silu", {"block": 3})]
    assert kb.precompile(jobs, 2, per_task=1) == 1
    assert "precompiled 3 sweep launches (3 tasks) on 2 processes" in capsys.readouterr().out
    assert kb.precompile(jobs, 4) == 1  # a task per case: two tasks, two processes
    assert "precompiled 3 sweep launches (2 tasks) on 2 processes" in capsys.readouterr().out
    assert kb.precompile([], 4) == 0 and kb.precompile(jobs, 0) == 0
