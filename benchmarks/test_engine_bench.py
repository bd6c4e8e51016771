"""pytest-benchmark microbenchmark of LLM.classify on the tiny preset (a 4-layer
hidden-256 BERT with random weights), through the model benchmark's own setup code:
"mixed" prompts (seed 0; 256 on a GPU, 32 on CPU) as token ids, once per kernel
backend that can run.

    pytest benchmarks/test_engine_bench.py --benchmark-only

On a GPU in bf16 with every available backend; on CPU in fp32 with the torch backend
(the Triton interpreter is not a benchmark). Needs pytest-benchmark; skipped without it.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from pyengine.bench import presets as P  # noqa: E402
from pyengine.bench import providers as PR  # noqa: E402
from pyengine.bench.workloads import synthetic  # noqa: E402

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = P.preset_config("tiny")
    path = P.build_checkpoint("tiny", config, str(tmp_path_factory.mktemp("bench-cache")), dtype, device)
    facts = P.model_facts(config)
    n = 256 if device.type == "cuda" else 32
    workload = synthetic("mixed", n, 0, config.vocab_size, facts["ends"], facts["special_ids"])
    return PR.Context(path, device, dtype), workload


@pytest.mark.parametrize("backend", PR.PYENGINE_BACKENDS)
def test_classify_tiny_mixed(benchmark, tiny, backend):
    ctx, workload = tiny
    reason = PR.backend_unavailable(backend, ctx.device)
    if reason:
        pytest.skip(reason)
    run = PR.pyengine_setup(ctx, backend)
    n = len(workload.prompts)
    benchmark.extra_info.update(tokens=workload.num_tokens, prompts=n, device=str(ctx.device))
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)

    def once():
        out = run(workload.prompts)
        sync()
        return out

    out = benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    assert out.shape == (n, 2)
    assert torch.allclose(out.sum(-1), torch.ones(n), atol=1e-5)  # softmax rows
