"""The CUDA backend: the kernels in csrc/ (built as ``pyengine._C``) as torch custom ops.

Each op is a ``torch.library.custom_op`` in the ``pyengine`` namespace with a fake
(meta) implementation, so it works under ``torch.compile`` and FakeTensorMode. The
public functions here are named and called exactly like the torch references in
:mod:`pyengine.ops`; the registry there loads ``pyengine.cuda_ops:<op>`` when the
extension imports and the device is CUDA. In eager mode on plain tensors they call the
op's implementation directly (the same code the custom op runs), which saves the
dispatcher's per-call overhead; under torch.compile, on fake tensors or on tensor
subclasses they go through ``torch.ops.pyengine.<op>``.

Every op validates device, dtype, shape and strides before launch and raises a
``ValueError`` (``TypeError`` for a non-tensor) that names the op and the argument.
Launch and runtime failures come back from the extension as ``RuntimeError`` naming the
op and the CUDA error. This module imports without a GPU and without the built
extension: ``pyengine._C`` is imported on the first launch.

What the kernels trust (not checked, as it would need a device sync): ``positions``
lie in ``[0, cos_sin.shape[0])``, ``cu_seqlens`` is non-decreasing from 0 to T and
every sequence is non-empty (an empty one under "mean" gives NaN, as the reference).
"""
from __future__ import annotations

import numbers
from typing import List, Optional

import torch
from torch import Tensor

from pyengine.kernels import _tuned
from pyengine.kernels import _validate as _v

__all__ = ["add_rms_norm", "add_layer_norm", "rotary", "gather_pooled", "pooled_norm",
           "activation", "extension", "is_available", "SWEEP_CONFIGS"]

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_POOLING = {"cls": 0, "last": 1, "mean": 2}
_NORM = {None: 0, "layer": 1, "rms": 2}
_ACTIVATION = {"softmax": 0, "sigmoid": 1, "identity": 2}

_ext = None


def extension():
    """The compiled module ``pyengine._C`` (imported once); a clear error if it is absent."""
    global _ext
    if _ext is None:
        try:
            from pyengine import _C  # noqa: PLC0415
        except ImportError as e:
            raise RuntimeError(
                "pyengine.cuda_ops: the CUDA extension pyengine._C is not built "
                f"({e}); build it with `pip install --no-build-isolation -e .` where nvcc is "
                "on PATH (see docs/KERNELS.md)") from e
        _ext = _C
    return _ext


def is_available() -> bool:
    """True when the extension imports and torch sees a CUDA device."""
    try:
        extension()
    except RuntimeError:
        return False
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------

def _fail(op, msg):
    raise ValueError(f"pyengine.cuda_ops.{op}: {msg}")


def _tensor(op, name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"pyengine.cuda_ops.{op}: {name} must be a torch.Tensor, "
                        f"got {type(t).__name__}")


def _float_dtype(op, name, t):
    if t.dtype not in _DTYPE_CODE:
        _fail(op, f"{name}.dtype must be float32, float16 or bfloat16, got {t.dtype}")


