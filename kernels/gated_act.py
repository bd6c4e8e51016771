"""Gated MLP activation in Triton: act(gate) * up for x = [gate | up]."""
import functools

import torch
import triton
import triton.language as tl

from . import _tuned, _validate as _v

_KINDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@triton.jit
def _erf(x):
    """erf in fp32 without libdevice: a minimax approximation after N. Juffa's erff
    (about 1 ulp): a polynomial in x^2 for |x| <= 0.927734375, else 1 - exp(poly(|x|))."""
    t = tl.abs(x)
    s = x * x
    r = -1.72853470e-5 * t + 3.83197126e-4
    u = -3.88396438e-3 * t + 2.42546219e-2
    r = r * s + u
    r = r * t - 1.06777877e-1
    r = r * t - 6.34846687e-1
    r = r * t - 1.28717512e-1
    r = r * t - t
    big = 1.0 - tl.exp(r)
    big = tl.where(x < 0.0, -big, big)
    p = -5.96761703e-4
    p = p * s + 4.99119423e-3
    p = p * s - 2.67681349e-2
    p = p * s + 1.12819925e-1
    p = p * s - 3.76125336e-1
    p = p * s + 1.28379166e-1
    small = p * x + x
    return tl.where(t > 0.927734375, big, small)


@triton.jit
def _tanh(x):
    # From exp(-2|x|) in (0, 1]: never overflows, saturates to +-1 for large |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _sigmoid(x):
    # From exp(-|x|) in (0, 1]: never overflows for very negative x.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _gated_act_kernel(X, OUT, stride_x, stride_o, I, KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    g = tl.load(X + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + I + offs, mask=ok, other=0.0).to(tl.float32)
    if KIND != 0:
        # For the gelus ptxas sinks the `up` load below the activation math, which needs
        # only the gate (sm_90 SASS at 8 elements per thread: ~100 instructions between
        # the loads), so a thread waits for two DRAM round trips in a row. A use of `up`
        # ahead of that math keeps both loads in flight together. It changes no result:
        # a NaN in `up` makes the product NaN either way.
        g = tl.where(up != up, up, g)
    if KIND == 0:
        a = g * _sigmoid(g)
    elif KIND == 1:
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        a = 0.5 * g * (1.0 + _erf(g * 0.7071067811865476))
    tl.store(OUT + row * stride_o + offs, (a * up).to(OUT.dtype.element_ty), mask=ok)


_check = functools.partial(_v.check, "gated_act")

# Candidates the benchmark times (python -m pyengine.bench kernels --op-sweep), as config
# dicts for _launch; the launcher's own choice is min(next_pow2(I), 2048) columns, 4 warps
# up to 1024 columns else 8 (8 elements, one 16-byte load of each half, per thread).
# Registers stay at 24 to 36 on sm_90 for all of them. Not measured yet.
SWEEP_CONFIGS = [
    # 3072 = 3 x 1024: no masked lanes (2048 leaves half of each row's second program
    # idle), 8 elements per thread as today.
    {"block": 1024, "num_warps": 4},
    {"block": 512, "num_warps": 2},
    # 4 elements (8-byte loads) per thread, more threads per program.
    {"block": 1024, "num_warps": 8},
    {"block": 512, "num_warps": 4},
    {"block": 2048, "num_warps": 16},
    # One program per row of 3072 (a quarter of the lanes masked): a third as many programs.
    {"block": 4096, "num_warps": 16},
    # 16 elements per thread; ptxas issues the second pair of loads after part of the math.
    {"block": 4096, "num_warps": 8},
]
_POW2 = ("block", "num_warps")
_LIMITS = {"block": 16384, "num_warps": 32}

_CONFIG_KEYS = ("block", "num_warps")


def check_config(config):
    """A config dict's own rules, whatever the shape (a tuned-configs file's entries are
    checked with them when an engine starts): known keys, positive ints, powers of two
    and limits; the launcher checks what depends on the shape."""
    _v.launch_config("gated_act", config, dict.fromkeys(_CONFIG_KEYS, 1), _POW2, _LIMITS)


def tune_key(x, kind, config=None):
    """The shape key of a launch in a tuned-configs file (kernels/_tuned.py)."""
    return f"{_tuned.dtype_name(x.dtype)}/i{x.shape[-1] // 2}/{kind}"


def _launch(x, kind, config=None):
    """config: None (the tuned config for this shape where a configs file has one, else
    the launcher's choice) or a dict with "block" (columns per program) and/or
    "num_warps", powers of two; the benchmark's sweep passes SWEEP_CONFIGS entries."""
    _check(kind in _KINDS, lambda: f"unknown gated activation {kind!r}; expected 'silu', 'gelu_tanh' or 'gelu'")
    _check(isinstance(x, torch.Tensor) and x.dim() >= 1,
           lambda: f"x must be a tensor (..., 2I), got {getattr(x, 'shape', type(x))}")
    _check(x.dtype in _v.DTYPES, lambda: f"x.dtype must be float16, bfloat16 or float32, got {x.dtype}")
    _check(x.shape[-1] % 2 == 0, lambda: f"x's last dim must be even ([gate | up]), got {x.shape[-1]}")
    I2 = x.shape[-1]
    I = I2 // 2
    block = min(_v.next_pow2(I), 2048)
    warps = 4 if block <= 1024 else 8
    if config is None:
        config = _tuned.lookup(x.device, "triton/gated_act", lambda: tune_key(x, kind))
    if config is not None:
        cfg = _v.launch_config("gated_act", config, {"block": block, "num_warps": warps}, _POW2, _LIMITS)
        block, warps = cfg["block"], cfg["num_warps"]
    out = torch.empty((*x.shape[:-1], I), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, I2)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    o2 = out.view(-1, I)
    grid = (x2.shape[0], _v.cdiv(I, block))
    _gated_act_kernel[grid](x2, o2, x2.stride(0), o2.stride(0), I, KIND=_KINDS[kind], BLOCK=block,
                            num_warps=warps)
    return out


def gated_act(x, kind):
    """act(gate) * up, computed in fp32.

    x: (..., 2I) float16/bfloat16/float32 = [gate | up] (usually (T, 2I)); kind: "silu"
    (SwiGLU), "gelu_tanh" (GeGLU as Gemma) or "gelu" (exact erf GELU).
    Returns (..., I) in x's dtype.
    """
    return _launch(x, kind)
