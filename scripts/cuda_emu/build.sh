#!/usr/bin/env bash
# Builds csrc/ as host C++ against the CUDA emulation headers in include/ (one std::thread
# per CUDA thread, blocks one after another, __shared__ as function statics) into
# build/cuda_emu/_C*.so, for checking kernel logic on a machine without a GPU.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/scripts/cuda_emu"
OUT="$ROOT/build/cuda_emu"
PY=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
rm -rf "$OUT/src" && mkdir -p "$OUT/src"
# Rewrite what g++ cannot parse: kernel<<<grid, block, smem, stream>>>(args) and
# `extern __shared__ TYPE name[];`.
"$PY" - "$ROOT/csrc" "$OUT/src" <<'PYEOF'
import pathlib, re, sys
src, dst = map(pathlib.Path, sys.argv[1:])
for f in src.iterdir():
    s = f.read_text()
    s = re.sub(r"extern __shared__ (\w+) (\w+)\[\];",
               r"\1* \2 = reinterpret_cast<\1*>(emu::g_dyn_smem);", s)
    s = re.sub(r"^(\s*)(.+?)<<<(.+?)>>>\(", r"\1emu::launch(\2, \3)(", s, flags=re.M)
    (dst / (f.name + ".cpp" if f.suffix == ".cu" else f.name)).write_text(s)
PYEOF
INC=$("$PY" -c 'import pybind11, sysconfig; print("-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"])')
SUF=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
cd "$OUT/src"
g++ -std=c++20 -O1 -g -fPIC -shared -Wno-unknown-pragmas -I"$HERE/include" -I. $INC \
  -DPYENGINE_CUDA_ARCHS='"emu"' bindings.cpp ./*.cu.cpp -o "$OUT/_C$SUF" -lpthread
echo "built $OUT/_C$SUF"
