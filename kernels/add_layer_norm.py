"""Fused residual add + LayerNorm in Triton: one program per row, fp32 statistics."""
import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_H = 32768


@triton.jit
def _add_layer_norm_kernel(X, RES, W, B, OUT, SUM, stride_x, stride_r, stride_o, stride_s, H, eps,
                           HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(RES + row * stride_r + offs, mask=ok, other=0.0)
        # Round the sum to the input dtype before the statistics, as the reference does:
        # the stored residual stream and the normed value then agree exactly.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(SUM.dtype.element_ty)
        tl.store(SUM + row * stride_s + offs, x, mask=ok)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, 0) / H
    diff = tl.where(ok, xf - mean, 0.0)
    var = tl.sum(diff * diff, 0) / H
    y = diff * tl.rsqrt(var + eps) * tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + offs, y.to(OUT.dtype.element_ty), mask=ok)


def _check(cond, msg):
    if not cond:
        raise ValueError(f"add_layer_norm: {msg}")


def _rows(t, H):
    """A (rows, H) view of t with a unit last stride (copying only when no view exists)."""
    t2 = t.reshape(-1, H)
    if t2.shape[0] > 0 and H > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _launch(x, residual, weight, bias, eps):
    _check(isinstance(x, torch.Tensor) and x.dim() >= 1,
           f"x must be a tensor (..., H), got {getattr(x, 'shape', type(x))}")
    _check(x.dtype in _DTYPES, f"x.dtype must be float16, bfloat16 or float32, got {x.dtype}")
    H = x.shape[-1]
    _check(1 <= H <= _MAX_H, f"hidden size must be in [1, {_MAX_H}], got {H}")
    if residual is not None:
        _check(isinstance(residual, torch.Tensor) and residual.shape == x.shape,
               f"residual must match x's shape {tuple(x.shape)}, got {getattr(residual, 'shape', type(residual))}")
        _check(residual.dtype == x.dtype, f"residual.dtype must be x's {x.dtype}, got {residual.dtype}")
        _check(residual.device == x.device, f"residual is on {residual.device}, expected x's device {x.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        _check(isinstance(t, torch.Tensor) and t.shape == (H,),
               f"{name} must be ({H},), got {getattr(t, 'shape', type(t))}")
        _check(t.dtype in _DTYPES, f"{name}.dtype must be a float type, got {t.dtype}")
        _check(t.device == x.device, f"{name} is on {t.device}, expected x's device {x.device}")
        _check(t.is_contiguous(), f"{name} must be contiguous")
    x2 = _rows(x, H)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out, summed
    r2 = x2 if residual is None else _rows(residual, H)
    o2 = out.view(-1, H)
    s2 = summed.view(-1, H)
    block_h = triton.next_power_of_2(H)
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
