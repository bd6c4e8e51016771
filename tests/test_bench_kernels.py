"""The op microbenchmark (pyengine.bench.kernels) runs on CPU in quick mode."""
import io
import json

import pytest

from pyengine.bench import kernels as kb

KERNEL_OPS = ("varlen_attention", "gather_pooled", "activation", "add_layer_norm", "add_rms_norm", "qk_norm_rotary",
              "rotary", "gated_act", "embed_layer_norm", "pooled_norm")


def test_quick_cpu_run_times_every_op(tmp_path):
    out = io.StringIO()
    path = tmp_path / "k.json"
    rows = kb.run("cpu", backends=["torch", "sdpa-padded"], quick=True, json_path=str(path), out=out)
    timed = {r["op"] for r in rows if r["backend"] == "torch" and r["ms"]}
    assert timed == set(KERNEL_OPS), [r for r in rows if r["error"]]
    assert all(r["error"] is None for r in rows if r["backend"] == "torch")
    sdpa = [r for r in rows if r["backend"] == "sdpa-padded" and r["ms"]]
    assert sdpa and all(r["tflops"] and r["vs_torch"] for r in sdpa)
    assert all(r["gbps"] and r["pct_copy"] for r in rows if r["backend"] == "torch" and r["op"] != "varlen_attention")
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


def test_attention_sweep_times_each_candidate(monkeypatch):
    # Interpreter run on the quick shapes (head dims 16 and 32): one small candidate per
    # head dim, checked against the launcher's default output.
    from pyengine.kernels import varlen_attention as va

    # The grouped candidate runs where it divides the kv group (gqa2: 4 heads over 2) and
    # is left out where it does not (gqa6 in quick mode: 3 heads over 1).
    monkeypatch.setattr(va, "SWEEP_CONFIGS", {16: [(16, 16, 4, 1)], 32: [(32, 16, 4, 1), (16, 16, 4, 1, 2)]})
    out = io.StringIO()
    rows = kb.attention_sweep("cpu", repeats=1, out=out)
    assert sorted((r["case"], r["backend"]) for r in rows) == [
        ("bidir-mha", "triton 16x16/w4/s1"), ("causal-gqa2", "triton 16x16/w4/s1/g2"),
        ("causal-gqa2", "triton 32x16/w4/s1"), ("causal-gqa6", "triton 32x16/w4/s1")]
    for r in rows:
        assert r["error"] is None and r["ms"] > 0 and r["tflops"] > 0, r
        assert r["max_diff"] < 1e-4, r
    assert "config sweep" in out.getvalue()
