"""Per-head RMSNorm of q and k followed by rotary, in Triton, in place on packed q and k.

One pass replaces ``add_rms_norm`` on the (T * H, D) rows plus ``rotary``: q and k stay
strided views of the fused qkv output (no copies), each element is read and written
once, and one program handles every head of a token, so one cos/sin row serves them all.
"""

import triton
import triton.language as tl

from . import _tuned, _validate as _v
from .rotary import _token_cos_sin


@triton.jit
def _norm_rotate_heads(X, stride_h, n_heads, W, eps, offset, cos, sin,
                       HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr,
                       BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_H: tl.constexpr):
    """RMSNorm over HEAD_DIM features, then rotation of the first 2*HALF, for every head
    of one token (X points at its head 0), in place. cos, sin: (1, BLOCK_HALF) fp32."""
    offs_j = tl.arange(0, BLOCK_HALF)
    j_ok = offs_j < HALF
    # The two members of each rotated pair: halves (neox) or neighbours (interleaved).
    if NEOX:
        c1 = offs_j
        c2 = offs_j + HALF
    else:
        c1 = 2 * offs_j
        c2 = 2 * offs_j + 1
    w1 = (tl.load(W + c1, mask=j_ok, other=0.0).to(tl.float32) + offset)[None, :]
    w2 = (tl.load(W + c2, mask=j_ok, other=0.0).to(tl.float32) + offset)[None, :]
    # Features past the rotated width (partial rotary) are normed only.
    offs_t = 2 * HALF + tl.arange(0, BLOCK_TAIL)
    t_ok = offs_t < HEAD_DIM
    if HEAD_DIM > 2 * HALF:
        wt = (tl.load(W + offs_t, mask=t_ok, other=0.0).to(tl.float32) + offset)[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = (offs_h < n_heads)[:, None]
        base = X + offs_h[:, None] * stride_h
        ok = h_ok & j_ok[None, :]
        x1 = tl.load(base + c1[None, :], mask=ok, other=0.0)
        x2 = tl.load(base + c2[None, :], mask=ok, other=0.0)
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        ss = tl.sum(x1f * x1f, 1) + tl.sum(x2f * x2f, 1)
        if HEAD_DIM > 2 * HALF:
            tail_ok = h_ok & t_ok[None, :]
            xt = tl.load(base + offs_t[None, :], mask=tail_ok, other=0.0).to(tl.float32)
            ss += tl.sum(xt * xt, 1)
        rstd = tl.rsqrt(ss / HEAD_DIM + eps)[:, None]
        # The normed value is rounded to the input dtype before the rotation, as the
        # two-step path (add_rms_norm, then rotary) stores it between its kernels.
        n1 = (x1f * rstd * w1).to(x1.dtype).to(tl.float32)
        n2 = (x2f * rstd * w2).to(x1.dtype).to(tl.float32)
        tl.store(base + c1[None, :], (n1 * cos - n2 * sin).to(x1.dtype), mask=ok)
        tl.store(base + c2[None, :], (n2 * cos + n1 * sin).to(x1.dtype), mask=ok)
        if HEAD_DIM > 2 * HALF:
            tl.store(base + offs_t[None, :], (xt * rstd * wt).to(x1.dtype), mask=tail_ok)


@triton.jit
def _qk_norm_rotary_kernel(Q, K, QW, KW, POS, COS_SIN, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                           n_q, n_k, heads, k_first, eps, offset,
                           HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr,
                           BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                           BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    """Program (token, p) does q heads [p * heads, (p + 1) * heads) and k heads
    [(p - k_first) * heads, (p - k_first + 1) * heads), those of each that exist. With
    heads >= both head counts and k_first = 0 one program does every head of its token;
    with k_first = cdiv(n_q, heads) each program owns a chunk of q heads or of k heads."""
    tok, cos, sin = _token_cos_sin(POS, COS_SIN, stride_cs, HALF, BLOCK_HALF)
    p = tl.program_id(1)
    hq = p * heads
    if hq < n_q:
        _norm_rotate_heads(Q + tok * stride_qt + hq * stride_qh, stride_qh, tl.minimum(n_q - hq, heads), QW, eps,
                           offset, cos, sin, HEAD_DIM, HALF, NEOX, BLOCK_HALF, BLOCK_TAIL, BLOCK_HQ)
    hk = (p - k_first) * heads
    if hk >= 0:
        _norm_rotate_heads(K + tok * stride_kt + hk * stride_kh, stride_kh, tl.minimum(n_k - hk, heads), KW, eps,
                           offset, cos, sin, HEAD_DIM, HALF, NEOX, BLOCK_HALF, BLOCK_TAIL, BLOCK_HK)


# Heads per loop step: at most this many (head, pair) elements, 2 per thread of 4 warps
# for each half, so a step stays in registers at any head count.
_MAX_PAIRS = 1024

# Candidates the benchmark times (python -m pyengine.bench kernels --op-sweep), as config
# dicts for _launch. The launcher's own choice: one program per token, 4 warps, q heads
# then k heads; its k loads wait for its q stores (q and k are views of one buffer, so the
# order is kept), two DRAM round trips per token, and at 72 registers (sm_90, Qwen3's
# 16 + 8 heads of 128) 7 programs per SM hold about 20 KB of loads in flight. "heads"
# gives each program a chunk of q heads or of k heads alone: one round trip each, fewer
# registers, more programs per SM. Registers are ptxas's for bf16 at those head counts.
# Not measured yet.
SWEEP_CONFIGS = [
    {"num_warps": 8},                   # today's grid, 48 registers
    {"heads": 16},                      # q and k in separate programs, 72 registers
    {"heads": 8},                       # three programs per token, 40 registers: 12 per SM
    {"heads": 8, "num_warps": 2},       # 64 registers, 16 bytes of q/k per thread
    {"heads": 4},                       # six programs per token, 32 registers: 16 per SM
    {"heads": 4, "num_warps": 2},       # 40 registers: 25 programs per SM
    {"heads": 2},                       # twelve programs of 512 bytes, 32 registers
]
_POW2 = ("block_h", "num_warps")
_LIMITS = {"heads": 1 << 16, "block_h": 256, "num_warps": 32}

_CONFIG_KEYS = ("heads", "block_h", "num_warps")


def check_config(config):
    """A config dict's own rules, whatever the shape (a tuned-configs file's entries are
    checked with them when an engine starts): known keys, positive ints, powers of two
    and limits; the launcher checks what depends on the shape."""
    _v.launch_config("qk_norm_rotary", config, dict.fromkeys(_CONFIG_KEYS, 1), _POW2, _LIMITS)


def tune_key(q, k, q_weight, k_weight, positions, cos_sin, *rest, **kw):
    """The shape key of a launch in a tuned-configs file (kernels/_tuned.py)."""
    return f"{_tuned.dtype_name(q.dtype)}/hq{q.shape[1]}/hk{k.shape[1]}/d{q.shape[2]}/r{cos_sin.shape[-1]}"


def _launch(q, k, q_weight, k_weight, positions, cos_sin, eps, offset=0.0, neox=True, config=None):
    """config: None (the tuned config for this shape where a configs file has one, else
    the launcher's choice) or a dict with any of "heads" (q or k heads per
    program; default: every head of the token in one program), "block_h" (at most this
    many heads per loop step, a power of two; default _MAX_PAIRS // BLOCK_HALF) and
    "num_warps"; the benchmark's sweep passes SWEEP_CONFIGS entries."""
    T, Hq, D, R = _v.rotary_inputs("qk_norm_rotary", q, k, positions, cos_sin)
    _v.hidden_size("qk_norm_rotary", D)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        _v.check_param("qk_norm_rotary", name, w, D, q.device, f"q's device {q.device}", " (head_dim)")
    Hk = k.shape[1]
    half = R // 2
    block_half = _v.next_pow2(half)
    block_tail = _v.next_pow2(max(D - R, 1))
    cap = max(_MAX_PAIRS // block_half, 1)
    warps = 4
    heads, k_first, grid = max(Hq, Hk, 1), 0, (T, 1)
    if config is None:
        config = _tuned.lookup(q.device, "triton/qk_norm_rotary", lambda: tune_key(q, k, q_weight, k_weight,
                                                                                    positions, cos_sin))
    if config is not None:
        cfg = _v.launch_config("qk_norm_rotary", config, {"heads": heads, "block_h": cap, "num_warps": warps},
                               _POW2, _LIMITS)
        cap, warps = cfg["block_h"], cfg["num_warps"]
        if "heads" in config:
            heads = cfg["heads"]
            k_first = _v.cdiv(Hq, heads)
            grid = (T, k_first + _v.cdiv(Hk, heads))
            _v.check("qk_norm_rotary", grid[1] <= 65535,
                     lambda: f"config['heads']={heads} makes {grid[1]} programs per token, at most 65535")
    if T == 0:
        return q, k
    block_hq = min(_v.next_pow2(max(min(Hq, heads), 1)), cap)
    block_hk = min(_v.next_pow2(max(min(Hk, heads), 1)), cap)
    _qk_norm_rotary_kernel[grid](
        q, k, q_weight, k_weight, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin.stride(0), Hq, Hk, heads, k_first, float(eps), float(offset), HEAD_DIM=D, HALF=half,
        NEOX=bool(neox), BLOCK_HALF=block_half, BLOCK_TAIL=block_tail, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        num_warps=warps)
    return q, k


def qk_norm_rotary(q, k, q_weight, k_weight, positions, cos_sin, eps, offset=0.0, neox=True):
    """Per-head RMSNorm of q and k, then rotary on packed positions, in place on both.

    q: (T, Hq, D); k: (T, Hkv, D), same dtype float16/bfloat16/float32, last dim
    contiguous, any token and head strides (views of a fused qkv tensor work);
    q_weight, k_weight: (D,) float; positions: (T,) int64 (or int32), restarting at 0
    per sequence, each < max_pos; cos_sin: (max_pos, R) fp32, cos in the first R/2
    columns and sin in the last R/2, R <= D even; eps, offset: float. Each head becomes
    x * rsqrt(mean(x^2) + eps) * (w + offset) in fp32, rounded to q's dtype, then its
    first R features rotate as in ``rotary`` (neox=True halves, False interleaved pairs).
    Returns (q, k).
    """
    return _launch(q, k, q_weight, k_weight, positions, cos_sin, eps, offset, neox)
