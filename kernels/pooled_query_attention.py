"""Pooled-query attention: one query row per sequence against all of that sequence's keys.

The last layer of a model that pools a single token (CLS or the last token) needs only
that token's attention output. One program handles one sequence and one kv head: the
g = Hq // Hkv query heads that share the kv head form the rows of the query tile (padded
to at least 16 rows for ``tl.dot``, the padding masked), and the program walks the
sequence's key blocks with an online softmax accumulated in fp32. k and v are read once
per (sequence, kv head), never repeated per query head.

Every row of the tile sits at the same position ``q_pos[b]``, so the causal/window mask
is one key interval [lo, hi) shared by all rows. Bounds come from ``cu_seqlens`` and
``q_pos``; only the head dim, block sizes and feature flags are ``tl.constexpr``: T, B
and max_seqlen never reach the kernel, so ragged batches reuse one compiled kernel.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import _validate as _v
from .varlen_attention import _UNBOUNDED, _fp32_precision, _multiples_of_8, _softcap

# Finite stand-in for -inf as the running max (see varlen_attention): keeps
# exp2(m_i - m_new) finite for padded rows that only ever see zero scores.
_NEG_INIT = tl.constexpr(-1.0e30)
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535


@triton.jit
def _pooled_query_attention_kernel(Q, K, V, O, CU_SEQLENS, Q_POS, qk_scale,
                                   stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                   stride_ob, stride_oh, kv_group, window_left, window_right,
                                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                                   PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
                                   ALIGNED_ROWS: tl.constexpr = False, LONG_OFFSETS: tl.constexpr = False):
    if ALIGNED_ROWS:
        stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ob, stride_oh = _multiples_of_8(
            stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ob, stride_oh)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    q_pos = tl.load(Q_POS + seq).to(tl.int32)
    # int64 base offsets: T * H * D overflows int32 on large batches.
    row0 = seq_start.to(tl.int64)
    seq64 = seq.to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < kv_group
    d_ok = offs_d < HEAD_DIM
    # Rows of the tile: the query heads kv_head * g + r, r < g.
    heads = kv_head * kv_group + offs_g
    q_ptrs = Q + seq64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    # k is read transposed, (BLOCK_D, BLOCK_N), so the score tile is a plain dot.
    k_ptrs = K + row0 * stride_kt + kv_head * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = V + row0 * stride_vt + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    # [lo, hi): the keys the query sees, the same for every row of the tile.
    lo = 0
    hi = seq_len
    if IS_CAUSAL:
        hi = tl.minimum(hi, q_pos + 1)
    if HAS_WINDOW:
        lo = tl.maximum(q_pos - window_left, 0)
        hi = tl.minimum(hi, q_pos + window_right + 1)
    start = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_G], _NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, hi, BLOCK_N):
        cols = start_n + offs_n
        ok = (cols >= lo) & (cols < hi)
        n0 = start_n
        if LONG_OFFSETS:  # a key position times the token stride may pass int32 (see the launcher)
            n0 = tl.cast(start_n, tl.int64)
        k = tl.load(k_ptrs + n0 * stride_kt, mask=ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = _softcap(tl.dot(q, k, input_precision=PRECISION) * qk_scale, SOFTCAP)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # A query that sees no key (an empty sequence, or q_pos outside it under causal or
    # window masks) gets zeros rather than the reference's NaN.
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    o_ptrs = O + seq64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


# (BLOCK_N, num_warps, num_stages) by padded head dim, for 16-bit inputs and for fp32.
# Fixed per head dim on purpose: blocks chosen from max_seqlen would recompile on
# ragged shapes. The query tile is small (g rows), so the k/v tiles dominate.
CONFIGS = {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)}
CONFIGS_FP32 = {16: (32, 4, 2), 32: (32, 4, 2), 64: (32, 4, 2), 128: (32, 4, 2), 256: (16, 4, 2)}
# 16-bit head dims off the multiples of 16 (72, 88, 136, ...): their masked head-dim tiles
# spilled registers at the configs above when compiled for sm_90.
CONFIGS_PADDED = {128: (32, 8, 3), 256: (16, 4, 2)}

_OP = "pooled_query_attention"
_check = functools.partial(_v.check, _OP)


def _launch(q, k, v, cu_seqlens, max_seqlen, q_pos, causal=False, scale=None, window=None, block_n=None,
            softcap=None):
    """Validate, then launch. block_n overrides the per-head-dim config (tests use small
    blocks to reach several key blocks on short sequences)."""
    _v.check_float(_OP, "q", q, 3, "(B, Hq, D)")
    for name, t in (("k", k), ("v", v)):
        _v.check_float(_OP, name, t, 3, "(T, Hkv, D)")
        _check(t.device == q.device, lambda: f"{name} is on {t.device}, expected q's device {q.device}")
    B, Hq, D = q.shape
    T, Hkv = k.shape[0], k.shape[1]
    _check(k.shape == v.shape, lambda: f"k and v must have the same shape, got k {tuple(k.shape)} v {tuple(v.shape)}")
    _check(k.shape[2] == D, lambda: f"k must be (T, Hkv, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype,
           lambda: f"q, k, v must share a dtype, got q {q.dtype} k {k.dtype} v {v.dtype}")
    _check(Hkv >= 1 and Hq % Hkv == 0, lambda: f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    _check(1 <= D <= 256, lambda: f"head_dim must be in [1, 256], got {D}")
    _check(Hkv <= _MAX_GRID_Y, lambda: f"at most {_MAX_GRID_Y} kv heads, got Hkv={Hkv}")
    _v.check_cu_seqlens(_OP, cu_seqlens, q.device, f"{q.device}", k.shape[0])
    _check(cu_seqlens.numel() == B + 1,
           lambda: f"cu_seqlens must be (B+1,) = ({B + 1},) for q {tuple(q.shape)}, got ({cu_seqlens.numel()},)")
    _check(isinstance(q_pos, torch.Tensor) and q_pos.shape == (B,),
           lambda: f"q_pos must be a ({B},) tensor, got {getattr(q_pos, 'shape', type(q_pos))}")
    _check(q_pos.dtype in (torch.int64, torch.int32), lambda: f"q_pos.dtype must be int64 or int32, got {q_pos.dtype}")
    _check(q_pos.device == q.device, lambda: f"q_pos is on {q_pos.device}, expected q's device {q.device}")
    _v.check_max_seqlen(_OP, max_seqlen)
    left, right, has_window = _v.window_bounds(_OP, window, _UNBOUNDED)
    softcap = _v.check_softcap(_OP, softcap)

    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0 or Hq == 0:
        return out
    q_pos = q_pos.contiguous()
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_d = max(16, _v.next_pow2(D))
    group = Hq // Hkv
    block_g = max(16, _v.next_pow2(group))
    if q.dtype == torch.float32:
        bn, warps, stages = CONFIGS_FP32[block_d]
    else:
        bn, warps, stages = (CONFIGS_PADDED if D % 16 and block_d in CONFIGS_PADDED else CONFIGS)[block_d]
    bn = block_n or bn
    # q's (and out's) head offsets within a sequence stay int32, as a tile's
    _v.check_tile_span(_OP, 1, ("q", q))
    long = _v.long_offsets(T, k, v)
    if long:
        _v.check_tile_span("pooled_query_attention", bn, ("k", k), ("v", v))
    # B on grid axis 0 (up to 2^31 - 1 programs), kv heads on axis 1.
    _pooled_query_attention_kernel[(B, Hkv)](
        q, k, v, out, cu_seqlens, q_pos, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), group, left, right,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_N=bn,
        IS_CAUSAL=bool(causal), HAS_WINDOW=has_window,
        PRECISION=_fp32_precision(q.device) if q.dtype == torch.float32 else "tf32", SOFTCAP=softcap,
        ALIGNED_ROWS=_v.rows_aligned(q, k, v, out), LONG_OFFSETS=long, num_warps=warps, num_stages=stages)
    return out


def pooled_query_attention(q, k, v, cu_seqlens, max_seqlen, q_pos, causal=False, scale=None, window=None,
                           softcap=None):
    """Attention for one query row per sequence against all of that sequence's keys.

    q: (B, Hq, D), the query of each sequence; k, v: (T, Hkv, D) packed, Hq % Hkv == 0,
    all float16/bfloat16/float32, last dim contiguous (other strides are free, so views of
    a fused projection work); cu_seqlens: (B+1,) int32 on q's device; max_seqlen: int
    (checked, not needed: the kernel reads every bound from cu_seqlens); q_pos: (B,)
    int64 (or int32), the query's position inside its sequence (0 for CLS, len-1 for the
    last token); causal: keys at positions <= q_pos only; scale: float or None
    (1/sqrt(D)); window: None or (left, right) tokens visible around q_pos, -1 =
    unbounded; softcap: as in varlen_attention. A query that sees no key gets zeros.
    Returns (B, Hq, D) in q's dtype.
    """
    return _launch(q, k, v, cu_seqlens, max_seqlen, q_pos, causal, scale, window, softcap=softcap)
