"""Rotary position embedding in Triton, in place on packed q and k."""

import triton
import triton.language as tl

from . import _validate as _v


@triton.jit
def _rotate_heads(X, stride_h, n_heads, cos, sin, offs_j, j_ok,
                  HALF: tl.constexpr, NEOX: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    """Rotate the first 2*HALF features of every head of one token, in place."""
    offs_h = tl.arange(0, BLOCK_HEADS)
    ok = (offs_h < n_heads)[:, None] & j_ok[None, :]
    base = X + offs_h[:, None] * stride_h
    if NEOX:
        p1 = base + offs_j[None, :]
        p2 = base + HALF + offs_j[None, :]
    else:
        p1 = base + 2 * offs_j[None, :]
        p2 = base + 2 * offs_j[None, :] + 1
    x1 = tl.load(p1, mask=ok, other=0.0)
    x2 = tl.load(p2, mask=ok, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(p1, (x1f * cos - x2f * sin).to(x1.dtype), mask=ok)
    tl.store(p2, (x2f * cos + x1f * sin).to(x1.dtype), mask=ok)


@triton.jit
def _token_cos_sin(POS, COS_SIN, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """This program's token (int64) and its cos and sin rows, (1, BLOCK_HALF) fp32 each:
    one row serves every head of the token."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + tok).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_HALF)
    j_ok = offs_j < HALF
    cos = tl.load(COS_SIN + pos * stride_cs + offs_j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(COS_SIN + pos * stride_cs + HALF + offs_j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    return tok, cos, sin


@triton.jit
def _rotary_kernel(Q, K, POS, COS_SIN, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs, n_q, n_k,
                   HALF: tl.constexpr, NEOX: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    tok, cos, sin = _token_cos_sin(POS, COS_SIN, stride_cs, HALF, BLOCK_HALF)
    offs_j = tl.arange(0, BLOCK_HALF)
    j_ok = offs_j < HALF
    _rotate_heads(Q + tok * stride_qt, stride_qh, n_q, cos, sin, offs_j, j_ok, HALF, NEOX, BLOCK_HQ)
    _rotate_heads(K + tok * stride_kt, stride_kh, n_k, cos, sin, offs_j, j_ok, HALF, NEOX, BLOCK_HK)




def _launch(q, k, positions, cos_sin, neox=True):
    T, Hq, D, R = _v.rotary_inputs("rotary", q, k, positions, cos_sin)
    if T == 0:
        return q, k
    half = R // 2
    block_half = _v.next_pow2(half)
    block_hq = _v.next_pow2(max(Hq, 1))  # no query heads (only keys to rotate): one masked lane
    block_hk = _v.next_pow2(max(k.shape[1], 1))
    _rotary_kernel[(T,)](q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         cos_sin.stride(0), Hq, k.shape[1], HALF=half, NEOX=bool(neox),
                         BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
                         num_warps=4 if block_hq * block_half <= 2048 else 8)
    return q, k


def rotary(q, k, positions, cos_sin, neox=True):
    """Rotary embedding on packed positions, in place on q and k.

    q: (T, Hq, D); k: (T, Hkv, D), same float dtype, last dim contiguous (views of a
    fused qkv tensor work); positions: (T,) int64 (or int32), restarting at 0 per
    sequence, each < max_pos; cos_sin: (max_pos, R) fp32, cos in the first R/2 columns
    and sin in the last R/2, R <= D even. neox=True rotates halves of the first R
    features (Llama/Qwen); False rotates interleaved pairs (GPT-J). Returns (q, k).
    """
    return _launch(q, k, positions, cos_sin, neox)
