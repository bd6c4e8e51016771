#!/usr/bin/env bash
# GPU machine check, offline, about 6 minutes on an H200 (build 41 s, kernels with both
# sweeps 88 s + 19 s, GPU tests 172 s on 14 workers, model benchmark 71 s): build
# pyengine._C, the kernel microbenchmarks with the config sweeps, every GPU test (whoever
# wrote them; with the tuned configs the sweeps wrote), the model
# benchmark (CUDA graphs on and off) and, if asked, a profile of one engine pass, then
# print a table of steps, status and timings. Each step has a time budget (env below); a step
# that fails or runs out of time is reported in the table and makes the script exit 1:
# nothing fails silently. Logs go to $GPU_CHECK_LOGS (default bench-results/gpu_check).
#
# usage: scripts/gpu_check.sh
# env:   PYTHON (default python3; the machine's Python with torch), PYENGINE_CUDA_ARCHS
#        (default: this GPU's architecture), the budgets in seconds BUILD_S=240 TESTS_S=240 KERNELS_S=300
#        BENCH_S=260, TEST_WORKERS=12 (pytest-xdist workers where it is installed: the GPU
#        tests are mostly Triton compiles, which run on the CPU), BENCH_ARGS (the model
#        benchmark's options; default four presets, one timed pass, transformers against
#        pyengine's default with and without CUDA graphs; add pyengine-lora to --providers
#        for a LoRA adapter's cost, when the device time allows), KERNELS_ARGS (the kernel
#        benchmark's; default --repeats 10 --attn-sweep --op-sweep --graph --write-configs
#        $GPU_CHECK_TUNED: the op sweep compiles and times about 50 launch configs),
#        GPU_CHECK_TUNED (default $LOGS/kernel_configs.json: the tuned-configs file the
#        sweeps write; where it exists, the kernels-tuned step re-times the ops it names
#        with it, TUNED_S=150, and the later steps run with it; copy it to
#        kernels/configs/<GPU name>.json to ship it), PROFILE_S=0 (a positive budget runs
#        the profile of one engine pass per preset, PROFILE_PRESETS), GPU_CHECK_STEPS (default
#        build,tests,kernels,bench,profile: a subset splits the check over two calls; "vision"
#        adds the vision-language benchmarks, VISION_S=240 each, VISION_ARGS,
#        VISION_NEMOTRON_ARGS and VISION_VIDEO_ARGS),
#        GPU_CHECK_ALLOW_CPU=1 (dry run of this script without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${GPU_CHECK_LOGS:-bench-results/gpu_check}
mkdir -p "$LOGS"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYENGINE_REQUIRE_CUDA_BUILD=1 TOKENIZERS_PARALLELISM=false
TUNED=${GPU_CHECK_TUNED:-$LOGS/kernel_configs.json}
T_START=$(date +%s.%N)

NAMES=() STATUS=() SECS=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# step NAME BUDGET_S CMD...: runs CMD under a timeout, output to the screen and $LOGS/NAME.log
step() {
  local name=$1 budget=$2; shift 2
  echo
  echo "=============== $name (budget ${budget}s): $*"
  local t0; t0=$(date +%s.%N)
  timeout --signal=TERM --kill-after=10 "$budget" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  local s; s=$(elapsed "$t0")
  if [ "$rc" = 0 ]; then record "$name" ok "$s"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then record "$name" "TIMEOUT(${budget}s)" "$s"
  else record "$name" "FAILED(rc=$rc)" "$s"; fi
  return "$rc"
}
skip() { echo; echo "=============== $1: skipped ($2)"; record "$1" "skipped: $2" 0; }

echo "gpu_check: $(date -u +%FT%TZ) in $PWD"
nvidia-smi -L 2>/dev/null || echo "gpu_check: nvidia-smi not found"
"$PY" - <<'PYEOF' || [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ] || { echo "gpu_check: no usable torch+CUDA in $PY"; exit 1; }
import sys, sysconfig, os, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
inc = sysconfig.get_paths()["include"]
print(f"Python.h {'found' if os.path.exists(os.path.join(inc, 'Python.h')) else 'MISSING'} in {inc}; triton {tv}")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
sys.exit(0 if torch.cuda.is_available() else 1)
PYEOF

# Build for this GPU's architecture only (half the build time of the default two), unless set.
if [ -z "${PYENGINE_CUDA_ARCHS:-}" ]; then
  PYENGINE_CUDA_ARCHS=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null) \
    && export PYENGINE_CUDA_ARCHS && echo "gpu_check: PYENGINE_CUDA_ARCHS=$PYENGINE_CUDA_ARCHS (this GPU's)"
fi

# GPU_CHECK_STEPS (default all): a comma list of build, tests, kernels, bench, profile, to
# to split the check over two runs (the build stays).
want() { [[ ",${GPU_CHECK_STEPS:-build,tests,kernels,bench,profile}," == *",$1,"* ]]; }

