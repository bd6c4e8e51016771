import os

# Triton runs on CPU only in interpreter mode, which must be chosen before any
# @triton.jit function is created. scripts/gpu_check.sh exports TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU)")


def pytest_collection_modifyitems(config, items):
    # Asked once, at collection end, not when a test module is imported.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
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
