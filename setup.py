"""Build for pyengine.

The pure-Python package (pyengine + pyengine.kernels) always installs. The CUDA
extension ``pyengine._C`` is built with CMake when nvcc is found, and skipped with a
message otherwise or when ``PYENGINE_SKIP_CUDA_BUILD=1``.

CUDA build (see docs/KERNELS.md): CMakeLists.txt + csrc/, pybind11 and the CUDA runtime
only (no libtorch), so it needs `pip install pybind11 cmake` and then
`pip install --no-build-isolation -e .` (an isolated build env has no pybind11).
Environment:
  PYENGINE_SKIP_CUDA_BUILD=1     never build the extension
  PYENGINE_REQUIRE_CUDA_BUILD=1  fail instead of skipping when nvcc/pybind11/cmake is missing
  PYENGINE_CUDA_ARCHS="80;90"    CUDA architectures (or CMAKE_CUDA_ARCHITECTURES); default 80;90
  MAX_JOBS=N                     parallel compile jobs (default: CPU count)
An editable install puts pyengine/_C*.so next to the sources (gitignored).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"pyengine setup: {msg}", file=sys.stderr, flush=True)


def _find_nvcc():
    """nvcc from CUDACXX, CUDA_HOME / CUDA_PATH, PATH, or /usr/local/cuda, else None."""
    cands = [os.environ.get("CUDACXX")]
    cands += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH")
              if os.environ.get(v)]
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _cuda_archs():
    archs = (os.environ.get("PYENGINE_CUDA_ARCHS") or os.environ.get("CMAKE_CUDA_ARCHITECTURES")
             or DEFAULT_CUDA_ARCHS)
    return ";".join(a for a in archs.replace(",", ";").replace(" ", ";").split(";") if a)


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt rather than by setuptools' compiler."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """build_ext that runs CMake for CMakeExtension, FlashAttention-style: optional unless
    PYENGINE_REQUIRE_CUDA_BUILD=1. Missing tools skip the build with a message; a compile
    error fails the install (set PYENGINE_SKIP_CUDA_BUILD=1 to install without it)."""

    def run(self):
        missing = self._missing_tools()
        if missing:
            msg = (f"not building the CUDA extension pyengine._C: {missing}. The pure-Python "
                   "install goes on (backends triton/torch only). To build it: "
                   "`pip install pybind11 cmake` then `pip install --no-build-isolation -e .`")
            if _flag("PYENGINE_REQUIRE_CUDA_BUILD"):
                raise RuntimeError(msg + " (PYENGINE_REQUIRE_CUDA_BUILD=1 is set)")
            _say(msg)
            self.extensions = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
        super().run()

    @staticmethod
    def _missing_tools():
        try:
            import pybind11  # noqa: F401
        except ImportError:
            return "pybind11 is not importable in the build environment"
        if _cmake() is None:
            return "cmake (>= 3.18) is not found"
        return None

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = _cuda_archs()
        cmake = _cmake()
        cfg = [cmake, "-S", str(ROOT), "-B", str(build_dir),
               f"-DPython_EXECUTABLE={sys.executable}",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
               f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}",
               f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
               f"-DPYENGINE_OUTPUT_DIR={out_dir}",
               "-DCMAKE_BUILD_TYPE=Release"]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            cfg += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        _say(f"building pyengine._C with CMake (CUDA archs {archs}, {jobs} jobs) ...")
        t0 = time.time()
        try:
            subprocess.run(cfg, check=True)
            subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"building the CUDA extension pyengine._C failed ({e}); see the compiler output "
                "above. Set PYENGINE_SKIP_CUDA_BUILD=1 to install without it.") from e
        if not ext_path.exists():  # the module's suffix differs from setuptools' name
            built = sorted(out_dir.glob("_C*.so"), key=lambda p: p.stat().st_mtime)
            if not built:
                raise RuntimeError(f"CMake built no _C*.so in {out_dir}")
            shutil.copyfile(built[-1], ext_path)
        _say(f"built {ext_path.name} in {time.time() - t0:.0f} s")


def _cmake():
    """A cmake new enough for CMakeLists.txt: the pip one (in this Python's bin) first."""
    cands = [os.path.join(os.path.dirname(sys.executable), "cmake"), shutil.which("cmake")]
    for c in cands:
        if not c or not os.path.isfile(c):
            continue
        try:
            out = subprocess.run([c, "--version"], capture_output=True, text=True, check=True).stdout
            ver = tuple(int(v) for v in out.split()[2].split(".")[:2])
        except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
            continue
        if ver >= (3, 18):
            return c
    return None


def _cuda_extensions():
    if _flag("PYENGINE_SKIP_CUDA_BUILD"):
        _say("PYENGINE_SKIP_CUDA_BUILD=1: not building the CUDA extension pyengine._C")
        return []
    if _find_nvcc() is None:
        msg = ("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): not building the CUDA "
               "extension pyengine._C; the pure-Python install goes on")
        if _flag("PYENGINE_REQUIRE_CUDA_BUILD"):
            raise RuntimeError(msg + " (PYENGINE_REQUIRE_CUDA_BUILD=1 is set)")
        _say(msg)
        return []
    return [CMakeExtension("pyengine._C")]


setup(
    name="pyengine",
    version="0.1.0",
    description="Ragged-batch inference engine for sequence-classification models",
    python_requires=">=3.10",
    packages=["pyengine", "pyengine.models", "pyengine.bench", "pyengine.integrations", "pyengine.kernels"],
    package_dir={"pyengine": "pyengine", "pyengine.kernels": "kernels"},
    # launch configs tuned per GPU model (kernels/_tuned.py)
    package_data={"pyengine.kernels": ["configs/*.json"]},
    install_requires=[
        "torch>=2.5",
        "transformers>=4.56",
        "tokenizers",
        "safetensors",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "serve": ["fastapi", "uvicorn"],
        "ray": ["ray[data,serve]>=2.60", "pyarrow>=14"],
        "templates": ["jinja2"],
        # PIL images as inputs of vision-language models (uint8 arrays need nothing)
        "vision": ["pillow"],
        # peft and pillow: the references the LoRA and image-preprocessing tests compare against
        "test": ["pytest", "pytest-timeout", "pytest-benchmark", "fastapi", "uvicorn", "ray[data,serve]>=2.60", "pyarrow>=14",
                 "jinja2", "peft", "pillow"],
    },
    ext_modules=_cuda_extensions(),
    cmdclass={"build_ext": CMakeBuild},
)
