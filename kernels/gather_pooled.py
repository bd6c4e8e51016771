"""Pooled-row gather in Triton: one row per packed sequence (first, last or mean)."""
import functools

import torch
import triton
import triton.language as tl

from . import _tuned, _validate as _v

_POOLINGS = {"cls": 0, "last": 1, "mean": 2}


@triton.jit
def _gather_pooled_kernel(X, CU_SEQLENS, OUT, stride_xt, stride_ob, H,
                          POOLING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                          PREFETCH: tl.constexpr):
    """Program (seq, column block) writes OUT[seq, block]. PREFETCH (mean): each step
    loads the next row tile before adding the current one (same sums, same order)."""
    seq = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    start = tl.load(CU_SEQLENS + seq)
    end = tl.load(CU_SEQLENS + seq + 1)
    if POOLING != 2:
        # An empty sequence has no such row: NaN, as mean's 0 / 0 (and no load out of bounds).
        row_at = start if POOLING == 0 else end - 1
        ok = h_ok & (offs_h * 0 + start < end)  # a vector mask (a scalar term is not one in the interpreter)
        row = tl.load(X + row_at.to(tl.int64) * stride_xt + offs_h, mask=ok, other=float("nan"))
        out = row.to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        offs_t = tl.arange(0, BLOCK_T)
        if PREFETCH:
            # Triton does not pipeline this loop's loads: without this a step's loads go
            # out only after the previous step's adds (and ptxas spaces them out; see
            # SWEEP_CONFIGS). Here the next tile is in flight while this one is added.
            rows = start + offs_t
            x_next = tl.load(X + rows.to(tl.int64)[:, None] * stride_xt + offs_h[None, :],
                             mask=(rows < end)[:, None] & h_ok[None, :], other=0.0)
            for t0 in range(start, end, BLOCK_T):
                x = x_next
                rows = t0 + BLOCK_T + offs_t
                x_next = tl.load(X + rows.to(tl.int64)[:, None] * stride_xt + offs_h[None, :],
                                 mask=(rows < end)[:, None] & h_ok[None, :], other=0.0)
                acc += x.to(tl.float32)
        else:
            for t0 in range(start, end, BLOCK_T):
                rows = t0 + offs_t
                x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xt + offs_h[None, :],
                            mask=(rows < end)[:, None] & h_ok[None, :], other=0.0)
                acc += x.to(tl.float32)
        # An empty sequence divides 0 by 0, as the reference does.
        out = tl.sum(acc, 0) / (end - start).to(tl.float32)
    tl.store(OUT + seq.to(tl.int64) * stride_ob + offs_h, out.to(OUT.dtype.element_ty), mask=h_ok)


_check = functools.partial(_v.check, "gather_pooled")

# Candidates the benchmark times (python -m pyengine.bench kernels --op-sweep) for mean
# pooling at H = 1024, as config dicts for _launch. The launcher's own choice for mean:
# 128 columns x 32 rows, 4 warps, one row tile in flight (56 registers on sm_90, 9
# programs per SM); ptxas orders that step's four 16-byte loads per thread so that three
# of them wait for the one before (load, add, load, ...). With "stages": 2 the next
# tile's four loads go out together while this tile is added (66 registers, 7 programs per
# SM, more than twice the bytes in flight). Not measured yet.
SWEEP_CONFIGS = [
    {"stages": 2},
    {"block_h": 128, "block_t": 64, "num_warps": 8},                 # 16 KB of bf16 rows per step
    {"block_h": 128, "block_t": 64, "num_warps": 8, "stages": 2},
    {"block_h": 256, "block_t": 16, "stages": 2},                    # half as many programs
    {"block_h": 256, "block_t": 32, "num_warps": 8, "stages": 2},
    {"block_h": 512, "block_t": 8, "stages": 2},                     # 2 programs per sequence
    {"block_h": 128, "block_t": 16, "stages": 2},                    # 39 registers: 12 programs per SM
    {"block_h": 64, "block_t": 64, "stages": 2},                     # 16 programs per sequence
]
_POW2 = ("block_h", "block_t", "num_warps")
_LIMITS = {"block_h": 8192, "block_t": 1024, "num_warps": 32, "stages": 2}

