#!/usr/bin/env bash
# Kernel developer loop for one op of the CUDA extension (docs/KERNELS.md):
#   1. rebuild pyengine._C in place (incremental CMake build in build/dev-cmake, written
#      straight to pyengine/_C*.so; only the local GPU's architecture unless
#      PYENGINE_CUDA_ARCHS is set),
#   2. re-run that op's tests in tests/test_cuda_ops.py (GPU tests run where a GPU is),
#   3. re-run that op's microbenchmark (pyengine.bench.kernels, every backend).
#
# usage: scripts/dev_op.sh OP [--no-build] [--no-test] [--no-bench] [-- PYTEST ARGS...]
#   OP: add_rms_norm | add_layer_norm | rotary | gather_pooled | pooled_norm | activation | all
# env:  PYTHON (default .venv/bin/python, else python3), PYENGINE_CUDA_ARCHS, MAX_JOBS
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
OP=$1; shift
case "$OP" in
  add_rms_norm|add_layer_norm) KEY="$OP or norms or norm_of" ;;
  rotary|gather_pooled|pooled_norm|activation) KEY="$OP" ;;
  all) KEY="" ;;
  -h|--help) usage ;;
  *) echo "dev_op.sh: unknown op '$OP' (expected add_rms_norm, add_layer_norm, rotary, gather_pooled, pooled_norm, activation or all)" >&2; exit 2 ;;
esac
BUILD=1 TEST=1 BENCH=1
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --no-test) TEST=0 ;;
    --no-bench) BENCH=0 ;;
    --) shift; PYTEST_ARGS=("$@"); break ;;
    *) echo "dev_op.sh: unknown option '$1'" >&2; usage ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
PY=$(command -v "$PY") || { echo "dev_op.sh: no python at '${PYTHON:-$PY}' (set PYTHON)" >&2; exit 2; }
export PYTHONUNBUFFERED=1

if [ "$BUILD" = 1 ]; then
  t0=$(date +%s)
  ARCHS=${PYENGINE_CUDA_ARCHS:-$("$PY" - <<'PYEOF'
import torch
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}{minor}")
else:
    print("80;90")
PYEOF
)}
  ARCHS=${ARCHS//,/;}
  CMAKE=$(dirname "$PY")/cmake
  [ -x "$CMAKE" ] || CMAKE=cmake
  GEN=()
  if [ ! -f build/dev-cmake/CMakeCache.txt ] && command -v ninja >/dev/null; then GEN=(-G Ninja); fi
  echo "== build pyengine._C (archs $ARCHS) -> pyengine/"
  "$CMAKE" -S . -B build/dev-cmake "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DPYENGINE_OUTPUT_DIR="$PWD/pyengine" >/dev/null
  "$CMAKE" --build build/dev-cmake -j "${MAX_JOBS:-$(nproc)}"
  "$PY" -c "import pyengine._C as C; i = C.build_info(); print('built', C.__file__, 'archs', i['cuda_archs'])"
  echo "== build took $(( $(date +%s) - t0 )) s"
fi

if [ "$TEST" = 1 ]; then
  echo "== tests: tests/test_cuda_ops.py -k '${KEY:-<all>}'"
  # TRITON_INTERPRET=0 on a GPU (tests/conftest.py defaults it to 1 for CPU runs).
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=${TRITON_INTERPRET:-0}
  fi
  "$PY" -m pytest -q tests/test_cuda_ops.py ${KEY:+-k "$KEY"} "${PYTEST_ARGS[@]}"
fi

if [ "$BENCH" = 1 ]; then
  if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('pyengine.bench.kernels') else 1)"; then
    echo "== microbenchmark: pyengine.bench.kernels --ops ${OP/all/<all>}"
    if [ "$OP" = all ]; then
      "$PY" -c "from pyengine.bench.kernels import main; main([])"
    else
      "$PY" -c "from pyengine.bench.kernels import main; main(['--ops', '$OP'])"
    fi
  else
    echo "== microbenchmark skipped: pyengine.bench.kernels is not in this tree"
  fi
fi
