"""Pooled-row gather in Triton: one row per packed sequence (first, last or mean)."""
import functools

import torch
import triton
import triton.language as tl

from . import _validate as _v

_POOLINGS = {"cls": 0, "last": 1, "mean": 2}


@triton.jit
def _gather_pooled_kernel(X, CU_SEQLENS, OUT, stride_xt, stride_ob, H,
                          POOLING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    seq = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    start = tl.load(CU_SEQLENS + seq)
    end = tl.load(CU_SEQLENS + seq + 1)
    if POOLING == 0:
        row = tl.load(X + start.to(tl.int64) * stride_xt + offs_h, mask=h_ok, other=0.0)
        out = row.to(tl.float32)
    elif POOLING == 1:
        row = tl.load(X + (end - 1).to(tl.int64) * stride_xt + offs_h, mask=h_ok, other=0.0)
        out = row.to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        offs_t = tl.arange(0, BLOCK_T)
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + offs_t
            x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xt + offs_h[None, :],
                        mask=(rows < end)[:, None] & h_ok[None, :], other=0.0)
            acc += x.to(tl.float32)
        # An empty sequence divides 0 by 0, as the reference does.
        out = tl.sum(acc, 0) / (end - start).to(tl.float32)
    tl.store(OUT + seq.to(tl.int64) * stride_ob + offs_h, out.to(OUT.dtype.element_ty), mask=h_ok)


_check = functools.partial(_v.check, "gather_pooled")


def _launch(hidden, cu_seqlens, pooling, out_dtype=None):
    """out_dtype: hidden's dtype (the op's contract) unless given (float32 for fused heads)."""
    _check(pooling in _POOLINGS, lambda: f"unknown pooling {pooling!r}; expected 'cls', 'last' or 'mean'")
    _v.check_float("gather_pooled", "hidden", hidden, 2, "(T, H)")
    _v.check_cu_seqlens("gather_pooled", cu_seqlens, hidden.device, f"hidden's device {hidden.device}")
    B = cu_seqlens.numel() - 1
    H = hidden.shape[1]
    out = torch.empty((B, H), dtype=out_dtype or hidden.dtype, device=hidden.device)
    if B == 0 or H == 0:
        return out
    # cls / last move one row per sequence: wide blocks. Mean streams every row of its
    # sequence in one program, so a long sequence is a serial chain of loads: narrow
    # column blocks (more programs per sequence) and tall row tiles (fewer steps each)
    # keep the longest chain short. Either way a tile is about 4K elements.
    block_h = min(_v.next_pow2(H), 1024 if pooling != "mean" else 128)
    block_t = max(1, 4096 // block_h)
    grid = (B, _v.cdiv(H, block_h))
    _gather_pooled_kernel[grid](hidden, cu_seqlens, out, hidden.stride(0), out.stride(0), H,
                                POOLING=_POOLINGS[pooling], BLOCK_T=block_t, BLOCK_H=block_h,
                                num_warps=4)
    return out


def gather_pooled(hidden, cu_seqlens, pooling):
    """One row per sequence.

    hidden: (T, H) float16/bfloat16/float32, last dim contiguous; cu_seqlens: (B+1,) int32;
    pooling: "cls" (first token), "last" (true last token) or "mean" (fp32 sum / length).
    Returns (B, H) in hidden's dtype.
    """
    return _launch(hidden, cu_seqlens, pooling)
