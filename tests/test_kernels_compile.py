"""Every Triton kernel compiles for an H100 (sm_90) on this CPU-only machine.

The interpreter used by the other kernel tests runs the kernels as Python and skips the
compiler's own rules (constexpr-only globals, dot shapes and dtypes, shared memory and
register budgets). tests/compile_kernels.py compiles each kernel in a fresh process;
bf16 attention (the launcher's configs and every --attn-sweep candidate, BLOCK_N_FULL
ones included), the memory-bound ops with a config sweep and each of their sweep
candidates must fit in registers without spilling.

PYENGINE_COMPILE_TRITON_PATH=DIR adds a second run with DIR first on the script's
PYTHONPATH: a directory holding another triton package (say 3.6, the GPU image's), so
the kernels are known to compile with that version too before they run on a GPU.
"""
import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# The ops with a config sweep besides attention (python -m pyengine.bench kernels --op-sweep).
SWEPT = ("gated_act", "qk_norm_rotary", "gather_pooled", "pooled_norm", "expert_matmul")


_OTHER = os.environ.get("PYENGINE_COMPILE_TRITON_PATH")


# A tuned-configs file with an entry per Triton op with a config sweep (configs from
# their sweeps), keyed as the launchers key their shapes: it checks the script's key ->
# launch mapping, which every bundled file (kernels/configs/*.json) goes through too.
_TUNED_TEST = {
    "triton/varlen_attention": {"bfloat16/d128/causal/r2": [32, 32, 4, 3, 2],
                                "bfloat16/d72/bidir/r1": [32, 32, 8, 3],
                                "bfloat16/d64/causal/r1/window": [64, 64, 4, 3]},
    "triton/gated_act": {"bfloat16/i3072/gelu": {"block": 1024, "num_warps": 8}},
    "triton/qk_norm_rotary": {"bfloat16/hq16/hk8/d128/r128": {"heads": 8}},
    "triton/gather_pooled": {"bfloat16/h1024/mean": {"block_h": 256, "block_t": 16, "num_warps": 4, "stages": 2}},
    "triton/pooled_norm": {"bfloat16/h1024/mean/layer": {"block_t": 2, "num_warps": 4, "stages": 2}},
    "triton/expert_matmul": {"bfloat16/n1536/k2048": {"block_n": 128, "block_k": 64}},
    "cuda/pooled_norm": {"bfloat16/h1024/mean/layer": {"variant": "slices", "slice_rows": 128}},
}
_BUNDLED = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "kernels", "configs", "*.json")))


@pytest.mark.parametrize("triton_path", [None] + ([_OTHER] if _OTHER else []), ids=lambda p: p or "installed")
def test_kernels_compile_for_sm90(triton_path, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "compile_kernels.py")
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"format": 1, "ops": {op: {k: {"config": c} for k, c in t.items()}
                                                      for op, t in _TUNED_TEST.items()}}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, script, "90", str(tuned), *_BUNDLED], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0 and ("ImportError" in proc.stderr or "ModuleNotFoundError" in proc.stderr):
        pytest.skip(f"this triton cannot compile for NVIDIA here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["op"] for r in rows} == {"varlen_attention", "pooled_query_attention", "gather_pooled", "activation",
                                       "add_layer_norm", "add_rms_norm", "rotary", "qk_norm_rotary", "gated_act",
                                       "embed_layer_norm", "pooled_norm", "expert_matmul"}
    failed = [f"{r['op']} {r['constexprs']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(failed)
    for r in rows:
        assert r["shared"] <= 227 * 1024, f"{r['op']} {r['constexprs']} needs {r['shared']} B of shared memory"
        if r["op"] in ("varlen_attention", "pooled_query_attention", "expert_matmul") and "stack" in r:
            assert r["stack"] == 0, f"{r['op']} spills registers: {r}"
        if r["op"] in SWEPT and "stack" in r:
            assert r["stack"] == 0, f"{r['op']} spills registers (config {r.get('config')}): {r}"
        # pooled_norm's warp_rows programs keep each row in one warp (the dimension order
        # that gets this from each triton: _mean_warp_rows): no barrier in the row loop,
        # but for the two a step of Triton's own pipelined loads.
        if r["op"] == "pooled_norm" and r["constexprs"].get("WARP_ROWS"):
            most = 2 if r["constexprs"].get("ASYNC") else 0
            assert r["loop_barriers"] <= most, \
                f"pooled_norm {r.get('config')}: {r['loop_barriers']} barriers in the row loop (PTX)"
    # Every --attn-sweep candidate compiled as given: GROUP and BLOCK_N_FULL (default 1 and
    # BLOCK_N) reached the kernel's constexprs.
    va = importlib.import_module("pyengine.kernels.varlen_attention")
    attn = {tuple(r["config"]): r["constexprs"] for r in rows
            if r["op"] == "varlen_attention" and "config" in r and "BLOCK_N" in r["constexprs"]}
    for D, configs in va.SWEEP_CONFIGS.items():
        for cfg in configs:
            assert tuple(cfg) in attn, f"varlen_attention: sweep candidate {cfg} (D={D}) not compiled"
            bm, bn, _, _, group, bn_full = va.config_fields(cfg)
            c = attn[tuple(cfg)]
            assert (c["BLOCK_M"], c["BLOCK_N"], c["GROUP"], c["BLOCK_N_FULL"]) == (bm, bn, group, bn_full), (cfg, c)
    # Every --op-sweep candidate compiled (the benchmark times them on the GPU machine).
    for op in SWEPT:
        configs = importlib.import_module(f"pyengine.kernels.{op}").SWEEP_CONFIGS
        compiled = [r["config"] for r in rows if r["op"] == op and "config" in r]
        assert all(cfg in compiled for cfg in configs), f"{op}: sweep candidates not compiled: " + str(
            [cfg for cfg in configs if cfg not in compiled])
    # Every Triton entry of the tuned-configs files compiled through its launcher, which
    # took it for the shape its key names (a key no launch builds fails as a row above).
    for path in [str(tuned), *_BUNDLED]:
        from pyengine.kernels import _tuned
        for full_op, entries in _tuned.load(path).items():
            backend, op = full_op.split("/")
            for key, cfg in entries.items() if backend == "triton" else ():
                assert any(r["op"] == op and r.get("config") == cfg for r in rows), f"{path}: {op} {key} not compiled"
