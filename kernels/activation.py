"""Classification activation in Triton: act((logits - logit_bias) * logit_scale) in fp32."""
import functools
import numbers

import torch
import triton
import triton.language as tl

from . import _validate as _v

_KINDS = {"softmax": 0, "sigmoid": 1, "identity": 2}


@triton.jit
def _activation_kernel(X, OUT, BIAS, SCALE, bias, scale, stride_xb, stride_ob, L,
                       KIND: tl.constexpr, BIAS_MODE: tl.constexpr, SCALE_MODE: tl.constexpr,
                       BLOCK_L: tl.constexpr):
    """BIAS_MODE / SCALE_MODE: 0 none, 1 the scalar argument, 2 a per-label (L,) vector."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    ok = offs < L
    x = tl.load(X + row * stride_xb + offs, mask=ok, other=0.0).to(tl.float32)
    if BIAS_MODE == 1:
        x = x - bias
    elif BIAS_MODE == 2:
        x = x - tl.load(BIAS + offs, mask=ok, other=0.0)
    if SCALE_MODE == 1:
        x = x * scale
    elif SCALE_MODE == 2:
        x = x * tl.load(SCALE + offs, mask=ok, other=0.0)
    if KIND == 0:
        x = tl.where(ok, x, float("-inf"))
        e = tl.exp(x - tl.max(x, 0))
        y = e / tl.sum(e, 0)
    elif KIND == 1:
        # From exp(-|x|) in (0, 1]: never overflows for very negative x.
        e = tl.exp(-tl.abs(x))
        y = tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
    else:
        y = x
    tl.store(OUT + row * stride_ob + offs, y, mask=ok)


_check = functools.partial(_v.check, "activation")


def _as_operand(name, value, L, device):
    """(mode, scalar, vector) for a bias/scale that is None, a number, or a tensor of one
    or L elements (broadcast over labels, as the reference's arithmetic does)."""
    if value is None:
        return 0, 0.0, None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return 1, float(value), None
    _check(isinstance(value, torch.Tensor),
           lambda: f"{name} must be None, a number or a tensor, got {type(value).__name__}")
    _check(value.numel() in (1, L) and value.dim() <= 1,
           lambda: f"{name} must have 1 or L={L} elements (shape () or (L,)), got shape {tuple(value.shape)}")
    _check(value.device == device, lambda: f"{name} is on {value.device}, expected the logits' device {device}")
    return 2, 0.0, value.reshape(-1).to(torch.float32).expand(L).contiguous()


def _launch(logits, kind, logit_bias=None, logit_scale=None):
    _check(kind in _KINDS, lambda: f"unknown activation {kind!r}; expected softmax, sigmoid or identity")
    _v.check_float("activation", "logits", logits, 2, "(B, L)")
    B, L = logits.shape
    # One program holds a whole row: past this the tile outgrows the registers (and, at
    # 2^20, Triton's largest tensor).
    _check(L <= _v.MAX_H, lambda: f"L={L} labels is past {_v.MAX_H}, the widest row the kernel holds "
                                  f"(the torch backend takes any)")
    bias_mode, bias, bias_vec = _as_operand("logit_bias", logit_bias, L, logits.device)
    scale_mode, scale, scale_vec = _as_operand("logit_scale", logit_scale, L, logits.device)
    out = torch.empty((B, L), dtype=torch.float32, device=logits.device)
    if B == 0 or L == 0:
        return out
    block_l = _v.next_pow2(L)
    # Unused vector pointers still need a tensor argument: pass the output.
    _activation_kernel[(B,)](logits, out, out if bias_vec is None else bias_vec,
                             out if scale_vec is None else scale_vec, bias, scale,
                             logits.stride(0), out.stride(0), L,
                             KIND=_KINDS[kind], BIAS_MODE=bias_mode, SCALE_MODE=scale_mode,
                             BLOCK_L=block_l, num_warps=4 if block_l <= 4096 else 8)
    return out


def activation(logits, kind, logit_bias=None, logit_scale=None):
    """act((logits - logit_bias) * logit_scale) in fp32.

    logits: (B, L) float16/bfloat16/float32; kind: "softmax" | "sigmoid" | "identity";
    logit_bias, logit_scale: None, a number, or a tensor of shape () or (L,).
    Returns (B, L) float32.
    """
    return _launch(logits, kind, logit_bias, logit_scale)
