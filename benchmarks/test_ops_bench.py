"""pytest-benchmark microbenchmarks: each op per backend on the cases of
pyengine.bench.kernels (the same shapes and argument builders as
`python -m pyengine.bench kernels`).

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

On a GPU: DESIGN's "mixed" batch (about 325k tokens) in bf16, every backend that
implements the op, plus padded SDPA and torch.nn.attention.varlen for attention. On CPU
only the torch backend runs, on tiny shapes (the Triton interpreter is not a benchmark).
Needs pytest-benchmark; skipped without it.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from pyengine import ops  # noqa: E402
from pyengine.bench import kernels as kb  # noqa: E402

# Case ids are the same in quick and full mode, so they can be listed without a device.
CASE_IDS = [c.id for c in kb.cases("cpu", quick=True)]
BACKENDS = kb.BACKENDS + kb.EXTRA_BACKENDS


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def case_map(device):
    return {c.id: c for c in kb.cases(device, quick=device.type == "cpu")}


def _op_fn(case, backend, device):
    if backend == "sdpa-padded":
        if case.attn is None:
            pytest.skip("padded SDPA is an attention baseline")
        if case.attn["window"] is not None:
            pytest.skip("padded SDPA baseline has no sliding window")
        return None
    if backend == "torch-varlen":
        fn = kb.torch_varlen_fn() if device.type == "cuda" else None
        if case.attn is None or fn is None:
            pytest.skip("torch.nn.attention.varlen: attention on CUDA only")
        return fn
    if device.type == "cpu" and backend != "torch":
        pytest.skip("CPU: torch backend only")
    try:
        resolved = ops.resolve_ops(backend, device)
    except RuntimeError as e:
        pytest.skip(str(e))
    if resolved.chosen[case.op] != backend:
        pytest.skip(f"{backend} does not implement {case.op}")
    return getattr(resolved, case.op)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_op(benchmark, device, case_map, case_id, backend):
    case = case_map[case_id]
    fn = _op_fn(case, backend, device)
    args = case.make()
    if backend == "sdpa-padded":
        call = kb.padded_sdpa(*args[:3], case.attn["lens"], case.attn["causal"])
    else:
        def call():
            return fn(*args)

    def timed():
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()

    timed()  # compile / warm up outside the measurement
    benchmark.extra_info.update(op=case.op, case=case.name, shape=case.shape, backend=backend)
    benchmark.pedantic(timed, rounds=5 if device.type == "cpu" else 20, warmup_rounds=1)
    median = benchmark.stats.stats.median
    if case.flops:
        benchmark.extra_info["tflops"] = case.flops / median / 1e12
    elif case.bytes:
        benchmark.extra_info["gbps"] = case.bytes / median / 1e9
