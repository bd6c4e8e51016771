"""Pooled rows through the final norm in Triton: gather (cls / last / mean) + optional
residual add + LayerNorm / RMSNorm, written in fp32 for the fp32 head. Only the pooled
rows are normed for cls / last, instead of all T tokens."""
import functools

import torch
import triton
import triton.language as tl

from . import _tuned, _validate as _v

_POOLINGS = {"cls": 0, "last": 1, "mean": 2}
_NORMS = {None: 0, "layer": 1, "rms": 2}


@triton.jit
def _load_raw(X, RES, rows, row_ok, offs_h, h_ok, stride_x, stride_r, HAS_RESIDUAL: tl.constexpr):
    """(rows, BLOCK_H) tiles of hidden and of the residual (hidden again without one), as stored."""
    ok = row_ok[:, None] & h_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + offs_h[None, :], mask=ok, other=0.0)
    r = x
    if HAS_RESIDUAL:
        r = tl.load(RES + r64 * stride_r + offs_h[None, :], mask=ok, other=0.0)
    return x, r


@triton.jit
def _add_rows(x, r, HAS_RESIDUAL: tl.constexpr):
    """hidden (+ residual, rounded to hidden's dtype) in fp32, from _load_raw's tiles."""
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _load_rows(X, RES, rows, row_ok, offs_h, h_ok, stride_x, stride_r, HAS_RESIDUAL: tl.constexpr):
    """(rows, BLOCK_H) tile of hidden (+ residual, rounded to hidden's dtype) in fp32."""
    x, r = _load_raw(X, RES, rows, row_ok, offs_h, h_ok, stride_x, stride_r, HAS_RESIDUAL)
    return _add_rows(x, r, HAS_RESIDUAL)


@triton.jit
def _norm_rows(x, w, b, h_ok, H, eps, offset, NORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row-wise norm of an fp32 (rows, BLOCK_H) tile; padded columns must hold 0."""
    if NORM == 1:
        mean = tl.sum(x, 1) / H
        diff = tl.where(h_ok[None, :], x - mean[:, None], 0.0)
        var = tl.sum(diff * diff, 1) / H
        y = diff * tl.rsqrt(var + eps)[:, None] * w[None, :]
        if HAS_BIAS:
            y = y + b[None, :]
    elif NORM == 2:
        y = x * tl.rsqrt(tl.sum(x * x, 1) / H + eps)[:, None] * (w + offset)[None, :]
    else:
        y = x
    return y


@triton.jit
def _rows(v, ROWS_FIRST: tl.constexpr):
    """(BLOCK_T,) -> broadcastable over _mean_warp_rows' tiles: (BLOCK_T, 1, 1) when rows
    are dimension 0, else (1, BLOCK_T, 1)."""
    if ROWS_FIRST:
        return v[:, None, None]
    else:
        return v[None, :, None]


@triton.jit
def _load_spans(X, RES, rows, hi, cols, c_ok, stride_x, stride_r, HAS_RESIDUAL: tl.constexpr, EVEN_H: tl.constexpr,
                ROWS_FIRST: tl.constexpr):
    """_mean_warp_rows' tiles of hidden and of the residual (hidden again without one) for
    rows (BLOCK_T,) below hi, as stored; rows past hi hold zeros."""
    ok = _rows(rows < hi, ROWS_FIRST)
    if not EVEN_H:
        ok = ok & c_ok
    r64 = _rows(rows.to(tl.int64), ROWS_FIRST)
    x = tl.load(X + r64 * stride_x + cols, mask=ok, other=0.0)
    r = x
    if HAS_RESIDUAL:
        r = tl.load(RES + r64 * stride_r + cols, mask=ok, other=0.0)
    return x, r


@triton.jit
def _row_sum(t, ROWS_FIRST: tl.constexpr):
    """Per-row sums of a tile, kept 3-d in the tile's own layout (so they broadcast back
    without a layout conversion): the chunks a thread holds first (in-thread adds), then
    the warp's lanes (one shuffle tree per row; the lanes first would run a tree per chunk)."""
    if ROWS_FIRST:
        return tl.sum(tl.sum(t, 1, keep_dims=True), 2, keep_dims=True)
    else:
        return tl.sum(tl.sum(t, 0, keep_dims=True), 2, keep_dims=True)


