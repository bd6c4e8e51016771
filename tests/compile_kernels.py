"""Compile every Triton kernel the launchers produce for an NVIDIA target, without a GPU.

Run as a script (tests/test_kernels_compile.py does, in a fresh process: the test
process runs Triton in interpreter mode, which skips the compiler's checks). Each
kernel is replaced by a stub that, instead of launching, builds the signature from the
launch arguments and compiles to a cubin with triton.compile; the result per launch is
printed as one JSON line: op, constexprs, ok, error, shared bytes, the barriers (bar.sync)
inside the PTX's loops, registers and stack (spills) from cuobjdump when the wheel ships it.
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
        torch.int32: "*i32", torch.int64: "*i64"}
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin):
    if not os.path.exists(_CUOBJDUMP):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    res = {}
    for tok in out.replace(",", " ").split():
        key, _, val = tok.partition(":")
        if key in ("REG", "STACK", "LOCAL") and val.isdigit():
            res[key.lower()] = int(val)
    return res


def _loop_barriers(ptx):
    """bar.sync lines inside a loop of the PTX: between a label and a later branch back to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\$L__\w+):", line))}
    inside = set()
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            inside.update(range(labels[m.group(1)], i))
    return sum("bar.sync" in lines[i] for i in inside)


class _Compile:
    # The config of the launch being compiled, printed with each row (sweep candidates).
    config = None

    def __init__(self, kernel, op, target):
        self.kernel, self.op, self.target = kernel, op, target

    def __getitem__(self, grid):
        def run(*args, num_warps=4, num_stages=3, **constexprs):
            # Specialise as the JIT does on a launch: 16-byte aligned pointers and ints
            # divisible by 16 carry a divisibility hint, ints equal to 1 become constants.
            sig, attrs, constexprs = {}, {}, dict(constexprs)
            for i, (name, a) in enumerate(zip(self.kernel.arg_names, args)):
                if isinstance(a, torch.Tensor):
                    sig[name] = _PTR[a.dtype]
                    if a.data_ptr() % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(a, bool):
                    sig[name] = "i1"
                elif isinstance(a, int):
                    if a == 1:
                        sig[name], constexprs[name] = "constexpr", 1
                        continue
                    sig[name] = "i32"
                    if a % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(a, float):
                    sig[name] = "fp32"
                else:
                    raise TypeError(f"{self.op}: argument {name} of type {type(a).__name__}")
            sig.update({k: "constexpr" for k in constexprs if k not in sig})
            row = {"op": self.op, "constexprs": dict(constexprs), "num_warps": num_warps, "ok": False}
            if _Compile.config is not None:
                row["config"] = _Compile.config
            try:
                k = triton.compile(ASTSource(self.kernel, sig, constexprs, attrs), target=self.target,
                                   options=dict(num_warps=num_warps, num_stages=num_stages))
                row.update(ok=True, shared=k.metadata.shared, loop_barriers=_loop_barriers(k.asm["ptx"]),
                           **_resources(k.asm["cubin"]))
            except Exception as e:  # reported, the test decides
                row["error"] = f"{type(e).__name__}: {e}"[:4000]
            print(json.dumps(row), flush=True)
        return run


def _patched(op, target):
    """The op's public function, with every launched kernel of its module (``_*_kernel``:
    the main one and helpers such as a finishing pass) replaced by a compiling stub."""
    mod = importlib.import_module(f"pyengine.kernels.{op}")
    for name in dir(mod):
        kernel = getattr(mod, name)
        if name.startswith("_") and name.endswith("_kernel") and isinstance(kernel, triton.runtime.JITFunction):
            setattr(mod, name, _Compile(kernel, op, target))
    return getattr(mod, op)


