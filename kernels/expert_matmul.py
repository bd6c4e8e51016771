"""Mixture-of-experts matmul in Triton: each (token, slot) pair times its expert's weight,
all experts in one launch.

The pairs are sorted by expert on the device and each expert's run padded to whole
blocks of BLOCK_M rows (no host sync, fixed shapes: CUDA graphs can hold it), so a
program multiplies BLOCK_M pairs of one expert by BLOCK_N of its output columns; blocks
past the last expert's run exit at once."""
import functools

import torch
import triton
import triton.language as tl

from . import _tuned, _validate as _v


@triton.jit
def _expert_matmul_kernel(X, W, OUT, PAIRS, BLOCK_EXPERT, WEIGHTS, N, K, stride_x, stride_we, stride_wn,
                          stride_o, TOP_K: tl.constexpr, PER_PAIR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                          IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    e = tl.load(BLOCK_EXPERT + pid_m)
    if e < 0:
        return
    pair = tl.load(PAIRS + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # -1 marks padding
    ok_m = pair >= 0
    pair = tl.where(ok_m, pair, 0)
    row = pair if PER_PAIR else pair // TOP_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_n = offs_n < N
    x_rows = X + row.to(tl.int64)[:, None] * stride_x
    w_cols = W + e.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok_k = offs_k < K
        a = tl.load(x_rows + offs_k[None, :], mask=ok_m[:, None] & ok_k[None, :], other=0.0)
        b = tl.load(w_cols + offs_k[:, None], mask=ok_k[:, None] & ok_n[None, :], other=0.0)
        if IEEE:  # fp32 inputs: full fp32 products, not TF32
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_WEIGHT:
        acc *= tl.load(WEIGHTS + pair, mask=ok_m, other=0.0).to(tl.float32)[:, None]
    out = OUT + pair.to(tl.int64)[:, None] * stride_o + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=ok_m[:, None] & ok_n[None, :])


_check = functools.partial(_v.check, "expert_matmul")

# Candidates the benchmark times (python -m pyengine.bench kernels --op-sweep) on
# Qwen3-30B-A3B's two expert matmuls, against the launcher's own 64 x 64 x 32 (bf16) on 4
# warps in 3 stages. Not measured yet.
SWEEP_CONFIGS = [
    {"block_n": 128},                                            # wider tiles: fewer passes over x
    {"block_n": 128, "block_k": 64},
    {"block_m": 128, "block_n": 128, "num_warps": 8},
    {"block_m": 128, "block_n": 64, "block_k": 64, "num_warps": 4},
    {"block_m": 32, "block_n": 128, "block_k": 64},              # short expert runs waste less padding
    {"block_m": 16, "block_n": 128, "block_k": 128},
    {"block_k": 64, "num_stages": 4},
    {"block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 4},
]
_POW2 = ("block_m", "block_n", "block_k", "num_warps")
_LIMITS = {"block_m": 256, "block_n": 256, "block_k": 256, "num_warps": 16, "num_stages": 6}

_CONFIG_KEYS = ("block_m", "block_n", "block_k", "num_warps", "num_stages")


def check_config(config):
    """A config dict's own rules, whatever the shape (a tuned-configs file's entries are
    checked with them when an engine starts): known keys, positive ints, powers of two
    and limits; the launcher checks what depends on the shape."""
    _v.launch_config("expert_matmul", config, dict.fromkeys(_CONFIG_KEYS, 1), _POW2, _LIMITS)


def tune_key(x, w, experts, weights=None, per_pair=False, config=None):
    """The shape key of a launch in a tuned-configs file (kernels/_tuned.py): the dtype and
    the expert weight's (N, K); nothing that depends on the batch."""
    return f"{_tuned.dtype_name(x.dtype)}/n{w.shape[1]}/k{w.shape[2]}"


def align(experts, num_experts, block_m):
    """Pairs sorted by expert, each expert's run padded to whole blocks, on the device
    without a host sync -> (pairs (rows,) int32: pair index, or -1 for padding;
    block_expert (rows / block_m,) int32: the block's expert, -1 past the last run).

    experts: (T, k) int expert per token slot; pair p is token p // k, slot p % k.
    rows = P + E * (block_m - 1) rounded up to block_m: the most any routing needs."""
    flat = experts.reshape(-1)
    P, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).index_add_(
        0, flat, torch.ones(P, dtype=torch.int64, device=dev))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    first = counts.cumsum(0) - counts  # where each expert's pairs start in `order`
    dest = (ends - padded)[e_sorted] + torch.arange(P, device=dev) - first[e_sorted]
    rows = _v.cdiv(P + num_experts * (block_m - 1), block_m) * block_m
    pairs = torch.full((rows,), -1, dtype=torch.int32, device=dev)
    pairs[dest] = order.to(torch.int32)
    starts = torch.arange(0, rows, block_m, device=dev)
    block_expert = torch.searchsorted(ends, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pairs, block_expert


def _launch(x, w, experts, weights=None, per_pair=False, config=None):
    """config: None (the tuned config for this shape where a configs file has one, else
    the launcher's choice) or a dict of "block_m", "block_n", "block_k", "num_warps"
    (powers of two; the blocks at least 16, as tl.dot needs) and "num_stages"."""
    _check(isinstance(w, torch.Tensor) and w.dim() == 3, lambda: f"w must be (E, N, K), got {getattr(w, 'shape', w)}")
    E, N, K = w.shape
    _v.check_float("expert_matmul", "x", x, 2, "(rows, K)")
    _check(x.shape[1] == K, lambda: f"x has {x.shape[1]} columns, the experts take K={K}")
    _check(w.dtype == x.dtype and w.device == x.device,
           lambda: f"w must match x's dtype and device ({x.dtype}, {x.device}), got {w.dtype}, {w.device}")
    _check(w.stride(2) == 1 and x.stride(1) == 1, lambda: "x and w must be contiguous in their last dim")
    _check(isinstance(experts, torch.Tensor) and experts.dim() == 2 and experts.dtype in (torch.int32, torch.int64)
           and experts.device == x.device, lambda: "experts must be an int32/int64 tensor (T, k) on x's device")
    _v.check_index_range("expert_matmul", "experts", experts, E, "w")
    T, k = experts.shape
    _check(x.shape[0] == (T * k if per_pair else T),
           lambda: f"x must have {T * k if per_pair else T} rows ({'pairs' if per_pair else 'tokens'}), "
           f"got {x.shape[0]}")
    if weights is not None:
        _check(isinstance(weights, torch.Tensor) and weights.shape == experts.shape and weights.device == x.device,
               lambda: f"weights must be {tuple(experts.shape)} on {x.device}, got {getattr(weights, 'shape', None)}")
    # Fixed blocks whatever the batch (a shape-dependent choice would compile a kernel
    # per batch size class).
    if config is None:
        config = _tuned.lookup(x.device, "triton/expert_matmul", lambda: tune_key(x, w, experts))
    # block_k 32 for fp32 too: at 64, triton 3.8 spills 24 bytes of the fp32 (IEEE) kernel.
    cfg = _v.launch_config("expert_matmul", config, {"block_m": 64, "block_n": 64, "block_k": 32,
                                                     "num_warps": 4, "num_stages": 3}, _POW2, _LIMITS)
    for name in ("block_m", "block_n", "block_k"):
        _check(cfg[name] >= 16, lambda: f"config[{name!r}] must be at least 16, got {cfg[name]}")
    out = torch.empty((T * k, N), dtype=x.dtype, device=x.device)
    if T * k == 0 or N == 0:
        return out
    pairs, block_expert = align(experts, E, cfg["block_m"])
    wts = weights.reshape(-1).contiguous() if weights is not None else pairs  # unused without HAS_WEIGHT
    grid = (block_expert.numel(), _v.cdiv(N, cfg["block_n"]))
    _expert_matmul_kernel[grid](x, w, out, pairs, block_expert, wts, N, K, x.stride(0), w.stride(0),
                                w.stride(1), out.stride(0), TOP_K=k, PER_PAIR=per_pair,
                                HAS_WEIGHT=weights is not None, IEEE=x.dtype == torch.float32,
                                BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def expert_matmul(x, w, experts, weights=None, per_pair=False):
    """Each (token, slot) pair's row times its expert's weight, transposed.

    x: (T, K) token rows, or with per_pair (T * k, K) one row per pair; w: (E, N, K) in
    x's dtype (float16/bfloat16/float32); experts: (T, k) int, expert of each slot;
    weights: None or (T, k), a factor on each pair's output row.
    Returns (T * k, N) in x's dtype, row p for token p // k, slot p % k (fp32 sums).
    """
    return _launch(x, w, experts, weights, per_pair)