def _last_contiguous(op, name, t):
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(op, f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")


def _same_device(op, named, real):
    """On a real launch: every tensor is a CUDA tensor on one device. Fake / meta
    tensors (torch.compile tracing) skip this."""
    if not real:
        return
    first = None
    for name, t in named:
        if t is None:
            continue
        if not t.is_cuda:
            _fail(op, f"{name} must be a CUDA tensor, got device {t.device} "
                      "(the CUDA backend runs on GPU tensors only; use the torch or triton "
                      "backend on this device)")
        if first is None:
            first = (name, t)
        elif t.get_device() != first[1].get_device():
            _fail(op, f"{name} is on {t.device} but {first[0]} is on {first[1].device}")


def _rows_2d(op, name, t):
    """(rows, H, row_stride) of a (..., H) tensor seen as rows with one row stride."""
    if t.dim() == 2:
        return t.shape[0], t.shape[1], t.stride(0) if t.shape[0] > 1 else t.shape[1]
    if t.dim() >= 1 and t.is_contiguous():
        H = t.shape[-1]
        return t.numel() // H if H else 0, H, H
    _fail(op, f"{name} must be 2-D (rows, H) or contiguous, got shape {tuple(t.shape)} "
              f"and strides {tuple(t.stride())}")


def _weight(op, name, w, H, x_dtype):
    _tensor(op, name, w)
    if w.shape != (H,):
        _fail(op, f"{name} must have shape ({H},), got {tuple(w.shape)}")
    _float_dtype(op, name, w)
    if not w.is_contiguous():
        _fail(op, f"{name} must be contiguous")
    if w.dtype not in (x_dtype, torch.float32):
        _fail(op, f"{name}.dtype must be float32 or the input's {x_dtype}, got {w.dtype}")


def _residual(op, residual, like, like_name):
    """residual: a tensor of like's shape and dtype, contiguous in its last dim."""
    _tensor(op, "residual", residual)
    if residual.shape != like.shape:
        _fail(op, f"residual must match {like_name}'s shape {tuple(like.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != like.dtype:
        _fail(op, f"residual.dtype must be {like_name}'s {like.dtype}, got {residual.dtype}")
    _last_contiguous(op, "residual", residual)


# Rows the norm kernels cache in shared memory as fp32, one (two for pooled_norm's block
# kernel: row and residual) per block: 128 KB, within every supported GPU's opt-in limit
# (A100: 163 KB). Past it cudaFuncSetAttribute would fail at launch.
_MAX_NORM_H = 32768
_MAX_POOLED_NORM_H = 16384


def _check_norm(op, x, residual, weight, bias, real):
    _tensor(op, "x", x)
    _float_dtype(op, "x", x)
    _last_contiguous(op, "x", x)
    rows, H, x_stride = _rows_2d(op, "x", x)
    if H == 0:
        _fail(op, "x has an empty last dim")
    if H > _MAX_NORM_H:
        _fail(op, f"H={H} is past {_MAX_NORM_H}, the widest row the kernel caches in shared memory")
    res_stride = 0
    if residual is not None:
        _residual(op, residual, x, "x")
        res_stride = _rows_2d(op, "residual", residual)[2]
    _weight(op, "weight", weight, H, x.dtype)
    if bias is not None:
        _weight(op, "bias", bias, H, x.dtype)
        if bias.dtype != weight.dtype:  # the kernel reads both as the weight's type
            _fail(op, f"bias.dtype must be weight's {weight.dtype}, got {bias.dtype}")
    _same_device(op, [("x", x), ("residual", residual), ("weight", weight), ("bias", bias)], real)
    return rows, H, x_stride, res_stride


def _ptr(t):
    return 0 if t is None else t.data_ptr()


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(t):
    """torch's current stream on t's device, as a cudaStream_t integer."""
    if _raw_stream is not None:
        return _raw_stream(t.get_device())
    return torch.cuda.current_stream(t.device).cuda_stream


def _eager(t):
    """True for a plain tensor outside torch.compile: the public functions then call the
    implementation directly, skipping the dispatcher's per-call overhead (tens of us).
    Tracing, fake tensors and subclasses go through torch.ops.pyengine.* (and the fake
    implementations)."""
    return t.__class__ is Tensor and not torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------
# add_rms_norm / add_layer_norm
# ----------------------------------------------------------------------------------------

def _norm(op, x, residual, weight, bias, eps, offset):
    """Validates, allocates (normed, summed-or-None) and launches."""
    rows, H, x_stride, res_stride = _check_norm(op, x, residual, weight, bias, real=True)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = None
    if residual is not None:
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows:
        C = extension()
        args = (_DTYPE_CODE[x.dtype], _DTYPE_CODE[weight.dtype], x.data_ptr(), x_stride,
                _ptr(residual), res_stride, weight.data_ptr())
        tail = (out.data_ptr(), _ptr(summed), rows, H, float(eps))
        if op == "add_rms_norm":
            C.add_rms_norm(*args, *tail, float(offset), x.get_device(), _stream(x))
        else:
            C.add_layer_norm(*args, _ptr(bias), *tail, x.get_device(), _stream(x))
    return out, summed


def _rms_norm_impl(x: Tensor, weight: Tensor, eps: float, offset: float) -> Tensor:
    return _norm("add_rms_norm", x, None, weight, None, eps, offset)[0]


_rms_norm_op = torch.library.custom_op(
    "pyengine::rms_norm", _rms_norm_impl, mutates_args=())


@_rms_norm_op.register_fake
def _(x, weight, eps, offset):
    _check_norm("add_rms_norm", x, None, weight, None, real=False)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _add_rms_norm_impl(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                     offset: float) -> tuple[Tensor, Tensor]:
    return _norm("add_rms_norm", x, residual, weight, None, eps, offset)


_add_rms_norm_op = torch.library.custom_op(
    "pyengine::add_rms_norm", _add_rms_norm_impl, mutates_args=())


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, offset):
    _check_norm("add_rms_norm", x, residual, weight, None, real=False)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def _layer_norm_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
    return _norm("add_layer_norm", x, None, weight, bias, eps, 0.0)[0]


_layer_norm_op = torch.library.custom_op(
    "pyengine::layer_norm", _layer_norm_impl, mutates_args=())


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    _check_norm("add_layer_norm", x, None, weight, bias, real=False)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _add_layer_norm_impl(x: Tensor, residual: Tensor, weight: Tensor, bias: Optional[Tensor],
                       eps: float) -> tuple[Tensor, Tensor]:
    return _norm("add_layer_norm", x, residual, weight, bias, eps, 0.0)


_add_layer_norm_op = torch.library.custom_op(
    "pyengine::add_layer_norm", _add_layer_norm_impl, mutates_args=())


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    _check_norm("add_layer_norm", x, residual, weight, bias, real=False)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def _as_rows(t):
    """An N-D (N != 2) input that is not contiguous is copied, as the kernels see rows of
    one stride; 2-D inputs keep any row stride."""
    if isinstance(t, Tensor) and t.dim() != 2 and not t.is_contiguous():
        return t.contiguous()
    return t


def add_rms_norm(x, residual, weight, eps, offset=0.0):
    """RMSNorm(x + residual) * (weight + offset), fp32 statistics (pyengine.ops.add_rms_norm).

    x: (rows, H) with any row stride, or contiguous (..., H); float32/float16/bfloat16.
    residual: like x, or None; weight: (H,) in x's dtype or float32.
    Returns (normed, summed) in x's dtype; summed is x itself when residual is None."""
    xs, rs, eps, offset = _as_rows(x), _as_rows(residual), float(eps), float(offset)
    if residual is None:
        if _eager(x):
            return _rms_norm_impl(xs, weight, eps, offset), x
        return torch.ops.pyengine.rms_norm(xs, weight, eps, offset), x
    if _eager(x):
        return _add_rms_norm_impl(xs, rs, weight, eps, offset)
    return torch.ops.pyengine.add_rms_norm(xs, rs, weight, eps, offset)


def add_layer_norm(x, residual, weight, bias, eps):
    """LayerNorm(x + residual), fp32 statistics (pyengine.ops.add_layer_norm).

    Shapes and dtypes as add_rms_norm; bias: (H,) or None.
    Returns (normed, summed) in x's dtype; summed is x itself when residual is None."""
    xs, rs, eps = _as_rows(x), _as_rows(residual), float(eps)
    if residual is None:
        if _eager(x):
            return _layer_norm_impl(xs, weight, bias, eps), x
        return torch.ops.pyengine.layer_norm(xs, weight, bias, eps), x
    if _eager(x):
        return _add_layer_norm_impl(xs, rs, weight, bias, eps)
    return torch.ops.pyengine.add_layer_norm(xs, rs, weight, bias, eps)


# ----------------------------------------------------------------------------------------
# rotary
# ----------------------------------------------------------------------------------------

def _check_rotary(q, k, positions, cos_sin, real):
    op = "rotary"
    for name, t in (("q", q), ("k", k), ("positions", positions), ("cos_sin", cos_sin)):
        _tensor(op, name, t)
    if q.dim() != 3 or k.dim() != 3:
        _fail(op, f"q and k must be 3-D (T, heads, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    _float_dtype(op, "q", q)
    if k.dtype != q.dtype:
        _fail(op, f"k.dtype must be q's {q.dtype}, got {k.dtype}")
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        _fail(op, f"k must be (T={T}, heads, D={D}), got {tuple(k.shape)}")
    _last_contiguous(op, "q", q)
    _last_contiguous(op, "k", k)
    if positions.dim() != 1 or positions.shape[0] != T:
        _fail(op, f"positions must be 1-D of length T={T}, got {tuple(positions.shape)}")
    if positions.dtype != torch.int64:
        _fail(op, f"positions.dtype must be int64, got {positions.dtype}")
    if not positions.is_contiguous():
        _fail(op, "positions must be contiguous")
    if cos_sin.dim() != 2 or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        _fail(op, f"cos_sin must be a contiguous 2-D (max_pos, R) float32 tensor, got shape "
                  f"{tuple(cos_sin.shape)}, dtype {cos_sin.dtype}")
    R = cos_sin.shape[1]
    if R == 0 or R % 2 or R > D:
        _fail(op, f"the rotated width R=cos_sin.shape[1]={R} must be even, > 0 and <= head_dim={D}")
    _same_device(op, [("q", q), ("k", k), ("positions", positions), ("cos_sin", cos_sin)], real)
    for name, t in (("q", q), ("k", k)):
        _v.check_no_overlap(op, name, t)
    _v.check_index_range(op, "positions", positions, cos_sin.shape[0], "cos_sin")  # host tensors only


def _rotary_impl(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor, neox: bool) -> None:
    _check_rotary(q, k, positions, cos_sin, real=True)
    T, Hq, _ = q.shape
    Hk = k.shape[1]
    if T == 0 or Hq + Hk == 0:
        return
    extension().rotary(_DTYPE_CODE[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), Hq,
                       k.data_ptr(), k.stride(0), k.stride(1), Hk, positions.data_ptr(),
                       cos_sin.data_ptr(), T, cos_sin.shape[1], bool(neox), q.get_device(),
                       _stream(q))


_rotary_op = torch.library.custom_op(
    "pyengine::rotary", _rotary_impl, mutates_args=("q", "k"))


@_rotary_op.register_fake
def _(q, k, positions, cos_sin, neox):
    _check_rotary(q, k, positions, cos_sin, real=False)


def rotary(q, k, positions, cos_sin, neox=True):
    """Rotary embedding in place on q (T, Hq, D) and k (T, Hk, D) (pyengine.ops.rotary).

    q, k: float32/float16/bfloat16, last dim contiguous, any token/head stride (views of a
    fused qkv buffer work); positions: (T,) int64; cos_sin: (max_pos, R) float32
    contiguous, cos then sin, R even and <= D (partial rotary rotates the first R).
    neox=True rotates halves, False interleaved pairs. Returns (q, k)."""
    if _eager(q):
        _rotary_impl(q, k, positions, cos_sin, bool(neox))
    else:
        torch.ops.pyengine.rotary(q, k, positions, cos_sin, bool(neox))
    return q, k


# ----------------------------------------------------------------------------------------
# gather_pooled / pooled_norm
# ----------------------------------------------------------------------------------------

def _check_cu(op, cu_seqlens):
    _tensor(op, "cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        _fail(op, f"cu_seqlens must be 1-D (B+1,), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        _fail(op, f"cu_seqlens.dtype must be int32, got {cu_seqlens.dtype}")
    if not cu_seqlens.is_contiguous():
        _fail(op, "cu_seqlens must be contiguous")


def _check_hidden(op, hidden):
    _tensor(op, "hidden", hidden)
    if hidden.dim() != 2:
        _fail(op, f"hidden must be 2-D (T, H), got shape {tuple(hidden.shape)}")
    _float_dtype(op, "hidden", hidden)
    _last_contiguous(op, "hidden", hidden)
    if hidden.shape[1] == 0:
        _fail(op, "hidden has an empty last dim")


def _check_gather(hidden, cu_seqlens, pooling, real):
    op = "gather_pooled"
    if pooling not in _POOLING:
        _fail(op, f"unknown pooling {pooling!r}; expected 'cls', 'last' or 'mean'")
    _check_hidden(op, hidden)
    _check_cu(op, cu_seqlens)
    _same_device(op, [("hidden", hidden), ("cu_seqlens", cu_seqlens)], real)


def _row_stride(t):
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _gather_pooled_impl(hidden: Tensor, cu_seqlens: Tensor, pooling: str) -> Tensor:
    _check_gather(hidden, cu_seqlens, pooling, real=True)
    B = cu_seqlens.numel() - 1
    H = hidden.shape[1]
    out = torch.empty((B, H), dtype=hidden.dtype, device=hidden.device)
    if B:
        extension().gather_pooled(_DTYPE_CODE[hidden.dtype], hidden.data_ptr(),
                                  _row_stride(hidden), H, cu_seqlens.data_ptr(), B,
                                  _POOLING[pooling], out.data_ptr(), hidden.get_device(),
                                  _stream(hidden))
    return out


_gather_pooled_op = torch.library.custom_op(
    "pyengine::gather_pooled", _gather_pooled_impl, mutates_args=())


@_gather_pooled_op.register_fake
def _(hidden, cu_seqlens, pooling):
    _check_gather(hidden, cu_seqlens, pooling, real=False)
    return hidden.new_empty((cu_seqlens.shape[0] - 1, hidden.shape[1]))


def gather_pooled(hidden, cu_seqlens, pooling):
    """One row per sequence (pyengine.ops.gather_pooled). hidden: (T, H), last dim
    contiguous; cu_seqlens: (B+1,) int32; pooling: "cls" | "last" | "mean" (fp32 sum).
    Returns (B, H) in hidden's dtype."""
    if _eager(hidden):
        return _gather_pooled_impl(hidden, cu_seqlens, pooling)
    return torch.ops.pyengine.gather_pooled(hidden, cu_seqlens, pooling)


# pooled_norm(config=...): which kernel its "mean" path runs where the warp-per-row kernel
# applies (16-byte aligned rows, H up to 32 * (16 bytes / element size) * 16, or * 8 with
# a residual); cls / last and the other mean cases ignore it. None: that kernel, as
# without a config. {"variant": "slices", ...}: csrc/pooled_norm_slices.cu's sliced kernel, where
#   slice_rows     a block takes at most this many rows of one sequence; longer sequences
#                  are finished by a second kernel from per-slice fp32 sums (a workspace
#                  of ceil(T / slice_rows) + B rows of H floats); 0: whole sequences
#   warps          warps per block, 1..8
#   rows_per_warp  1, 2 or 4 rows' loads in flight per warp (lowered where a lane would
#                  hold more than 16 packs of 16 bytes)
#   blocks_per_sm  0: one block per slice; k: k blocks per SM, each looping over slices
# Every variant sums in an order fixed by a sequence's length, so results are
# deterministic and do not depend on the other sequences in the batch.
# {"variant": "early_affine"}: the default kernel with each thread's weight and bias
# columns loaded into registers when the block starts (the default loads them after the row
# loop: one more dependent round trip per block); the other keys are ignored.
# {"variant": "async", "rows_per_warp": n}: early_affine with the rows staged in shared
# memory by cp.async, n (1, 2 or 4) rows per warp in flight beside the one being normed
# (the default: one, in registers); 8 warps per block, (n + 1) x 16 KB of shared memory per
# block at H = 1024 (twice that with a residual). early_affine and async apply up to
# H = 32 x 4 x (16 bytes / element size) (1024 at 16 bits); past it the default kernel runs.
_PN_VARIANTS = {"slices": 1, "early_affine": 2, "async": 3}
_PN_PARAMS = {"slice_rows": 128, "warps": 8, "rows_per_warp": 2, "blocks_per_sm": 0}
_PN_MAX_WARPS = 8
_PN_MAX_BLOCKS_PER_SM = 64

# Candidates for the kernel benchmark's sweep (`--op-sweep` times each beside the default,
# config=None). Not yet measured: the default stays None until one is faster on the
# benchmark's mixed workload.
SWEEP_CONFIGS = {
    "pooled_norm": [
        # rows in flight alone, whole sequences per block
        {"variant": "slices", "slice_rows": 0, "warps": 8, "rows_per_warp": 2, "blocks_per_sm": 0},
        {"variant": "slices", "slice_rows": 0, "warps": 8, "rows_per_warp": 4, "blocks_per_sm": 0},
        # split sequences, bounding every block's work
        {"variant": "slices", "slice_rows": 64, "warps": 8, "rows_per_warp": 2, "blocks_per_sm": 0},
        {"variant": "slices", "slice_rows": 128, "warps": 8, "rows_per_warp": 2, "blocks_per_sm": 0},
        {"variant": "slices", "slice_rows": 128, "warps": 4, "rows_per_warp": 4, "blocks_per_sm": 0},
        {"variant": "slices", "slice_rows": 256, "warps": 8, "rows_per_warp": 2, "blocks_per_sm": 0},
        {"variant": "slices", "slice_rows": 256, "warps": 8, "rows_per_warp": 4, "blocks_per_sm": 0},
        # a grid sized to the SM count
        {"variant": "slices", "slice_rows": 128, "warps": 8, "rows_per_warp": 2, "blocks_per_sm": 2},
        # the default kernel, its affine part's loads issued at the start
        {"variant": "early_affine"},
        # rows in flight through shared memory: the default keeps one per warp in registers
        {"variant": "async", "rows_per_warp": 1},
        {"variant": "async", "rows_per_warp": 2},
        {"variant": "async", "rows_per_warp": 4},
    ],
}


def _pooled_norm_tune_key(hidden, cu_seqlens, pooling, norm_kind, weight=None, bias=None, eps=None, offset=0.0,
                          residual=None, config=None):
    """The shape key of a launch in a tuned-configs file (pyengine.kernels._tuned)."""
    return _tuned.pooled_key(hidden.dtype, hidden.shape[1], pooling, norm_kind, residual is not None)


# op -> the shape key of its launch arguments, for the ops in SWEEP_CONFIGS
TUNE_KEYS = {"pooled_norm": _pooled_norm_tune_key}


def _pooled_norm_config(config):
    """None, or a pooled_norm config as the 5 ints the custom op carries: [variant id,
    slice_rows, warps, rows_per_warp, blocks_per_sm]. config: None, a dict as described
    above ({"variant": "default"} is None), or those 5 ints."""
    op = "pooled_norm"
    if config is None:
        return None
    names = ["variant", *_PN_PARAMS]
    if isinstance(config, dict):
        unknown = sorted(set(config) - set(names), key=str)
        if unknown:
            _fail(op, f"config has unknown keys {unknown}; expected {names}")
        variant = config.get("variant")
        if variant == "default":
            if len(config) > 1:
                _fail(op, "config {'variant': 'default'} takes no parameters, got "
                          f"{sorted(set(config) - {'variant'})}")
            return None
        if variant not in _PN_VARIANTS:
            _fail(op, f"config variant must be 'default' or one of {sorted(_PN_VARIANTS)}, "
                      f"got {variant!r}")
        vals = [_PN_VARIANTS[variant]] + [config.get(k, d) for k, d in _PN_PARAMS.items()]
    elif isinstance(config, (list, tuple)):
        vals = list(config)
        if len(vals) != len(names):
            _fail(op, f"config as a sequence must be {len(names)} ints {names}, got {config!r}")
        if vals[0] not in _PN_VARIANTS.values():
            _fail(op, f"config variant id must be one of {sorted(_PN_VARIANTS.values())} "
                      f"({_PN_VARIANTS}), got {vals[0]!r}")
    else:
        raise TypeError(f"pyengine.cuda_ops.{op}: config must be None, a dict or a sequence of "
                        f"{len(names)} ints, got {type(config).__name__}")
    for name, v in zip(names, vals):
        if not isinstance(v, int) or isinstance(v, bool):
            _fail(op, f"config {name} must be an int, got {v!r}")
    _, slice_rows, warps, rows_per_warp, blocks_per_sm = vals
    if slice_rows < 0:
        _fail(op, f"config slice_rows must be >= 0 (0: whole sequences), got {slice_rows}")
    if not 1 <= warps <= _PN_MAX_WARPS:
        _fail(op, f"config warps must be in [1, {_PN_MAX_WARPS}], got {warps}")
    if rows_per_warp not in (1, 2, 4):
        _fail(op, f"config rows_per_warp must be 1, 2 or 4, got {rows_per_warp}")
    if not 0 <= blocks_per_sm <= _PN_MAX_BLOCKS_PER_SM:
        _fail(op, f"config blocks_per_sm must be in [0, {_PN_MAX_BLOCKS_PER_SM}], got {blocks_per_sm}")
    return [int(v) for v in vals]


def _check_pooled_norm(hidden, cu_seqlens, pooling, norm_kind, weight, bias, residual, real):
    op = "pooled_norm"
    if pooling not in _POOLING:
        _fail(op, f"unknown pooling {pooling!r}; expected 'cls', 'last' or 'mean'")
    if norm_kind not in _NORM:
        _fail(op, f"unknown norm_kind {norm_kind!r}; expected None, 'layer' or 'rms'")
    _check_hidden(op, hidden)
    _check_cu(op, cu_seqlens)
    H = hidden.shape[1]
    if (norm_kind is not None or residual is not None) and H > _MAX_POOLED_NORM_H:
        _fail(op, f"H={H} is past {_MAX_POOLED_NORM_H}, the widest row the kernel normalises in shared "
                  f"memory (the triton backend takes up to 32768)")
    if residual is not None:
        _residual(op, residual, hidden, "hidden")
    if norm_kind is not None:
        if weight is None:
            _fail(op, f"norm_kind={norm_kind!r} needs a weight")
        _weight(op, "weight", weight, H, hidden.dtype)
        if norm_kind == "layer" and bias is not None:
            _weight(op, "bias", bias, H, hidden.dtype)
            if bias.dtype != weight.dtype:
                _fail(op, f"bias.dtype must be weight's {weight.dtype}, got {bias.dtype}")
    named = [("hidden", hidden), ("cu_seqlens", cu_seqlens), ("residual", residual)]
    if norm_kind is not None:
        named += [("weight", weight), ("bias", bias if norm_kind == "layer" else None)]
    _same_device(op, named, real)


def _pooled_norm_launch_config(cfg, hidden, pooling, norm_kind, residual, B, H):
    """The launcher's keyword arguments for a config (5 ints) and, when slices split
    sequences, the fp32 workspace of per-slice sums ((ceil(T / slice_rows) + B, H)),
    which the caller keeps alive until the launch is queued."""
    if cfg is None:
        return {}, None
    variant, slice_rows, warps, rows_per_warp, blocks_per_sm = cfg
    T = hidden.shape[0]
    ws = None
    # Only "mean" through a norm or with a residual reaches the warp kernels; plain mean
    # pooling is the gather kernel.
    if variant == 1 and pooling == "mean" and (norm_kind is not None or residual is not None) and 0 < slice_rows < T:
        ws = torch.empty((-(-T // slice_rows) + B, H), dtype=torch.float32, device=hidden.device)
    kw = dict(variant=variant, slice_rows=slice_rows, warps=warps, rows_per_warp=rows_per_warp,
              blocks_per_sm=blocks_per_sm, tokens=T, workspace=_ptr(ws),
              workspace_rows=0 if ws is None else ws.shape[0])
    return kw, ws


def _pooled_norm_impl(hidden: Tensor, cu_seqlens: Tensor, pooling: str, norm_kind: Optional[str],
                    weight: Optional[Tensor], bias: Optional[Tensor], eps: float, offset: float,
                    residual: Optional[Tensor], config: Optional[List[int]] = None) -> Tensor:
    cfg = _pooled_norm_config(config)
    _check_pooled_norm(hidden, cu_seqlens, pooling, norm_kind, weight, bias, residual, real=True)
    B = cu_seqlens.numel() - 1
    H = hidden.shape[1]
    out = torch.empty((B, H), dtype=torch.float32, device=hidden.device)
    if B:
        if norm_kind is None:
            weight = bias = None
        elif norm_kind == "rms":
            bias = None
        kw, _workspace = _pooled_norm_launch_config(cfg, hidden, pooling, norm_kind, residual, B, H)
        extension().pooled_norm(
            _DTYPE_CODE[hidden.dtype], _DTYPE_CODE[weight.dtype] if weight is not None else 0,
            hidden.data_ptr(), _row_stride(hidden), _ptr(residual),
            0 if residual is None else _row_stride(residual), cu_seqlens.data_ptr(), B,
            _POOLING[pooling], _NORM[norm_kind], _ptr(weight), _ptr(bias), float(eps),
            float(offset), out.data_ptr(), H, hidden.get_device(), _stream(hidden), **kw)
    return out


_pooled_norm_op = torch.library.custom_op(
    "pyengine::pooled_norm", _pooled_norm_impl, mutates_args=())


@_pooled_norm_op.register_fake
def _(hidden, cu_seqlens, pooling, norm_kind, weight, bias, eps, offset, residual, config=None):
    _pooled_norm_config(config)
    _check_pooled_norm(hidden, cu_seqlens, pooling, norm_kind, weight, bias, residual, real=False)
    return hidden.new_empty((cu_seqlens.shape[0] - 1, hidden.shape[1]), dtype=torch.float32)


def pooled_norm(hidden, cu_seqlens, pooling, norm_kind, weight, bias, eps, offset=0.0,
                residual=None, config=None):
    """Pooled rows through the final norm, in fp32 (pyengine.ops.pooled_norm).

    hidden: (T, H), last dim contiguous; cu_seqlens: (B+1,) int32; pooling: "cls" |
    "last" | "mean"; norm_kind: None | "layer" | "rms"; weight, bias: (H,) in hidden's
    dtype or float32 (bias "layer" only, may be None); offset added to the weight for
    "rms"; residual: like hidden or None, added first in hidden's dtype. "mean" averages
    the normed rows. config: None (the default kernels) or a kernel variant for "mean"
    (see _PN_VARIANTS and SWEEP_CONFIGS), checked before anything else; None takes the
    tuned config for this shape where a configs file has one (pyengine.kernels._tuned).
    Returns (B, H) float32."""
    if config is None and isinstance(hidden, Tensor) and hidden.dim() == 2:
        config = _tuned.lookup(hidden.device, "cuda/pooled_norm",
                               lambda: _pooled_norm_tune_key(hidden, cu_seqlens, pooling, norm_kind, residual=residual))
    cfg = _pooled_norm_config(config)
    args = (hidden, cu_seqlens, pooling, norm_kind, weight, bias, float(eps), float(offset),
            residual, cfg)
    if _eager(hidden):
        return _pooled_norm_impl(*args)
    return torch.ops.pyengine.pooled_norm(*args)


# ----------------------------------------------------------------------------------------
# activation
# ----------------------------------------------------------------------------------------

def _check_activation(logits, kind, bias_vec, scale_vec, real):
    op = "activation"
    if kind not in _ACTIVATION:
        _fail(op, f"unknown activation {kind!r}; expected softmax, sigmoid or identity")
    _tensor(op, "logits", logits)
    if logits.dim() != 2:
        _fail(op, f"logits must be 2-D (B, L), got shape {tuple(logits.shape)}")
    _float_dtype(op, "logits", logits)
    _last_contiguous(op, "logits", logits)
    L = logits.shape[1]
    for name, v in (("logit_bias", bias_vec), ("logit_scale", scale_vec)):
        if v is not None and (v.dtype != torch.float32 or tuple(v.shape) != (L,)
                              or not v.is_contiguous()):
            _fail(op, f"{name} vector must be contiguous float32 ({L},), got {tuple(v.shape)} {v.dtype}")
    _same_device(op, [("logits", logits), ("logit_bias", bias_vec), ("logit_scale", scale_vec)],
                 real)


def _activation_impl(logits: Tensor, kind: str, bias: float, scale: float,
                   bias_vec: Optional[Tensor], scale_vec: Optional[Tensor]) -> Tensor:
    _check_activation(logits, kind, bias_vec, scale_vec, real=True)
    B, L = logits.shape
    out = torch.empty((B, L), dtype=torch.float32, device=logits.device)
    if B and L:
        extension().activation(_DTYPE_CODE[logits.dtype], logits.data_ptr(), _row_stride(logits),
                               B, L, _ACTIVATION[kind], float(bias), float(scale),
                               _ptr(bias_vec), _ptr(scale_vec), out.data_ptr(),
                               logits.get_device(), _stream(logits))
    return out


_activation_op = torch.library.custom_op(
    "pyengine::activation", _activation_impl, mutates_args=())


@_activation_op.register_fake
def _(logits, kind, bias, scale, bias_vec, scale_vec):
    _check_activation(logits, kind, bias_vec, scale_vec, real=False)
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _operand(name, value, default, L, device):
    """(scalar, vector-or-None) for a logit_bias / logit_scale that is None, a number, or a
    tensor of 1 or L elements (broadcast over labels, as the reference's arithmetic)."""
    if value is None:
        return default, None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value), None
    if not isinstance(value, Tensor):
        raise TypeError(f"pyengine.cuda_ops.activation: {name} must be None, a number or a "
                        f"tensor, got {type(value).__name__}")
    if value.dim() > 1 or value.numel() not in (1, L):
        _fail("activation", f"{name} must have 1 or L={L} elements (shape () or (L,)), "
                            f"got shape {tuple(value.shape)}")
    if value.device != device:
        _fail("activation", f"{name} is on {value.device}, expected the logits' device {device}")
    return default, value.reshape(-1).to(torch.float32).expand(L).contiguous()


def activation(logits, kind, logit_bias=None, logit_scale=None):
    """act((logits - logit_bias) * logit_scale) in fp32 (pyengine.ops.activation).

    logits: (B, L) float32/float16/bfloat16, last dim contiguous; kind: "softmax" |
    "sigmoid" | "identity"; logit_bias, logit_scale: None, a number, or a tensor of shape
    () or (L,). Returns (B, L) float32."""
    _tensor("activation", "logits", logits)
    if logits.dim() == 2:
        L, device = logits.shape[1], logits.device
        bias, bias_vec = _operand("logit_bias", logit_bias, 0.0, L, device)
        scale, scale_vec = _operand("logit_scale", logit_scale, 1.0, L, device)
    else:  # let the op's checks name the problem
        bias, bias_vec, scale, scale_vec = 0.0, None, 1.0, None
    if _eager(logits):
        return _activation_impl(logits, kind, bias, scale, bias_vec, scale_vec)
    return torch.ops.pyengine.activation(logits, kind, bias, scale, bias_vec, scale_vec)