def main(arch=90, tuned_files=()):
    """Compile for sm_``arch``: every launcher's kernels, the sweep candidates, and the
    Triton entries of each tuned-configs file in ``tuned_files``."""
    target = GPUTarget("cuda", arch, 32)
    bf = torch.bfloat16
    T, H = 20, 1024
    cu = torch.tensor([0, 5, 20], dtype=torch.int32)
    z = torch.zeros
    h = z(T, H, dtype=bf)
    attention = _patched("varlen_attention", target)
    for D, causal, window in ((64, False, None), (128, True, (64, -1))):
        attention(z(T, 4, D, dtype=bf), z(T, 2, D, dtype=bf), z(T, 2, D, dtype=bf), cu, 15, causal, None, window)
    # Head dims padded inside: Qwen2-VL's vision 80 (1280 / 16), SigLIP-so400m's 72, and
    # others off the multiples of 16, which take config_for's CONFIGS_PADDED
    for D, causal in ((40, True), (72, False), (80, False), (72, True), (88, True), (136, True)):
        attention(z(T, 4, D, dtype=bf), z(T, 4, D, dtype=bf), z(T, 4, D, dtype=bf), cu, 15, causal)
    # Gemma 2's shape: head_dim 256, soft-capped scores, a sliding window
    attention(z(T, 8, 256, dtype=bf), z(T, 4, 256, dtype=bf), z(T, 4, 256, dtype=bf), cu, 15, True, 0.0625,
              (4095, 0), softcap=50.0)
    # The benchmark's sweep candidates too: a config that spills or overflows shared
    # memory is caught here, not on the GPU machine.
    sweep = importlib.import_module("pyengine.kernels.varlen_attention")
    for D, configs in sweep.SWEEP_CONFIGS.items():
        for cfg in configs:
            _Compile.config = cfg
            sweep._launch(z(T, 4, D, dtype=bf), z(T, 2, D, dtype=bf), z(T, 2, D, dtype=bf), cu, 15, D == 128,
                          config=cfg)
    # the padded head dims' candidates, at the head dims they are for
    for D in (72, 88, 120):
        for cfg in sweep.SWEEP_CONFIGS_PADDED[128]:
            _Compile.config = cfg
            sweep._launch(z(T, 4, D, dtype=bf), z(T, 4, D, dtype=bf), z(T, 4, D, dtype=bf), cu, 15, False,
                          config=cfg)
    _Compile.config = None
    pooled = _patched("pooled_query_attention", target)
    pos = torch.tensor([4, 14])
    for dt, D, Hq, Hkv, causal, window in ((bf, 64, 12, 12, False, None), (bf, 128, 16, 2, True, (64, -1)),
                                           (bf, 256, 8, 8, True, None), (torch.float32, 128, 16, 8, True, None)):
        pooled(z(2, Hq, D, dtype=dt), z(T, Hkv, D, dtype=dt), z(T, Hkv, D, dtype=dt), cu, 15, pos, causal, None, window)
    pooled(z(2, 8, 256, dtype=bf), z(T, 4, 256, dtype=bf), z(T, 4, 256, dtype=bf), cu, 15, pos, True, 0.0625, None,
           softcap=50.0)
    for D in (40, 72, 136):
        pooled(z(2, 4, D, dtype=bf), z(T, 4, D, dtype=bf), z(T, 4, D, dtype=bf), cu, 15, pos, False)
    # The int64-offset variants, which batches past 2^31 / token stride take: compiled here
    # (the tiny tensors stand in for them).
    validate = importlib.import_module("pyengine.kernels._validate")
    real_long = validate.long_offsets
    validate.long_offsets = lambda T, *tensors: True
    try:
        for D, causal in ((64, False), (128, True)):
            attention(z(T, 4, D, dtype=bf), z(T, 2, D, dtype=bf), z(T, 2, D, dtype=bf), cu, 15, causal)
            pooled(z(2, 4, D, dtype=bf), z(T, 2, D, dtype=bf), z(T, 2, D, dtype=bf), cu, 15, pos, causal)
    finally:
        validate.long_offsets = real_long
    _patched("gather_pooled", target)(h, cu, "mean")
    _patched("activation", target)(z(4, 3), "softmax", 0.5, z(3))
    _patched("add_layer_norm", target)(h, h, z(H), z(H), 1e-5)
    # the Nemotron VL projector's norm over four SigLIP-so400m patches (4 x 1152), no residual
    _patched("add_layer_norm", target)(z(T, 4608, dtype=bf), None, z(4608, dtype=bf), z(4608, dtype=bf), 1e-5)
    _patched("add_rms_norm", target)(h, h, z(H, dtype=bf), 1e-6, 1.0)
    _patched("rotary", target)(z(T, 16, 128, dtype=bf), z(T, 8, 128, dtype=bf), z(T, dtype=torch.int64),
                               z(10, 64), False)
    # q and k as strided views of a fused qkv output (Qwen3-0.6B heads), and a partial
    # rotary width with interleaved pairs for the tail branch.
    qk_norm_rotary = _patched("qk_norm_rotary", target)
    qkv = z(T, 16 + 2 * 8, 128, dtype=bf)
    qk_norm_rotary(qkv[:, :16], qkv[:, 16:24], z(128, dtype=bf), z(128, dtype=bf), z(T, dtype=torch.int64),
                   z(10, 128), 1e-6, 0.0, True)
    qkv = z(T, 64 + 2 * 8, 96)
    qk_norm_rotary(qkv[:, :64], qkv[:, 64:72], z(96), z(96), z(T, dtype=torch.int32), z(10, 48), 1e-6, 1.0, False)
    _patched("gated_act", target)(z(T, 2 * 3072, dtype=bf), "gelu")
    # Qwen3-30B-A3B's expert shapes (H 2048, I 768, top 8; 8 experts here, E changes no
    # constexpr): the [gate | up] matmul over tokens, the weighted down matmul over pairs;
    # and fp32 with full-precision dots
    expert_matmul = _patched("expert_matmul", target)
    experts = torch.arange(T * 8).remainder(8).view(T, 8)
    expert_matmul(z(T, 2048, dtype=bf), z(8, 2 * 768, 2048, dtype=bf), experts)
    expert_matmul(z(T * 8, 768, dtype=bf), z(8, 2048, 768, dtype=bf), experts, z(T, 8, dtype=bf), per_pair=True)
    expert_matmul(z(T, 64), z(4, 96, 64), experts[:, :2] % 4)
    ids = z(T, dtype=torch.int64)
    _patched("embed_layer_norm", target)(ids, ids, ids, z(100, 768, dtype=bf), z(10, 768, dtype=bf),
                                         z(2, 768, dtype=bf), z(768), z(768), 1e-12, z(768, dtype=bf))
    _patched("pooled_norm", target)(h, cu, "mean", "layer", z(H), z(H), 1e-6, 0.0, h)
    # The --op-sweep candidates of the memory-bound ops, on the benchmark's shapes (bf16,
    # H = 1024, Qwen3-0.6B's heads and MLP); the patched modules launch the stubs.
    mods = {op: importlib.import_module(f"pyengine.kernels.{op}")
            for op in ("gated_act", "qk_norm_rotary", "gather_pooled", "pooled_norm", "expert_matmul")}
    qkv = z(T, 16 + 2 * 8, 128, dtype=bf)
    calls = {
        "gated_act": lambda cfg: [mods["gated_act"]._launch(z(T, 2 * 3072, dtype=bf), kind, config=cfg)
                                  for kind in ("silu", "gelu")],
        "qk_norm_rotary": lambda cfg: mods["qk_norm_rotary"]._launch(
            qkv[:, :16], qkv[:, 16:24], z(128, dtype=bf), z(128, dtype=bf), z(T, dtype=torch.int64), z(10, 128),
            1e-6, config=cfg),
        "gather_pooled": lambda cfg: mods["gather_pooled"]._launch(h, cu, "mean", config=cfg),
        "pooled_norm": lambda cfg: mods["pooled_norm"]._launch(h, cu, "mean", "layer", z(H, dtype=bf),
                                                               z(H, dtype=bf), 1e-6, config=cfg),
        "expert_matmul": lambda cfg: [
            mods["expert_matmul"]._launch(z(T, 2048, dtype=bf), z(8, 2 * 768, 2048, dtype=bf), experts, config=cfg),
            mods["expert_matmul"]._launch(z(T * 8, 768, dtype=bf), z(8, 2048, 768, dtype=bf), experts,
                                          z(T, 8, dtype=bf), True, config=cfg)],
    }
    for op, call in calls.items():
        for cfg in mods[op].SWEEP_CONFIGS:
            _Compile.config = cfg
            call(cfg)
    _Compile.config = None
    for path in tuned_files:
        _compile_tuned(path, target)


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _tuned_launch(op, key, bf):
    """A launch of ``op``'s public function whose shape key is ``key`` (the inverse of the
    launchers' tune keys), or None for an op without one here (the CUDA ops)."""
    z, T = torch.zeros, 20
    cu = torch.tensor([0, 5, 20], dtype=torch.int32)
    parts = key.split("/")
    dt = _DTYPES[parts[0]]
    num = {p[:1]: int(p[1:]) for p in parts[1:] if p[:1] in "dhir" and p[1:].isdigit()}
    if op == "varlen_attention":
        D, r = num["d"], num["r"]
        window = (64, -1) if "window" in parts else None
        return lambda f: f(z(T, 2 * r, D, dtype=dt), z(T, 2, D, dtype=dt), z(T, 2, D, dtype=dt), cu, 15,
                           parts[2] == "causal", None, window, softcap=50.0 if "softcap" in parts else None)
    if op == "gated_act":
        return lambda f: f(z(T, 2 * num["i"], dtype=dt), parts[2])
    if op == "qk_norm_rotary":
        hq, hk, d, r = (int(p[2:] if p[:2] in ("hq", "hk") else p[1:]) for p in parts[1:5])
        qkv = z(T, hq + 2 * hk, d, dtype=dt)
        return lambda f: f(qkv[:, :hq], qkv[:, hq:hq + hk], z(d, dtype=dt), z(d, dtype=dt), z(T, dtype=torch.int64),
                           z(10, r), 1e-6)
    if op == "expert_matmul":
        n, k = (int(p[1:]) for p in parts[1:3])
        return lambda f: f(z(T, k, dtype=dt), z(4, n, k, dtype=dt), torch.arange(T * 2).remainder(4).view(T, 2))
    H = num["h"]
    if op == "gather_pooled":
        return lambda f: f(z(T, H, dtype=dt), cu, parts[2])
    if op == "pooled_norm":
        norm = parts[3] if len(parts) > 3 and parts[3] in ("layer", "rms") else None
        res = z(T, H, dtype=dt) if "residual" in parts else None
        return lambda f: f(z(T, H, dtype=dt), cu, parts[2], norm, z(H, dtype=dt), z(H, dtype=dt), 1e-6, 0.0, res)
    return None


def _compile_tuned(path, target):
    """Compile every Triton entry of a tuned-configs file through its launcher, which
    must find the entry from the launch's own shape key (so the keys are ones the
    launchers build)."""
    from pyengine.kernels import _tuned

    os.environ[_tuned.ENV] = str(path)
    _tuned.reset()
    found = []
    real = _tuned.lookup

    def spy(device, op, key):
        cfg = real(device, op, key)
        found.append(cfg)
        return cfg
    _tuned.lookup = spy
    try:
        for full_op, entries in _tuned.load(path).items():
            backend, op = full_op.split("/")
            if backend != "triton":
                continue
            for key, cfg in entries.items():
                launch = _tuned_launch(op, key, torch.bfloat16)
                found.clear()
                _Compile.config = cfg
                launch(_patched(op, target))
                if cfg not in found:
                    print(json.dumps({"op": op, "constexprs": {"tuned": str(path), "key": key}, "ok": False,
                                      "error": f"the launcher did not take {path}'s config for {key}"}), flush=True)
    finally:
        _tuned.lookup = real
        _Compile.config = None
        os.environ.pop(_tuned.ENV, None)
        _tuned.reset()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90, sys.argv[2:])
