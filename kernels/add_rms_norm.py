"""Fused residual add + RMSNorm in Triton: one program per row, fp32 statistics."""
import torch
import triton
import triton.language as tl

from . import _validate as _v


@triton.jit
def _load_row_sum(X, RES, SUM, row, offs, ok, stride_x, stride_r, stride_s, HAS_RESIDUAL: tl.constexpr):
    """One row of x (+ residual, stored to SUM) in fp32, shared by both residual norms.
    The sum is rounded to the input dtype before the statistics, as the reference does:
    the stored residual stream and the normed value then agree exactly."""
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(RES + row * stride_r + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(SUM.dtype.element_ty)
        tl.store(SUM + row * stride_s + offs, x, mask=ok)
    return x.to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(X, RES, W, OUT, SUM, stride_x, stride_r, stride_o, stride_s, H, eps, offset,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    xf = _load_row_sum(X, RES, SUM, row, offs, ok, stride_x, stride_r, stride_s, HAS_RESIDUAL)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32) + offset
    tl.store(OUT + row * stride_o + offs, (xf * rstd * w).to(OUT.dtype.element_ty), mask=ok)


def _launch(x, residual, weight, eps, offset=0.0):
    H = _v.check_x("add_rms_norm", x)
    if residual is not None:
        _v.check_residual("add_rms_norm", residual, x)
    _v.check_param("add_rms_norm", "weight", weight, H, x.device, f"x's device {x.device}")
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
    _add_rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, o2, s2, x2.stride(0), r2.stride(0), o2.stride(0), s2.stride(0), H,
        float(eps), float(offset), HAS_RESIDUAL=residual is not None, BLOCK_H=block_h,
        num_warps=warps)
    return out, summed


def add_rms_norm(x, residual, weight, eps, offset=0.0):
    """RMSNorm(x + residual) * (weight + offset), statistics in fp32 (offset=1 for Gemma).

    x: (..., H) float16/bfloat16/float32 (usually (T, H)); residual: same shape and dtype,
    or None; weight: (H,); eps, offset: float.
    Returns (normed, summed), both x's shape and dtype; summed is x itself when residual
    is None.
    """
    return _launch(x, residual, weight, eps, offset)