_CONFIG_KEYS = ("block_h", "block_t", "num_warps", "stages")


def check_config(config):
    """A config dict's own rules, whatever the shape (a tuned-configs file's entries are
    checked with them when an engine starts): known keys, positive ints, powers of two
    and limits; the launcher checks what depends on the shape."""
    _v.launch_config("gather_pooled", config, dict.fromkeys(_CONFIG_KEYS, 1), _POW2, _LIMITS)


def tune_key(hidden, cu_seqlens, pooling, *rest, **kw):
    """The shape key of a launch in a tuned-configs file (kernels/_tuned.py)."""
    return _tuned.pooled_key(hidden.dtype, hidden.shape[1], pooling)


def _launch(hidden, cu_seqlens, pooling, out_dtype=None, config=None):
    """out_dtype: hidden's dtype (the op's contract) unless given (float32 for fused heads).
    config: None (the tuned config for this shape where a configs file has one, else the
    launcher's choice) or a dict with any of "block_h" (columns per
    program), "num_warps", and for mean pooling "block_t" (rows per step) and "stages"
    (row tiles of a program in flight, 1 or 2); block_h, block_t and num_warps are powers
    of two. The benchmark's sweep passes SWEEP_CONFIGS entries."""
    _check(pooling in _POOLINGS, lambda: f"unknown pooling {pooling!r}; expected 'cls', 'last' or 'mean'")
    _v.check_float("gather_pooled", "hidden", hidden, 2, "(T, H)")
    _v.check_cu_seqlens("gather_pooled", cu_seqlens, hidden.device, f"hidden's device {hidden.device}", hidden.shape[0])
    B = cu_seqlens.numel() - 1
    H = hidden.shape[1]
    # cls / last move one row per sequence: wide blocks. Mean streams every row of its
    # sequence in one program, so a long sequence is a serial chain of loads: narrow
    # column blocks (more programs per sequence) and tall row tiles (fewer steps each)
    # keep the longest chain short. Either way a tile is about 4K elements.
    block_h = min(_v.next_pow2(max(H, 1)), 1024 if pooling != "mean" else 128)
    block_t = max(1, 4096 // block_h)
    warps, stages = 4, 1
    if config is None:
        config = _tuned.lookup(hidden.device, "triton/gather_pooled", lambda: tune_key(hidden, cu_seqlens, pooling))
    if config is not None:
        cfg = _v.launch_config("gather_pooled", config,
                               {"block_h": block_h, "block_t": block_t, "num_warps": warps, "stages": stages},
                               _POW2, _LIMITS)
        _check(pooling == "mean" or not {"block_t", "stages"} & set(config),
               lambda: f"config keys 'block_t' and 'stages' apply to pooling='mean' only, got pooling={pooling!r}")
        block_h, block_t, warps, stages = cfg["block_h"], cfg["block_t"], cfg["num_warps"], cfg["stages"]
        _check(block_h * block_t <= 65536,
               lambda: f"config tile block_h x block_t = {block_h} x {block_t} exceeds 65536 elements")
    out = torch.empty((B, H), dtype=out_dtype or hidden.dtype, device=hidden.device)
    if B == 0 or H == 0:
        return out
    grid = (B, _v.cdiv(H, block_h))
    _gather_pooled_kernel[grid](hidden, cu_seqlens, out, hidden.stride(0), out.stride(0), H,
                                POOLING=_POOLINGS[pooling], BLOCK_T=block_t, BLOCK_H=block_h,
                                PREFETCH=stages == 2, num_warps=warps)
    return out


def gather_pooled(hidden, cu_seqlens, pooling):
    """One row per sequence.

    hidden: (T, H) float16/bfloat16/float32, last dim contiguous; cu_seqlens: (B+1,) int32;
    pooling: "cls" (first token), "last" (true last token) or "mean" (fp32 sum / length).
    Returns (B, H) in hidden's dtype.
    """
    return _launch(hidden, cu_seqlens, pooling)
