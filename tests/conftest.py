import os

# Triton runs on CPU only in interpreter mode, which must be chosen before any
# @triton.jit function is created. scripts/gpu_check.sh exports TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU)")
    config.addinivalue_line("markers", "no_gpu: checks what a machine without a CUDA device does "
                                       "(skipped where there is one)")
    # Under xdist each worker gets its share of the cores: N workers each running torch's
    # default of one thread per core oversubscribe the machine many times over, and the
    # CPU references of the GPU tests (transformers in fp32) then crawl.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    # Asked once, at collection end, not when a test module is imported.
    has_gpu = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="runs where there is no CUDA device" if has_gpu else "needs a CUDA device")
    for item in items:
        if ("no_gpu" if has_gpu else "gpu") in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local two-CPU Ray cluster, started once for every test that asks for it (a start
    takes seconds); skipped where ray or Ray Data's dependencies are not installed."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20)
    yield ray
    if started:
        ray.shutdown()