@triton.jit
def _norm_acc(acc, x, r, rows, hi, c_ok, H, eps, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              EVEN_H: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """acc + the normed rows (without the affine part) of one step of _mean_warp_rows, from
    _load_spans' tiles. Rows past hi load as zeros and get a zero scale, so they add exactly
    0 without a per-element select."""
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    x = x.to(tl.float32)
    live = _rows(rows < hi, ROWS_FIRST)
    if NORM == 1:
        diff = x - _row_sum(x, ROWS_FIRST) / H
        if not EVEN_H:
            diff = tl.where(c_ok, diff, 0.0)
        rstd = tl.rsqrt(_row_sum(diff * diff, ROWS_FIRST) / H + eps)
        # a zero scale for rows past hi, whatever eps makes of their zero variance
        acc += diff * tl.where(live, rstd, 0.0)
    elif NORM == 2:
        rstd = tl.rsqrt(_row_sum(x * x, ROWS_FIRST) / H + eps)
        acc += x * tl.where(live, rstd, 0.0)
    else:
        acc += x
    return acc


@triton.jit
def _mean_warp_rows(X, RES, W, B, OUT, slot, lo, hi, n_splits, chunk_stride, stride_x, stride_r, stride_o, H, eps,
                    offset, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, SPAN: tl.constexpr, PREFETCH: tl.constexpr,
                    EVEN_H: tl.constexpr, ASYNC: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """Rows lo..hi of one sequence, summed after the norm into OUT[slot] (divided by the
    row count when the sequence is one slice), with rows held as tiles of BLOCK_T rows x
    CH = BLOCK_H // SPAN chunks x SPAN columns: a warp's 32 lanes span SPAN columns (16
    bytes each) and the warps take different rows, so a row's statistics are per-thread
    sums and warp shuffles, with no barrier in the loop (a (BLOCK_T, BLOCK_H) tile spreads
    each row over the warps, and every statistic is a block reduction). The affine part is
    applied once to the slice's sum: sum_t (z_t * w + b) = (sum_t z_t) * w + count * b.
    Which dimension gets the warps is Triton's choice, from what it can prove contiguous:
    the chunk and row dimensions tie (a chunk is SPAN columns apart, a row an unknown
    stride), and triton 3.6 gives the warps to the first of the two, 3.7 and later to the
    second. So ROWS_FIRST (the launcher's, by version) puts the rows first for 3.6, as
    (BLOCK_T, CH, SPAN) with chunk_stride == SPAN a runtime value (a constant chunk stride
    ranked the chunks first there), and second from 3.7 on, as (CH, BLOCK_T, SPAN);
    tests/test_kernels_compile.py checks the loop has no barrier.
    Loads in flight: ASYNC >= 2 has Triton pipeline the loop's loads (cp.async into shared
    memory, ASYNC - 1 steps ahead); else PREFETCH loads the next step into registers
    before this one is normed."""
    CH: tl.constexpr = BLOCK_H // SPAN
    offs_t = tl.arange(0, BLOCK_T)
    if ROWS_FIRST:
        cols = tl.arange(0, CH)[None, :, None] * chunk_stride + tl.arange(0, SPAN)[None, None, :]
        acc = tl.zeros([BLOCK_T, CH, SPAN], dtype=tl.float32)
    else:
        cols = tl.arange(0, CH)[:, None, None] * SPAN + tl.arange(0, SPAN)[None, None, :]
        acc = tl.zeros([CH, BLOCK_T, SPAN], dtype=tl.float32)
    c_ok = cols < H
    if ASYNC >= 2:
        for t0 in tl.range(lo, hi, BLOCK_T, num_stages=ASYNC):
            rows = t0 + offs_t
            x, r = _load_spans(X, RES, rows, hi, cols, c_ok, stride_x, stride_r, HAS_RESIDUAL, EVEN_H, ROWS_FIRST)
            acc = _norm_acc(acc, x, r, rows, hi, c_ok, H, eps, NORM, HAS_RESIDUAL, EVEN_H, ROWS_FIRST)
    else:
        x_next, r_next = _load_spans(X, RES, lo + offs_t, hi, cols, c_ok, stride_x, stride_r, HAS_RESIDUAL,
                                     EVEN_H, ROWS_FIRST)
        for t0 in range(lo, hi, BLOCK_T):
            rows = t0 + offs_t
            x, r = x_next, r_next
            if PREFETCH:
                # The next tile's loads go out before this one is normed (same sums, same
                # order). Under a branch of their own: as plain loop code, with no use in
                # this step, ptxas issued them at the step's end (sm_90 SASS), too late to
                # hide anything; a branch keeps them at its start.
                if t0 + BLOCK_T < hi:
                    x_next, r_next = _load_spans(X, RES, rows + BLOCK_T, hi, cols, c_ok, stride_x, stride_r,
                                                 HAS_RESIDUAL, EVEN_H, ROWS_FIRST)
            acc = _norm_acc(acc, x, r, rows, hi, c_ok, H, eps, NORM, HAS_RESIDUAL, EVEN_H, ROWS_FIRST)
            if not PREFETCH:
                x_next, r_next = _load_spans(X, RES, rows + BLOCK_T, hi, cols, c_ok, stride_x, stride_r,
                                             HAS_RESIDUAL, EVEN_H, ROWS_FIRST)
    total = tl.sum(acc, 0 if ROWS_FIRST else 1)  # (CH, SPAN): the one cross-warp sum, after the loop
    cols2 = tl.arange(0, CH)[:, None] * SPAN + tl.arange(0, SPAN)[None, :]
    ok2 = cols2 < H
    count = tl.maximum(hi - lo, 0).to(tl.float32)  # a slice past the end holds no row
    if NORM != 0:
        w = tl.load(W + cols2, mask=ok2, other=0.0).to(tl.float32)
        if NORM == 1:
            total = total * w
            if HAS_BIAS:
                total += count * tl.load(B + cols2, mask=ok2, other=0.0).to(tl.float32)
        else:
            total = total * (w + offset)
    if n_splits == 1:
        total = total / count  # the mean itself: no finishing kernel (an empty sequence: 0 / 0)
    tl.store(OUT + slot * stride_o + cols2, total, mask=ok2)


# n_splits follows the batch's shape (T / B): unspecialised, so that 1 or a multiple of 16
# does not compile another variant.
@triton.jit(do_not_specialize=["n_splits"])
def _pooled_norm_kernel(X, RES, CU_SEQLENS, W, B, OUT, stride_x, stride_r, stride_o, H, eps, offset, n_splits,
                        chunk_stride,
                        POOLING: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                        PREFETCH: tl.constexpr, WARP_ROWS: tl.constexpr = 0, EVEN_H: tl.constexpr = False,
                        ASYNC: tl.constexpr = 0, ROWS_FIRST: tl.constexpr = False):
    """cls / last: OUT is (B, H), one normed row per sequence. mean: OUT is the (B *
    n_splits, H) fp32 workspace; program (seq, split) sums the normed rows of its slice
    of the sequence, and _mean_finish_kernel adds the slices up; with one slice per
    sequence OUT is (B, H) and takes the mean directly. PREFETCH (mean): each step loads
    the next tile before norming the current one (same sums, same order). EVEN_H: H ==
    BLOCK_H, so no column is masked. ASYNC, ROWS_FIRST and chunk_stride (WARP_ROWS, a
    runtime argument on purpose): see _mean_warp_rows."""
    seq = tl.program_id(0)
    start = tl.load(CU_SEQLENS + seq)
    end = tl.load(CU_SEQLENS + seq + 1)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    w = tl.zeros([BLOCK_H], dtype=tl.float32)
    b = tl.zeros([BLOCK_H], dtype=tl.float32)
    if NORM != 0:
        w = tl.load(W + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    if POOLING == 2:
        # The sequence is cut into n_splits slices, one program each, so a long sequence
        # is not one long serial chain of loads.
        split = tl.program_id(1)
        chunk = (end - start + n_splits - 1) // n_splits
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, end)
        if WARP_ROWS:
            _mean_warp_rows(X, RES, W, B, OUT, seq.to(tl.int64) * n_splits + split, lo, hi, n_splits, chunk_stride,
                            stride_x, stride_r, stride_o, H, eps, offset, NORM, HAS_BIAS, HAS_RESIDUAL, BLOCK_T,
                            BLOCK_H, WARP_ROWS, PREFETCH, EVEN_H, ASYNC, ROWS_FIRST)
        else:
            offs_t = tl.arange(0, BLOCK_T)
            acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
            if PREFETCH:
                # Triton does not pipeline these loads: without this a step waits for its rows,
                # then norms them (reductions with barriers) while no load of this program is
                # in flight. Here the next tile's round trip overlaps this tile's norm.
                x_next, r_next = _load_raw(X, RES, lo + offs_t, lo + offs_t < hi, offs_h, h_ok, stride_x, stride_r,
                                           HAS_RESIDUAL)
                for t0 in range(lo, hi, BLOCK_T):
                    rows = t0 + offs_t
                    x, r = x_next, r_next
                    x_next, r_next = _load_raw(X, RES, rows + BLOCK_T, rows + BLOCK_T < hi, offs_h, h_ok, stride_x,
                                               stride_r, HAS_RESIDUAL)
                    y = _norm_rows(_add_rows(x, r, HAS_RESIDUAL), w, b, h_ok, H, eps, offset, NORM, HAS_BIAS)
                    acc += tl.where((rows < hi)[:, None], y, 0.0)
            else:
                for t0 in range(lo, hi, BLOCK_T):
                    rows = t0 + offs_t
                    row_ok = rows < hi
                    x = _load_rows(X, RES, rows, row_ok, offs_h, h_ok, stride_x, stride_r, HAS_RESIDUAL)
                    y = _norm_rows(x, w, b, h_ok, H, eps, offset, NORM, HAS_BIAS)
                    acc += tl.where(row_ok[:, None], y, 0.0)
            total = tl.sum(acc, 0)
            if n_splits == 1:
                total = total / (end - start).to(tl.float32)  # an empty sequence: 0 / 0, as the reference
            slot = seq.to(tl.int64) * n_splits + split
            tl.store(OUT + slot * stride_o + offs_h, total, mask=h_ok)
    else:
        if POOLING == 0:
            rows = start + tl.arange(0, 1)
        else:
            rows = end - 1 + tl.arange(0, 1)
        x = _load_rows(X, RES, rows, (rows >= start) & (rows < end), offs_h, h_ok, stride_x, stride_r, HAS_RESIDUAL)
        out = tl.sum(_norm_rows(x, w, b, h_ok, H, eps, offset, NORM, HAS_BIAS), 0)
        out = tl.where(end > start, out, float("nan"))  # an empty sequence: NaN, as mean's 0 / 0
        tl.store(OUT + seq.to(tl.int64) * stride_o + offs_h, out, mask=h_ok)


@triton.jit(do_not_specialize=["n_splits"])
def _mean_finish_kernel(WS, CU_SEQLENS, OUT, stride_o, H, n_splits, BLOCK_H: tl.constexpr):
    """OUT[seq] = sum of the seq's n_splits workspace rows (in order: deterministic) / length."""
    seq = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    n = tl.load(CU_SEQLENS + seq + 1) - tl.load(CU_SEQLENS + seq)
    base = WS + seq.to(tl.int64) * n_splits * H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(base + s * H + offs_h, mask=h_ok, other=0.0)
    # An empty sequence divides 0 by 0, as the reference does.
    tl.store(OUT + seq.to(tl.int64) * stride_o + offs_h, acc / n.to(tl.float32), mask=h_ok)


_check = functools.partial(_v.check, "pooled_norm")

# _mean_warp_rows' dimension order for this triton: rows first before 3.7, second from 3.7
# on (the row loop's PTX checked at 3.6, 3.7, 3.8 and 3.9).
_ROWS_FIRST = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit()) < (3, 7)

# Candidates the benchmark times (python -m pyengine.bench kernels --op-sweep) for mean
# pooling at H = 1024, as config dicts for _launch. Registers: ptxas's for bf16 LayerNorm
# on sm_90 under triton 3.6 (the GPU image's) / 3.9 where they differ.
# Measured on the H200 (2026-11-27, triton 3.6, the code before the changes below): the
# (BLOCK_T, BLOCK_H) layout's best {"stages": 2} 0.257 ms (64% of a copy; 0.322 built-in);
# {"warp_rows": 1, "block_t": 4, "num_warps": 4, "stages": 2} 0.2425 ms (67%), now the
# launcher's choice at this width. Read from the PTX since: under triton 3.6 that layout
# was not the one intended; its warps took column chunks, not rows (122 registers, six
# barriers a step for row statistics across warps). With the dimension order that each
# triton needs (_mean_warp_rows) it is, under 3.6 and 3.9: no barrier in the row loop.
# Also changed since, not measured yet: a row's sums over its chunks run in-thread before
# the shuffles (one shuffle tree per row instead of one per chunk: 40 shuffles a step ->
# 10), rows past the end are zeroed by their scale rather than a select per element,
# full-width rows skip the column mask, the accumulation is one FMA per element (sm_90
# SASS at 3.9: 412 instructions a step -> about 250); the prefetched loads, which ptxas had
# moved towards the step's end, go out at its start; with one slice per sequence the
# kernel writes the means itself (no workspace, no finishing kernel).
SWEEP_CONFIGS = [
    {"stages": 2},                                                              # 125 registers
    {"warp_rows": 1, "block_t": 4, "num_warps": 4, "stages": 2},                # 96 registers
    # The workspace is B x slices x H fp32, written then read (4 slices at H = 1024: 10%
    # of the bytes of hidden); fewer slices make the longest sequence's chain longer.
    {"warp_rows": 1, "block_t": 4, "num_warps": 4, "stages": 2, "splits": 1},
    # Triton's pipelined loads (cp.async into shared memory, async_stages - 1 steps ahead):
    # the bytes in flight no longer depend on where ptxas puts a load.
    {"warp_rows": 1, "block_t": 4, "num_warps": 4, "async_stages": 3},          # 92 / 90 registers, 16 KB shared
    {"warp_rows": 1, "block_t": 4, "num_warps": 4, "async_stages": 3, "splits": 1},
    # One warp per program: no cross-warp sum even at the end; up to 21 programs per SM.
    {"warp_rows": 1, "block_t": 1, "num_warps": 1, "stages": 2},                # 127 / 114 registers
    {"warp_rows": 1, "block_t": 1, "num_warps": 1, "stages": 2, "splits": 1},
    {"warp_rows": 1, "block_t": 1, "num_warps": 1, "async_stages": 3},          # 96 / 94 registers, 4 KB
    {"warp_rows": 1, "block_t": 1, "num_warps": 1, "async_stages": 4},          # 96 / 94 registers, 6 KB
    {"warp_rows": 1, "block_t": 1, "num_warps": 1, "async_stages": 4, "splits": 1},
    {"warp_rows": 1, "block_t": 1, "num_warps": 1, "async_stages": 4, "splits": 2},
    {"warp_rows": 1, "block_t": 1, "num_warps": 1, "async_stages": 4, "splits": 8},
    {"warp_rows": 1, "block_t": 2, "num_warps": 1, "async_stages": 3},          # 128 registers, 8 KB
]
# The launcher's choice for mean pooling where a row holds at least one span (256 columns
# at 16 bits) and at most 1024 columns (wider rows would hold more than 32 elements a
# thread per tile); the (BLOCK_T, BLOCK_H) layout elsewhere.
_MEAN_WARP_ROWS = {"warp_rows": 1, "block_t": 4, "num_warps": 4, "stages": 2}
_POW2 = ("block_t", "num_warps")
_LIMITS = {"block_t": 256, "num_warps": 32, "splits": 64, "stages": 2, "warp_rows": 1, "async_stages": 4}

_CONFIG_KEYS = ("block_t", "num_warps", "splits", "stages", "warp_rows", "async_stages")


def check_config(config):
    """A config dict's own rules, whatever the shape (a tuned-configs file's entries are
    checked with them when an engine starts): known keys, positive ints, powers of two
    and limits; the launcher checks what depends on the shape."""
    _v.launch_config("pooled_norm", config, dict.fromkeys(_CONFIG_KEYS, 1), _POW2, _LIMITS)
_MEAN_ONLY = ("splits", "stages", "warp_rows", "async_stages")


def tune_key(hidden, cu_seqlens, pooling, norm_kind, weight=None, bias=None, eps=None, offset=0.0, residual=None,
             config=None):
    """The shape key of a launch in a tuned-configs file (kernels/_tuned.py)."""
    return _tuned.pooled_key(hidden.dtype, hidden.shape[1], pooling, norm_kind, residual is not None)


def _launch(hidden, cu_seqlens, pooling, norm_kind, weight, bias, eps, offset=0.0, residual=None, config=None):
    """config: None (the tuned config for this shape where a configs file has one, else
    the launcher's choice) or a dict with any of "block_t" (rows per step,
    a power of two), "num_warps", and for mean pooling "splits" (slices per sequence),
    "stages" (tiles of a program in flight, 1 or 2), "warp_rows" (1: rows held one per
    warp, see _mean_warp_rows; num_warps at most block_t keeps every row in one warp) and,
    with warp_rows, "async_stages" (2 to 4: Triton's pipelined loads through shared memory
    instead of "stages"); the benchmark's sweep passes SWEEP_CONFIGS entries."""
    _check(pooling in _POOLINGS, lambda: f"unknown pooling {pooling!r}; expected 'cls', 'last' or 'mean'")
    _check(norm_kind in _NORMS, lambda: f"unknown norm_kind {norm_kind!r}; expected None, 'layer' or 'rms'")
    _v.check_float("pooled_norm", "hidden", hidden, 2, "(T, H)")
    T, H = hidden.shape
    _v.hidden_size("pooled_norm", H)
    if residual is not None:
        _check(isinstance(residual, torch.Tensor) and residual.shape == hidden.shape,
               lambda: f"residual must match hidden's shape {tuple(hidden.shape)}, "
               f"got {getattr(residual, 'shape', type(residual))}")
        _check(residual.dtype == hidden.dtype,
               lambda: f"residual.dtype must be hidden's {hidden.dtype}, got {residual.dtype}")
        _check(residual.device == hidden.device, lambda: f"residual is on {residual.device}, expected {hidden.device}")
        _check(residual.stride(1) == 1 or H == 1,
               lambda: f"residual must be contiguous in its last dim, got strides {tuple(residual.stride())}")
    params = []
    if norm_kind is not None:
        params.append(("weight", weight))
    if norm_kind == "layer" and bias is not None:
        params.append(("bias", bias))
    for name, t in params:
        _v.check_param("pooled_norm", name, t, H, hidden.device, f"{hidden.device}",
                       note=f" for norm_kind={norm_kind!r}")
    _v.check_cu_seqlens("pooled_norm", cu_seqlens, hidden.device, f"{hidden.device}", hidden.shape[0])
    B = cu_seqlens.numel() - 1
    has_bias = norm_kind == "layer" and bias is not None
    block_h = _v.next_pow2(H)
    # Mean norms a (BLOCK_T, BLOCK_H) tile per step: about 4K elements keeps registers low.
    block_t = max(1, 4096 // block_h)
    warps = 4 if block_h <= 1024 else (8 if block_h <= 4096 else 16)
    mean = pooling == "mean"
    # Mean: slices of about 32 tokens on average (T and B are host ints: no sync), at most
    # 16 per sequence. A runtime argument, so ragged batches share one compiled kernel.
    n_splits = min(16, max(1, T // (32 * max(B, 1)))) if mean else 1
    stages, warp_rows, async_stages = 1, 0, 1
    if config is None:
        config = _tuned.lookup(hidden.device, "triton/pooled_norm",
                               lambda: tune_key(hidden, cu_seqlens, pooling, norm_kind, residual=residual))
    span = 32 * (16 // hidden.element_size())  # columns a warp's 32 lanes load at 16 bytes each
    if config is None and mean and span <= block_h <= 1024:
        config = _MEAN_WARP_ROWS
    if config is not None:
        cfg = _v.launch_config("pooled_norm", config, {"block_t": block_t, "num_warps": warps, "splits": n_splits,
                                                       "stages": stages, "warp_rows": 0, "async_stages": 1},
                               _POW2, _LIMITS)
        bad = [name for name in _MEAN_ONLY if name in config and not mean]
        _check(not bad, lambda: f"config key(s) {bad} apply to pooling='mean' only, got pooling={pooling!r}")
        _check(cfg["block_t"] * block_h <= 65536,
               lambda: f"config tile block_t x H = {cfg['block_t']} x {block_h} exceeds 65536 elements")
        block_t, warps, n_splits, stages = cfg["block_t"], cfg["num_warps"], cfg["splits"], cfg["stages"]
        async_stages = cfg["async_stages"]
        _check(async_stages == 1 or cfg["warp_rows"],
               lambda: f"config async_stages={async_stages} needs warp_rows=1 (the other layout has no such loop)")
        if cfg["warp_rows"]:
            # The row must hold one span.
            _check(block_h >= span, lambda: f"config warp_rows needs H >= {span} for {hidden.dtype}, got H={H}")
            warp_rows = span
    out = torch.empty((B, H), dtype=torch.float32, device=hidden.device)
    if B == 0:
        return out
    # One slice per sequence writes the means itself; more go through the workspace.
    dest = torch.empty((B * n_splits, H), dtype=torch.float32, device=hidden.device) if n_splits > 1 else out
    _pooled_norm_kernel[(B, n_splits)](
        hidden, hidden if residual is None else residual, cu_seqlens,
        hidden if norm_kind is None else weight, bias if has_bias else hidden, dest,
        hidden.stride(0), hidden.stride(0) if residual is None else residual.stride(0), dest.stride(0),
        H, float(eps), float(offset), n_splits, max(warp_rows, 1),
        POOLING=_POOLINGS[pooling], NORM=_NORMS[norm_kind], HAS_BIAS=has_bias,
        HAS_RESIDUAL=residual is not None, BLOCK_T=block_t, BLOCK_H=block_h, PREFETCH=stages == 2,
        WARP_ROWS=warp_rows, EVEN_H=H == block_h, ASYNC=async_stages if async_stages > 1 else 0,
        ROWS_FIRST=bool(warp_rows) and _ROWS_FIRST, num_warps=warps)
    if n_splits > 1:
        fin_h = min(block_h, 1024)
        _mean_finish_kernel[(B, _v.cdiv(H, fin_h))](dest, cu_seqlens, out, out.stride(0), H, n_splits,
                                                         BLOCK_H=fin_h, num_warps=4)
    return out


def pooled_norm(hidden, cu_seqlens, pooling, norm_kind, weight, bias, eps, offset=0.0, residual=None):
    """One pooled row per sequence through the model's final norm, in fp32.

    hidden: (T, H) float16/bfloat16/float32, last dim contiguous; cu_seqlens: (B+1,) int32;
    pooling: "cls" | "last" | "mean"; norm_kind: None | "layer" | "rms"; weight: (H,)
    (unused when norm_kind is None); bias: (H,) or None ("layer" only); eps: float;
    offset: float added to the weight for "rms" (1 for Gemma); residual: (T, H) or None,
    added to hidden first and rounded to its dtype. "mean" averages the normed tokens.
    Returns (B, H) float32.
    """
    return _launch(hidden, cu_seqlens, pooling, norm_kind, weight, bias, eps, offset, residual)
