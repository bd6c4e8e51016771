#!/usr/bin/env bash
# Kernel logic check without a GPU: build csrc/ against the CUDA emulation headers, then
# compare every op (or the ops named) with its torch reference. See docs/KERNELS.md.
#   scripts/cuda_emu/check.sh [OP ...]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
"$ROOT/scripts/cuda_emu/build.sh"
"$PY" "$ROOT/scripts/cuda_emu/check.py" "$@"