# 1. build (editable, offline, no dependency resolution)
if ! want build; then
  skip build "not in GPU_CHECK_STEPS"
elif step build "${BUILD_S:-240}" "$PY" -m pip install --no-deps --no-build-isolation -v -e .; then
  step import-ext 30 "$PY" -c "import pyengine._C as C; print(C.__file__); print(C.build_info())"
else
  skip import-ext "the build failed"
fi

# 2. kernel microbenchmarks (pyengine/bench/kernels.py), where the tree has them
if ! want kernels; then
  skip bench-kernels "not in GPU_CHECK_STEPS"
elif "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('pyengine.bench.kernels') else 1)" 2>/dev/null; then
  # shellcheck disable=SC2086
  step bench-kernels "${KERNELS_S:-300}" "$PY" -m pyengine.bench kernels ${KERNELS_ARGS:---repeats 10 --attn-sweep --op-sweep --graph --write-configs "$TUNED"} --json "$LOGS/kernels.json"
  # the ops the sweeps found a faster config for, timed again as the engine now runs them
  TUNED_OPS=$([ -f "$TUNED" ] && "$PY" -c "import json, sys; print(','.join(sorted({k.split('/')[1] for k, t in json.load(open(sys.argv[1])).get('ops', {}).items() if t})))" "$TUNED" 2>/dev/null)
  if [ -n "$TUNED_OPS" ]; then
    step kernels-tuned "${TUNED_S:-150}" env PYENGINE_KERNEL_CONFIGS="$TUNED" "$PY" -m pyengine.bench kernels --repeats 10 --graph --backends triton,cuda --ops "$TUNED_OPS" --json "$LOGS/kernels_tuned.json"
  else
    skip kernels-tuned "no tuned configs file, or the built-in configs won every sweep"
  fi
else
  skip bench-kernels "pyengine.bench.kernels not in this tree"
fi
# the later steps run with the tuned configs, as the engine would with them shipped (a file
# that does not load is reported and left out, so that it cannot fail every later step)
if [ -f "$TUNED" ]; then
  if "$PY" -c "import sys; from pyengine.kernels import _tuned; _tuned.load(sys.argv[1])" "$TUNED"; then
    export PYENGINE_KERNEL_CONFIGS="$TUNED"; echo "gpu_check: PYENGINE_KERNEL_CONFIGS=$TUNED"
  else
    echo "gpu_check: $TUNED does not load (above): the later steps run with the shipped configs" >&2
  fi
fi

# 3. every GPU test in the tree, after the kernel benchmark (whose timings want an idle
#    machine) and with the tuned configs it wrote, so the tests run the configs shipped
PYTEST_OPTS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTS=(--timeout=120)
"$PY" -c "import xdist" 2>/dev/null && [ "${TEST_WORKERS:-12}" -gt 1 ] && PYTEST_OPTS+=(-n "${TEST_WORKERS:-12}")
if want tests; then
  step gpu-tests "${TESTS_S:-240}" "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider "${PYTEST_OPTS[@]}" tests
else
  skip gpu-tests "not in GPU_CHECK_STEPS"
fi

# 4. the model benchmark (python -m pyengine.bench), where the tree has it
if ! want bench; then
  skip bench "not in GPU_CHECK_STEPS"
elif [ -f pyengine/bench/__main__.py ]; then
  # shellcheck disable=SC2086
  step bench "${BENCH_S:-260}" "$PY" -m pyengine.bench ${BENCH_ARGS:---preset minilm-l6,bert-base,qwen3-0.6b,qwen2-1.5b --repeats 1 --single-sample 32 --providers hf,pyengine-cuda,pyengine-eager --no-progress --json "$LOGS/bench.json"}
else
  skip bench "pyengine/bench/__main__.py not in this tree"
fi

# 4b. the vision-language benchmark, only when GPU_CHECK_STEPS names "vision" (the device
#     time goes to the kernel targets first)
if [[ ",${GPU_CHECK_STEPS:-}," == *",vision,"* ]]; then
  # shellcheck disable=SC2086
  step vision "${VISION_S:-240}" "$PY" -m pyengine.bench vision ${VISION_ARGS:---num-prompts 128 --repeats 2} --json "$LOGS/vision.json"
  # the Nemotron VL reranker's shapes: SigLIP tiles in front of the bidirectional Llama
  # shellcheck disable=SC2086
  step vision-nemotron "${VISION_S:-240}" "$PY" -m pyengine.bench vision ${VISION_NEMOTRON_ARGS:---preset nemotron-vl-1b --num-prompts 64 --repeats 2} --json "$LOGS/vision-nemotron.json"
  # videos of 8 frames (four groups of patches) on Qwen2-VL-2B's shapes
  # shellcheck disable=SC2086
  step vision-video "${VISION_S:-240}" "$PY" -m pyengine.bench vision ${VISION_VIDEO_ARGS:---preset qwen2-vl-2b --num-prompts 64 --repeats 2 --video-frames 8} --json "$LOGS/vision-video.json"
