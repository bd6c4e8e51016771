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
