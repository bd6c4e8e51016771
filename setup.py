"""Build for pyengine.

The pure-Python package (pyengine + pyengine.kernels) always installs. The CUDA
extension ``pyengine._C`` is built with CMake when nvcc is found, and skipped with a
message otherwise or when ``PYENGINE_SKIP_CUDA_BUILD=1``.
"""
from setuptools import setup

setup(
    name="pyengine",
    version="0.1.0",
    description="Ragged-batch inference engine for sequence-classification models",
    python_requires=">=3.10",
    packages=["pyengine", "pyengine.models", "pyengine.bench", "pyengine.kernels"],
    package_dir={"pyengine": "pyengine", "pyengine.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "tokenizers",
        "safetensors",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-timeout"],
    },
)
