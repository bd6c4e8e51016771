"""Varlen (packed, unpadded) attention: FlashAttention-style online softmax in Triton.

One program handles one tile, BLOCK_M query rows of one sequence, for one query head.
The tiles come from a work list built on the device from ``cu_seqlens`` (no host sync):
a grid sized from max_seqlen would launch B * ceil(max_seqlen / BLOCK_M) programs per
head, most of them idle on a batch of short prompts with one long one. Only the head dim,
block sizes and feature flags are ``tl.constexpr``: T, B and max_seqlen never reach the
kernel as constants, so ragged batches reuse one compiled kernel per (dtype, head_dim,
causal, window on/off).
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import _tuned, _validate as _v

# Finite stand-in for -inf as the running max: a row that has seen no visible key yet
# keeps m_i at this value, so exp2(m_i - m_new) stays finite (1 or 0) instead of NaN.
_NEG_INIT = tl.constexpr(-1.0e30)
# A window side of -1 (unbounded) becomes this many tokens: larger than any sequence,
# small enough that position arithmetic stays within int32.
_UNBOUNDED = 1 << 30
_LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535


@triton.jit
def _softcap(s, SOFTCAP: tl.constexpr):
    """Scores soft-capped as SOFTCAP * tanh(x / SOFTCAP) on their natural scale (s holds
    x * log2(e)); SOFTCAP == 0 leaves them. tanh(y) = 2 sigmoid(2y) - 1: no libdevice
    call, so the interpreter runs it too."""
    if SOFTCAP > 0:
        c = SOFTCAP * 1.4426950408889634
        s = c * (2.0 * tl.sigmoid(s * (2.0 / c)) - 1.0)
    return s


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d, seq_len,
                  qk_scale, window_left, window_right, stride_kt, stride_vt,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                  SOFTCAP: tl.constexpr, LONG_OFFSETS: tl.constexpr):
    """One key block of the online softmax, as wide as offs_n (BLOCK_N, or BLOCK_N_FULL
    in the unmasked middle; k_ptrs / v_ptrs are built on the same offsets). MASKED
    blocks may hold keys some rows must not see (past the sequence end, above the
    diagonal, outside the window)."""
    cols = start_n + offs_n
    d_ok = offs_d < HEAD_DIM
    n0 = start_n
    if LONG_OFFSETS:
        n0 = tl.cast(start_n, tl.int64)
    if MASKED:
        k = tl.load(k_ptrs + n0 * stride_kt, mask=(cols < seq_len)[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=(cols < seq_len)[:, None] & d_ok[None, :], other=0.0)
    elif BLOCK_D == HEAD_DIM:
        k = tl.load(k_ptrs + n0 * stride_kt)
        v = tl.load(v_ptrs + n0 * stride_vt)
    else:
        k = tl.load(k_ptrs + n0 * stride_kt, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=d_ok[None, :], other=0.0)
    s = _softcap(tl.dot(q, k, input_precision=PRECISION) * qk_scale, SOFTCAP)
    if MASKED:
        ok = (cols < seq_len)[None, :]
        if IS_CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None])
        if HAS_WINDOW:
            ok = ok & (cols[None, :] >= offs_m[:, None] - window_left)
            ok = ok & (cols[None, :] <= offs_m[:, None] + window_right)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # Rescaled acc goes in as the dot's accumulator: no second (BLOCK_M, BLOCK_D) tile live.
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _tile_map_kernel(CU_SEQLENS, TILE_SEQ, TILE_INFO, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """Program b writes b into the TILE_SEQ entries of sequence b's query tiles and its
    first tile into TILE_INFO[1 + b]; the last program writes the tile count into
    TILE_INFO[0]. Each program sums the tiles before it itself: O(B^2) reads of a few KB
    in all, cheaper than a scan in a second launch."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_B)
    before = b * 0
    for i0 in range(0, b, BLOCK_B):
        idx = i0 + offs
        ok = idx < b
        lens = tl.load(CU_SEQLENS + idx + 1, mask=ok, other=0) - tl.load(CU_SEQLENS + idx, mask=ok, other=0)
        before += tl.sum((lens + (BLOCK_M - 1)) // BLOCK_M, 0)
    mine = (tl.load(CU_SEQLENS + b + 1) - tl.load(CU_SEQLENS + b) + (BLOCK_M - 1)) // BLOCK_M
    tl.store(TILE_INFO + 1 + b, before)
    for j0 in range(0, mine, BLOCK_B):
        j = j0 + offs
        tl.store(TILE_SEQ + before + j, b + j * 0, mask=j < mine)
    if b == tl.num_programs(0) - 1:
        tl.store(TILE_INFO, before + mine)


@triton.jit
def _multiples_of_8(a, b, c, d, e, f, g, h):
    """Eight strides the launcher checked are multiples of 8 elements (_validate.rows_aligned),
    written as products with 8 so the compiler can prove it and load whole 16-byte pieces
    (tl.multiple_of on a scalar argument left the loads unvectorised)."""
    return a // 8 * 8, b // 8 * 8, c // 8 * 8, d // 8 * 8, e // 8 * 8, f // 8 * 8, g // 8 * 8, h // 8 * 8


@triton.jit
def _varlen_attention_kernel(Q, K, V, O, CU_SEQLENS, TILE_SEQ, TILE_INFO, qk_scale,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                             stride_ot, stride_oh, kv_group, window_left, window_right,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                             PRECISION: tl.constexpr, GROUP: tl.constexpr, BLOCK_N_FULL: tl.constexpr,
                             SOFTCAP: tl.constexpr, ALIGNED_ROWS: tl.constexpr = False,
                             LONG_OFFSETS: tl.constexpr = False):
    """One tile: BLOCK_M tokens of one sequence for GROUP query heads of one kv group.
    GROUP > 1 stacks the heads as tile rows (row r: head r // BLOCK_M, token r % BLOCK_M),
    so each k/v block is loaded once for the group and the dots are GROUP times taller,
    while the causal diagonal keeps the geometry of BLOCK_M tokens.
    BLOCK_N_FULL (a multiple of BLOCK_N) is the key-block width of the unmasked middle:
    masked blocks stay BLOCK_N wide, so the sequence end and the diagonal waste little,
    while the middle runs fewer online-softmax rescales and wider dots. BLOCK_N_FULL ==
    BLOCK_N compiles the single-width kernel. LONG_OFFSETS: a position times a token
    stride may pass int32 (set by the launcher from T: huge batches of fused-qkv views), so
    the tile's and the key block's first rows are offset in int64."""
    if ALIGNED_ROWS:
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh = _multiples_of_8(
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh)
    tile = tl.program_id(0)
    head = tl.program_id(1) * GROUP
    # The grid holds an upper bound of the tile count; TILE_INFO[0] is the true one.
    if tile >= tl.load(TILE_INFO):
        return
    seq = tl.load(TILE_SEQ + tile)
    pid_m = tile - tl.load(TILE_INFO + 1 + seq)
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    m0 = pid_m * BLOCK_M
    m_last = tl.minimum(m0 + BLOCK_M, seq_len) - 1
    # GQA: heads of one group read the same kv head; k/v are never repeated in memory.
    kv_head = head // kv_group
    # int64 base offsets: T * H * D overflows int32 on large batches.
    row0 = seq_start.to(tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if GROUP == 1:
        offs_r = tl.arange(0, BLOCK_M)
    else:
        offs_r = tl.arange(0, GROUP * BLOCK_M) % BLOCK_M
        row_head = head + tl.arange(0, GROUP * BLOCK_M) // BLOCK_M
    offs_m = m0 + offs_r
    # The tile's rows from row_q / offs_q (the plain form unless LONG_OFFSETS; the same
    # code as ever there, which the measured configs were tuned on).
    row_q = row0
    offs_q = offs_m
    if LONG_OFFSETS:
        row_q = row0 + m0
        offs_q = offs_r
    if GROUP == 1:
        q_ptrs = Q + row_q * stride_qt + head * stride_qh + offs_q[:, None] * stride_qt + offs_d[None, :]
    else:
        q_ptrs = Q + row_q * stride_qt + row_head[:, None] * stride_qh + offs_q[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    # k is read transposed, (BLOCK_D, BLOCK_N), so the score tile is a plain dot.
    k_ptrs = K + row0 * stride_kt + kv_head * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = V + row0 * stride_vt + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    # [lo, hi): keys that some row of the block may see. [full_lo, full_hi): keys that
    # every valid row sees; key blocks inside it need no masking at all.
    lo = 0
    hi = seq_len
    full_lo = 0
    full_hi = seq_len
    if IS_CAUSAL:
        # Key blocks past the diagonal are never visited.
        hi = m_last + 1
        full_hi = m0 + 1
    if HAS_WINDOW:
        lo = tl.maximum(m0 - window_left, 0)
        full_lo = tl.maximum(m_last - window_left, 0)
        hi = tl.minimum(hi, m_last + window_right + 1)
        full_hi = tl.minimum(full_hi, m0 + window_right + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, hi)
    mid_hi = tl.maximum((full_hi // BLOCK_N) * BLOCK_N, mid_lo)

    m_i = tl.full([GROUP * BLOCK_M], _NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([GROUP * BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([GROUP * BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, mid_lo, BLOCK_N):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                                      seq_len, qk_scale, window_left, window_right, stride_kt, stride_vt,
                                      HEAD_DIM, BLOCK_D, True, IS_CAUSAL, HAS_WINDOW, PRECISION, SOFTCAP,
                                      LONG_OFFSETS)
    narrow_lo = mid_lo
    if BLOCK_N_FULL != BLOCK_N:
        # The unmasked middle in whole BLOCK_N_FULL blocks from mid_lo; what is left of it
        # (less than BLOCK_N_FULL keys, a multiple of BLOCK_N) falls to the BLOCK_N loop
        # below. The wide (BLOCK_D, BLOCK_N_FULL) / (BLOCK_N_FULL, BLOCK_D) pointer tiles
        # are formed just before their loop; for sm_90, forming them next to k_ptrs gave
        # the same register counts, no spills either way.
        narrow_lo = mid_lo + ((mid_hi - mid_lo) // BLOCK_N_FULL) * BLOCK_N_FULL
        offs_nf = tl.arange(0, BLOCK_N_FULL)
        kf_ptrs = K + row0 * stride_kt + kv_head * stride_kh + offs_nf[None, :] * stride_kt + offs_d[:, None]
        vf_ptrs = V + row0 * stride_vt + kv_head * stride_vh + offs_nf[:, None] * stride_vt + offs_d[None, :]
        for start_n in range(mid_lo, narrow_lo, BLOCK_N_FULL):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, kf_ptrs, vf_ptrs, start_n, offs_m, offs_nf, offs_d,
                                          seq_len, qk_scale, window_left, window_right, stride_kt, stride_vt,
                                          HEAD_DIM, BLOCK_D, False, IS_CAUSAL, HAS_WINDOW, PRECISION, SOFTCAP,
                                      LONG_OFFSETS)
    for start_n in range(narrow_lo, mid_hi, BLOCK_N):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                                      seq_len, qk_scale, window_left, window_right, stride_kt, stride_vt,
                                      HEAD_DIM, BLOCK_D, False, IS_CAUSAL, HAS_WINDOW, PRECISION, SOFTCAP,
                                      LONG_OFFSETS)
    for start_n in range(mid_hi, hi, BLOCK_N):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                                      seq_len, qk_scale, window_left, window_right, stride_kt, stride_vt,
                                      HEAD_DIM, BLOCK_D, True, IS_CAUSAL, HAS_WINDOW, PRECISION, SOFTCAP,
                                      LONG_OFFSETS)

    # Rows past the sequence end saw nothing; keep them finite, they are not stored.
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    # Output pointers are formed here, not next to q's: kept live across the key loop
    # they cost registers.
    if GROUP == 1:
        o_ptrs = O + row_q * stride_ot + head * stride_oh + offs_q[:, None] * stride_ot + offs_d[None, :]
    else:
        row_head = head + tl.arange(0, GROUP * BLOCK_M) // BLOCK_M
        o_ptrs = O + row_q * stride_ot + row_head[:, None] * stride_oh + offs_q[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty),
             mask=(offs_m < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim, for 16-bit inputs and for
# fp32 (twice the bytes per tile: smaller tiles keep shared memory under the 227 KB of
# an H100). Fixed per head dim on purpose: blocks chosen from max_seqlen would
# recompile on ragged shapes. Small tiles: classification prompts are short (the mixed
# workload's mean is 157 tokens), and a 128x64 tile over a 157-token sequence computes
# twice the scores it keeps. The sweep on an H200 (bf16, mixed workload, 2048 prompts,
# 322k tokens) measured, in ms, 128x64 / 64x64 / 64x32 / 128x32: bidirectional Hq=Hkv=12
# D=64 1.62 / 1.55 / 1.33 / 1.44; causal Hq=16 Hkv=8 D=128 3.86 / 2.96 / 2.44 / 2.92;
# causal Hq=12 Hkv=2 D=128 3.09 / 2.40 / 2.02 / 2.26 (all 4 warps but 128x32 D=128, 8).
CONFIGS = {
    16: (64, 64, 4, 3),
    32: (64, 64, 4, 3),
    64: (64, 32, 4, 3),
    128: (64, 32, 4, 3),
    256: (64, 32, 8, 2),
}
# Candidates the benchmark times (python -m pyengine.bench kernels --attn-sweep) for
# 16-bit inputs, by padded head dim, as (BLOCK_M, BLOCK_N, num_warps, num_stages[, GROUP
# [, BLOCK_N_FULL]]); each compiles for sm_90 without spills (tests/test_kernels_compile.py).
# The GROUP=2 rows were added after the last GPU run and are not measured yet, nor are the
# BLOCK_N_FULL rows: 32-wide masked blocks (the winners above) with 64- or 128-wide
# blocks over the unmasked middle, for fewer rescales and wider dots there. At D=128,
# (64, 32, 4, 3, 1, 128) sits at 255 registers and spills with a window (sm_90 compile):
# a candidate for the window-free sweep cases only.
SWEEP_CONFIGS = {
    64: [(128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 32, 4, 4),
         (64, 32, 4, 3, 1, 64), (64, 32, 4, 3, 1, 128), (64, 32, 8, 3, 1, 64)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2),
          # Two query heads of a kv group per program (GQA only): k/v loaded once for both.
          (32, 32, 4, 3, 2), (32, 64, 4, 3, 2), (64, 32, 8, 3, 2),
          (64, 32, 4, 3, 1, 64), (64, 32, 4, 3, 1, 128), (64, 32, 8, 3, 1, 64), (32, 32, 4, 3, 2, 64)],
}
# 16-bit head dims that are not a multiple of 16 (SigLIP-so400m's 72; 88, 104, 120;
# 136 ... 248) with strides Triton cannot take as multiples of 8 (rare: see config_for),
# whose masked head-dim tiles, loaded 2 bytes at a time, spilled registers at the configs
# above when compiled for sm_90 (tests/compile_kernels.py): more warps, or smaller tiles.
CONFIGS_PADDED = {
    64: (64, 32, 8, 3),
    128: (64, 32, 8, 3),
    256: (32, 16, 4, 2),
}
# Sweep candidates at those head dims (by padded head dim), each compiled for sm_90
# without spills at 72, 88 and 120 (tests/compile_kernels.py; 128x32 and 64x64 tiles
# with 8 warps spill there, 16 to 208 bytes of stack).
SWEEP_CONFIGS_PADDED = {
    128: [(64, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 3), (32, 16, 4, 3), (64, 16, 4, 3), (64, 16, 8, 3),
          (32, 32, 8, 3), (128, 16, 8, 3),
          # With the stride hint (ALIGNED_ROWS) the padded tiles load 16 bytes at a time, as
          # at head dim 80: the unpadded head dims' tiles, compiled without spills there.
          (64, 32, 4, 3), (64, 64, 4, 3)],
}
CONFIGS_FP32 = {
    16: (64, 32, 4, 2),
    32: (64, 32, 4, 2),
    64: (64, 32, 4, 2),
    128: (64, 32, 4, 2),
    256: (32, 16, 4, 2),
}


def _fp32_precision(device):
    """Dot precision for fp32 inputs: 3xTF32 on NVIDIA GPUs with TF32 (Ampere and later)
    gives fp32-level accuracy on tensor cores; elsewhere (the CPU interpreter, older or
    non-NVIDIA GPUs) plain fp32 FMA ("ieee"), which is exact but slow and spills on GPU."""
    if device.type != "cuda" or torch.version.hip is not None:
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"


_check = functools.partial(_v.check, "varlen_attention")

def tile_map(cu_seqlens, T, block_m, block_b=1024):
    """The (sequence, query block) work list of a packed batch, built on the device.

    cu_seqlens: (B+1,) int32 with cu_seqlens[-1] == T; T: int; block_m: int; block_b:
    sequences summed per step (a power of two; tests shrink it). Returns
    (tile_seq, tile_info, n): tile_seq (n,) int32, the sequence of each tile (entries past
    the tile count are never written); tile_info (B+1,) int32, the tile count then the
    first tile of each sequence; n = ceil(T / block_m) + B, a bound on the tile count
    sum(ceil(len / block_m)) known on the host, so the grid needs no device-to-host copy.
    """
    B = cu_seqlens.numel() - 1
    n = _v.cdiv(T, block_m) + B
    tile_seq = torch.empty(n, dtype=torch.int32, device=cu_seqlens.device)
    tile_info = torch.empty(B + 1, dtype=torch.int32, device=cu_seqlens.device)
    _tile_map_kernel[(B,)](cu_seqlens, tile_seq, tile_info, BLOCK_M=block_m, BLOCK_B=block_b, num_warps=4)
    return tile_seq, tile_info, n


def config_for(dtype, head_dim, rows_16b=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launcher uses for these inputs (one
    query head per program). Causal and bidirectional share the table: the sweep picked
    the same tiles for both. rows_16b (_validate.rows_16b: every stride a multiple of 8):
    a padded head dim's rows load in 16-byte pieces, and it takes the unpadded tiles
    (H200, SigLIP's 64 x 1024 tiles at head dim 72: 64x32 with 4 warps 1.65 ms, the 8-warp
    CONFIGS_PADDED tile 2.97 ms)."""
    block_d = max(16, _v.next_pow2(head_dim))
    if dtype == torch.float32:
        return CONFIGS_FP32[block_d]
    if head_dim % 16 and block_d in CONFIGS_PADDED and not rows_16b:
        return CONFIGS_PADDED[block_d]
    return CONFIGS[block_d]


def sweep_configs(head_dim):
    """The benchmark's 16-bit candidates for a head dim (SWEEP_CONFIGS, or
    SWEEP_CONFIGS_PADDED off the multiples of 16), [] where there are none."""
    block_d = max(16, _v.next_pow2(head_dim))
    table = SWEEP_CONFIGS_PADDED if head_dim % 16 and block_d in SWEEP_CONFIGS_PADDED else SWEEP_CONFIGS
    return table.get(block_d, [])


def check_config(config):
    """A (BLOCK_M, BLOCK_N, num_warps, num_stages[, GROUP[, BLOCK_N_FULL]]) config's own
    rules, whatever the shape (a tuned-configs file's entries are checked with them when
    an engine starts): positive ints, the tile sizes, warps and GROUP powers of two."""
    _check(isinstance(config, (list, tuple)) and len(config) in (4, 5, 6)
           and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in config),
           lambda: f"config must be (BLOCK_M, BLOCK_N, num_warps, num_stages[, GROUP[, BLOCK_N_FULL]]) "
                   f"positive ints, got {config!r}")
    bm, bn, warps, _, group, bn_full = config_fields(config)
    for name, value in (("BLOCK_M", bm), ("BLOCK_N", bn), ("num_warps", warps)):
        _check(value & (value - 1) == 0, lambda: f"config {name}={value} must be a power of two")
    _check(group & (group - 1) == 0, lambda: f"GROUP={group} heads per program must be a power of two (tile rows)")
    _check(bn_full % bn == 0 and bn_full & (bn_full - 1) == 0,
           lambda: f"BLOCK_N_FULL={bn_full} must be a power of two and a multiple of BLOCK_N={bn}")


def config_fields(config):
    """A (BLOCK_M, BLOCK_N, num_warps, num_stages[, GROUP[, BLOCK_N_FULL]]) config as all
    six fields, the absent ones at their defaults (GROUP 1, BLOCK_N_FULL = BLOCK_N)."""
    config = tuple(config)
    return config + (1, config[1])[len(config) - 4:]


def tune_key(q, k, v, cu_seqlens, max_seqlen, causal=False, scale=None, window=None, *rest, softcap=None, **kw):
    """The shape key of a launch in a tuned-configs file (kernels/_tuned.py)."""
    has_window = _v.window_bounds("varlen_attention", window, _UNBOUNDED)[2]
    return _tuned.attention_key(q.dtype, q.shape[2], causal, q.shape[1] // max(k.shape[1], 1), has_window, softcap)


def _launch(q, k, v, cu_seqlens, max_seqlen, causal=False, scale=None, window=None,
            block_m=None, block_n=None, config=None, softcap=None):
    """Validate, then launch. block_m/block_n override the per-head-dim config (tests use
    small blocks to reach the multi-block paths on short sequences); config: None (the
    tuned config for this shape where a configs file has one, else config_for's) or a whole
    (BLOCK_M, BLOCK_N, num_warps, num_stages[, GROUP[, BLOCK_N_FULL]]) tuple (the
    benchmark's config sweep), GROUP query heads of one kv group per program (default 1;
    it must divide Hq / Hkv), BLOCK_N_FULL the key-block width of the unmasked middle
    range (default BLOCK_N; a power of two and a multiple of BLOCK_N)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _v.check_float("varlen_attention", name, t, 3, "(T, H, D)")
        _check(t.device == q.device, lambda: f"{name} is on {t.device}, expected q's device {q.device}")
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    _check(k.shape == v.shape, lambda: f"k and v must have the same shape, got k {tuple(k.shape)} v {tuple(v.shape)}")
    _check(k.shape[0] == T and k.shape[2] == D,
           lambda: f"k must be (T={T}, Hkv, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype,
           lambda: f"q, k, v must share a dtype, got q {q.dtype} k {k.dtype} v {v.dtype}")
    _check(Hkv >= 1 and Hq % Hkv == 0, lambda: f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    _check(1 <= D <= 256, lambda: f"head_dim must be in [1, 256], got {D}")
    _v.check_cu_seqlens("varlen_attention", cu_seqlens, q.device, f"{q.device}", q.shape[0])
    B = cu_seqlens.numel() - 1
    max_seqlen = _v.check_max_seqlen("varlen_attention", max_seqlen)
    _check(Hq <= _MAX_GRID_YZ, lambda: f"at most {_MAX_GRID_YZ} heads, got Hq={Hq}")
    left, right, has_window = _v.window_bounds("varlen_attention", window, _UNBOUNDED)
    softcap = _v.check_softcap("varlen_attention", softcap)

    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_d = max(16, _v.next_pow2(D))
    if config is None and block_m is None and block_n is None:
        config = _tuned.lookup(q.device, "triton/varlen_attention",
                               lambda: _tuned.attention_key(q.dtype, D, causal, Hq // Hkv, has_window, softcap))
    if config is not None:
        check_config(config)
    cfg = config or config_for(q.dtype, D, _v.rows_16b(q, k, v))
    bm, bn, warps, stages, group, bn_full = config_fields(cfg)
    _check((Hq // Hkv) % group == 0, lambda: f"GROUP={group} heads per program must divide Hq / Hkv = {Hq // Hkv}")
    bm = block_m or bm
    if block_n:
        # Without its own BLOCK_N_FULL the config runs single-width at the override.
        bn, bn_full = block_n, (bn_full if len(cfg) > 5 else block_n)
    _check(bn_full % bn == 0 and bn_full & (bn_full - 1) == 0,
           lambda: f"BLOCK_N_FULL={bn_full} must be a power of two and a multiple of BLOCK_N={bn}")
    long = _v.long_offsets(T, q, k, v, out)
    if long:
        _v.check_tile_span("varlen_attention", max(bm, bn_full), ("q", q), ("k", k), ("v", v), ("out", out))
    tile_seq, tile_info, n_tiles = tile_map(cu_seqlens, T, bm)
    _varlen_attention_kernel[(n_tiles, Hq // group)](
        q, k, v, out, cu_seqlens, tile_seq, tile_info, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), Hq // Hkv, left, right,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
        IS_CAUSAL=bool(causal), HAS_WINDOW=has_window,
        # fp32 inputs keep fp32-level products (never plain TF32) to match the reference;
        # the precision is ignored for 16-bit inputs.
        PRECISION=_fp32_precision(q.device) if q.dtype == torch.float32 else "tf32", GROUP=group,
        BLOCK_N_FULL=bn_full, SOFTCAP=softcap, ALIGNED_ROWS=_v.rows_aligned(q, k, v, out),
        LONG_OFFSETS=long, num_warps=warps, num_stages=stages)
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, scale=None, window=None, softcap=None):
    """Attention within each packed sequence.

    q: (T, Hq, D); k, v: (T, Hkv, D), Hq % Hkv == 0, all float16/bfloat16/float32, last dim
    contiguous (token and head strides are free, so views of a fused qkv tensor work);
    cu_seqlens: (B+1,) int32 on q's device with cu_seqlens[-1] == T (rows outside every
    sequence are left unwritten); max_seqlen: int, the longest sequence (validated, kept for
    the varlen API's shape; the work list comes from cu_seqlens);
    causal: bool; scale: float or None (1/sqrt(D)); window: None or (left, right) tokens
    visible on each side of the query, -1 = unbounded; softcap: None or c > 0, scores
    soft-capped as c * tanh(s / c) before the softmax (Gemma 2; a compile-time constant,
    so one kernel per model). Returns (T, Hq, D) in q's dtype.
    """
    return _launch(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, softcap=softcap)
