"""Fused residual add + LayerNorm in Triton: one program per row, fp32 statistics."""
import torch
import triton
import triton.language as tl

from . import _validate as _v
from .add_rms_norm import _load_row_sum


@triton.jit
def _add_layer_norm_kernel(X, RES, W, B, OUT, SUM, stride_x, stride_r, stride_o, stride_s, H, eps,
                           HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    xf = _load_row_sum(X, RES, SUM, row, offs, ok, stride_x, stride_r, stride_s, HAS_RESIDUAL)
    mean = tl.sum(xf, 0) / H
    diff = tl.where(ok, xf - mean, 0.0)
    var = tl.sum(diff * diff, 0) / H
    y = diff * tl.rsqrt(var + eps) * tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + offs, y.to(OUT.dtype.element_ty), mask=ok)


def _launch(x, residual, weight, bias, eps):
    H = _v.check_x("add_layer_norm", x)
    if residual is not None:
        _v.check_residual("add_layer_norm", residual, x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        _v.check_param("add_layer_norm", name, t, H, x.device, f"x's device {x.device}")
    x2 = _v.rows(x, H)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out, summed
    r2 = x2 if residual is None else _v.rows(residual, H)
    o2 = out.view(-1, H)
    s2 = o2 if residual is None else summed.view(-1, H)  # unwritten without a residual; x may not view
    block_h = _v.next_pow2(H)
    warps = 4 if block_h <= 1024 else (8 if block_h <= 4096 else 16)
    _add_layer_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, weight if bias is None else bias, o2, s2,
        x2.stride(0), r2.stride(0), o2.stride(0), s2.stride(0), H, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK_H=block_h,
        num_warps=warps)
    return out, summed


def add_layer_norm(x, residual, weight, bias, eps):
    """LayerNorm(x + residual) over the last dim, statistics in fp32.

    x: (..., H) float16/bfloat16/float32 (usually (T, H)); residual: same shape and dtype,
    or None; weight: (H,); bias: (H,) or None; eps: float.
    Returns (normed, summed), both x's shape and dtype; summed is x itself when residual
    is None.
    """
    return _launch(x, residual, weight, bias, eps)