else
  skip vision "not in GPU_CHECK_STEPS"
fi

# 5. where an engine pass spends its time (host vs GPU, top kernels), when PROFILE_S > 0
if want profile && [ "${PROFILE_S:-0}" -gt 0 ]; then
  step profile "${PROFILE_S:-0}" "$PY" scripts/profile_engine.py --preset "${PROFILE_PRESETS:-bert-base,qwen3-0.6b}"
else
  skip profile "PROFILE_S unset or 0"
fi

# summary
echo
if [ -f "$LOGS/kernels.json" ]; then
  echo "=============== kernels (ms; GB/s and % of copy bandwidth, or TFLOP/s; x torch)"
  "$PY" - "$LOGS/kernels.json" <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))
for r in rows:
    if r.get("sweep") == "op":
        continue  # summarised below; every config is in bench-kernels.log
    v = (f"{r['gbps']:.0f} GB/s {r.get('pct_copy') or 0:.0f}%" if r.get("gbps") else
         f"{r['tflops']:.0f} TFLOP/s" if r.get("tflops") else "")
    x = f"{r['vs_torch']:.2f}x" if r.get("vs_torch") else ""
    print(f"{r['op'][:16]:16} {r['case'][:18]:18} {r['backend']:12} "
          + (f"{r['ms']:8.4f} ms {v:18} {x}" if r["ms"] else f"ERROR {r['error']}"))
# --op-sweep: per op, case and backend, the default config and the fastest one.
sweep = [r for r in rows if r.get("sweep") == "op"]
if sweep:
    label = lambda c: "default" if c is None else " ".join(f"{k}={v}" for k, v in c.items()) if isinstance(c, dict) else str(c)
    best = {}
    for r in sweep:
        key = (r["op"], r["case"], r["backend"])
        d, b, failed = best.get(key, (None, None, 0))
        if not r["ms"]:
            best[key] = (d, b, failed + 1)
            continue
        best[key] = (r if r["config"] is None else d, r if b is None or r["ms"] < b["ms"] else b, failed)
    print("=============== op config sweep: best config per op (default config for comparison)")
    for (op, case, backend), (d, b, failed) in best.items():
        dflt = f"default {d['ms']:.4f} ms {d['pct_copy']:.0f}%" if d else "default failed"
        won = (f"best {label(b['config'])}: {b['ms']:.4f} ms {b['pct_copy']:.0f}% copy"
               + (f" ({d['ms'] / b['ms']:.2f}x)" if d else "")) if b else "no config ran"
        print(f"{op[:16]:16} {case[:12]:12} {backend:7} {dflt:28} {won}"
              + (f"; {failed} config(s) failed" if failed else ""))
PYEOF
fi
if [ -f "$LOGS/kernels_tuned.json" ] && [ -f "$LOGS/kernels.json" ]; then
  echo "=============== tuned configs ($TUNED): built-in against tuned, ms (% copy or TFLOP/s)"
  "$PY" - "$LOGS/kernels.json" "$LOGS/kernels_tuned.json" <<'PYEOF'
import json, sys
fmt = lambda r: (f"{r['ms']:.4f} ms " + (f"{r['pct_copy']:.0f}%" if r.get("pct_copy") else f"{r['tflops']:.0f} TF")
                 if r and r.get("ms") else "-")
before = {(r["op"], r["case"], r["backend"]): r for r in json.load(open(sys.argv[1])) if not r.get("sweep")}
for r in json.load(open(sys.argv[2])):
    if r["backend"] in ("triton", "cuda"):
        b = before.get((r["op"], r["case"], r["backend"]))
        gain = f"{b['ms'] / r['ms']:.2f}x" if b and b.get("ms") and r.get("ms") else ""
        print(f"{r['op'][:16]:16} {r['case'][:18]:18} {r['backend']:7} {fmt(b):22} -> {fmt(r):22} {gain}")
PYEOF
fi
[ -f "$LOGS/bench.log" ] && { echo "=============== model benchmark (tail)"; tail -n 40 "$LOGS/bench.log"; }
echo
echo "=============== gpu_check summary ($(elapsed "$T_START") s in all; logs in $LOGS)"
grep -E "passed|failed|error|skipped|no tests ran" "$LOGS/gpu-tests.log" 2>/dev/null | tail -1 | sed 's/^/gpu-tests: /'
FAILED=0
printf '%-15s %-30s %8s\n' step status seconds
for i in "${!NAMES[@]}"; do
  printf '%-15s %-30s %8s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
  case "${STATUS[$i]}" in ok|skipped*) ;; *) FAILED=1 ;; esac
done
if [ "$FAILED" = 1 ]; then echo "gpu_check: FAILED"; exit 1; fi
echo "gpu_check: OK"
