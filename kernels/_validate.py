"""Input checks shared by the Triton launchers. Every check takes the op's name, which
starts each error message ("add_rms_norm: ..."), so the messages read as the op's own."""
import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_H = 32768


def check(op, cond, msg):
    """Raise ValueError("op: msg") unless cond. msg may be a callable returning the text:
    the launchers pass lambdas, so a call that passes every check formats no message
    (f-strings with shapes cost microseconds each, on every launch)."""
    if not cond:
        raise ValueError(f"{op}: {msg() if callable(msg) else msg}")


def cdiv(a, b):
    """ceil(a / b) for ints; plain Python, as triton.cdiv costs a wrapper call per launch."""
    return -(-a // b)


def next_pow2(n):
    """The smallest power of two >= n for n >= 1 (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def launch_config(op, config, defaults, pow2=(), limits=None):
    """Launch parameters: ``defaults`` (a dict name -> int, the launcher's own choice)
    with ``config`` (None, or a dict of some of those names, e.g. from a benchmark's
    sweep) laid over it. Unknown names, values that are not positive ints, names in
    ``pow2`` that are not powers of two and values above ``limits[name]`` raise
    ValueError("op: ...") before anything is launched."""
    if config is None:
        return defaults
    check(op, isinstance(config, dict),
          lambda: f"config must be None or a dict with keys among {sorted(defaults)}, got {config!r}")
    unknown = sorted(set(config) - set(defaults))
    check(op, not unknown, lambda: f"unknown config key(s) {unknown}; expected among {sorted(defaults)}")
    for name, value in config.items():
        check(op, isinstance(value, int) and not isinstance(value, bool) and value > 0,
              lambda: f"config[{name!r}] must be a positive int, got {value!r}")
        check(op, name not in pow2 or value & (value - 1) == 0,
              lambda: f"config[{name!r}] must be a power of two, got {value}")
        top = (limits or {}).get(name)
        check(op, top is None or value <= top, lambda: f"config[{name!r}] must be at most {top}, got {value}")
    return {**defaults, **config}


def rows(t, H):
    """A (rows, H) view of t with a unit last stride (copying only when no view exists)."""
    t2 = t.reshape(-1, H)
    if t2.shape[0] > 0 and H > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def hidden_size(op, H):
    check(op, 1 <= H <= MAX_H, lambda: f"hidden size must be in [1, {MAX_H}], got {H}")


def check_x(op, x):
    """x: a float (..., H) tensor with 1 <= H <= MAX_H; returns H."""
    check(op, isinstance(x, torch.Tensor) and x.dim() >= 1,
          lambda: f"x must be a tensor (..., H), got {getattr(x, 'shape', type(x))}")
    check(op, x.dtype in DTYPES, lambda: f"x.dtype must be float16, bfloat16 or float32, got {x.dtype}")
    H = x.shape[-1]
    hidden_size(op, H)
    return H


def check_residual(op, residual, x):
    """residual: x's shape, dtype and device."""
    check(op, isinstance(residual, torch.Tensor) and residual.shape == x.shape,
          lambda: f"residual must match x's shape {tuple(x.shape)}, got {getattr(residual, 'shape', type(residual))}")
    check(op, residual.dtype == x.dtype, lambda: f"residual.dtype must be x's {x.dtype}, got {residual.dtype}")
    check(op, residual.device == x.device, lambda: f"residual is on {residual.device}, expected x's device {x.device}")


def check_param(op, name, t, H, device, expected, note=""):
    """A contiguous float (H,) parameter on device; `expected` names that device in the
    message, `note` follows the wanted shape."""
    check(op, isinstance(t, torch.Tensor) and t.shape == (H,),
          lambda: f"{name} must be ({H},){note}, got {getattr(t, 'shape', type(t))}")
    check(op, t.dtype in DTYPES, lambda: f"{name}.dtype must be a float type, got {t.dtype}")
    check(op, t.device == device, lambda: f"{name} is on {t.device}, expected {expected}")
    check(op, t.is_contiguous(), lambda: f"{name} must be contiguous")


def check_float(op, name, t, ndim, layout):
    """A float16/bfloat16/float32 tensor of ndim dims (layout, e.g. "(T, H)", is for the
    message), contiguous in its last dim (or of size 1 there)."""
    check(op, isinstance(t, torch.Tensor) and t.dim() == ndim,
          lambda: f"{name} must be a {ndim}-D tensor {layout}, got {getattr(t, 'shape', type(t))}")
    check(op, t.dtype in DTYPES, lambda: f"{name}.dtype must be float16, bfloat16 or float32, got {t.dtype}")
    check(op, t.stride(-1) == 1 or t.shape[-1] == 1,
          lambda: f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")


def check_tile_span(op, rows, *named):
    """(name, t) of (T, H, D) views. The kernels form each sequence's or token's base
    offset in int64 and what lies within one tile in int32: ``rows`` tokens of every head.
    Strides that put that span past int32 are refused, not read out of bounds."""
    for name, t in named:
        span = (rows - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) + t.shape[2]
        check(op, span < 2 ** 31, lambda: f"{name}'s strides {tuple(t.stride())} put {rows} token(s) of its "
                                          f"{t.shape[1]} heads {span} elements apart, past int32 offsets")


def long_offsets(T, *tensors):
    """Whether a position within a sequence times a token stride can pass int32: the
    attention kernels then offset their tiles in int64 (a feature flag: for the usual
    shapes it stays off, whatever the batch). T bounds every position."""
    return T * max(t.stride(0) for t in tensors) >= 2 ** 31


def check_cu_seqlens(op, cu_seqlens, device, expected, T):
    """cu_seqlens: a contiguous 1-D (B+1,) int32 tensor on device (`expected` names it),
    running from 0 to T (the packed rows) without decreasing. The values are checked
    where they sit on the host; on a GPU that would cost a sync (or kernels) per launch,
    so there they are the caller's promise (the engine's batches are built so)."""
    check(op, isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 1,
          lambda: f"cu_seqlens must be a 1-D (B+1,) tensor, got {getattr(cu_seqlens, 'shape', type(cu_seqlens))}")
    check(op, cu_seqlens.dtype == torch.int32, lambda: f"cu_seqlens.dtype must be int32, got {cu_seqlens.dtype}")
    check(op, cu_seqlens.device == device, lambda: f"cu_seqlens is on {cu_seqlens.device}, expected {expected}")
    check(op, cu_seqlens.is_contiguous(), "cu_seqlens must be contiguous")
    if cu_seqlens.device.type == "cpu":
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        check(op, first == 0, lambda: f"cu_seqlens must start at 0, got {first}")
        check(op, last == T, lambda: f"cu_seqlens must end at T={T} (the packed rows), got {last}")
        check(op, bool((cu_seqlens[1:] >= cu_seqlens[:-1]).all()), "cu_seqlens must not decrease")


def check_index_range(op, name, t, hi, table):
    """The values of int tensor ``t`` (indices into the ``hi`` rows of ``table``) lie in
    [0, hi); checked where they sit on the host, as cu_seqlens (on a GPU the caller's promise)."""
    if t.device.type == "cpu" and t.numel():
        lo_v, hi_v = int(t.min()), int(t.max())
        check(op, lo_v >= 0 and hi_v < hi,
              lambda: f"{name} must lie in [0, {hi}) (the rows of {table}), got values from {lo_v} to {hi_v}")


def check_no_overlap(op, name, t):
    """``t`` has no two elements at one address (a stride-0, expanded dim): an op that
    writes it in place would race with itself."""
    dim = next((d for d in range(t.dim()) if t.stride(d) == 0 and t.shape[d] > 1), None)
    check(op, dim is None, lambda: f"{name} is written in place but its dim {dim} has stride 0 (an expanded view, "
                                   "whose elements share memory); pass a tensor of its own")


def check_max_seqlen(op, max_seqlen):
    """max_seqlen as a non-negative int (the longest sequence)."""
    check(op, hasattr(max_seqlen, "__index__") and not isinstance(max_seqlen, bool) and int(max_seqlen) >= 0,
          lambda: f"max_seqlen must be a non-negative int (the longest sequence), got {max_seqlen!r}")
    return int(max_seqlen)


def window_bounds(op, window, unbounded):
    """(left, right, has_window) from None or (left, right) ints, -1 meaning unbounded
    (given as ``unbounded`` tokens to the kernel)."""
    if window is None:
        return unbounded, unbounded, False
    check(op, isinstance(window, (tuple, list)) and len(window) == 2
          and all(hasattr(w, "__index__") and not isinstance(w, bool) for w in window),
          lambda: f"window must be None or (left, right) ints, got {window!r}")
    left, right = (int(w) if w >= 0 else unbounded for w in window)
    return left, right, left < unbounded or right < unbounded


def check_softcap(op, softcap):
    """softcap as the kernel's constant: None -> 0.0 (off), else a positive finite float."""
    if softcap is None:
        return 0.0
    check(op, isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and 0 < softcap < float("inf"),
          lambda: f"softcap must be None or a positive number, got {softcap!r}")
    return float(softcap)


def rotary_inputs(op, q, k, positions, cos_sin):
    """Checks q (T, Hq, D) and k (T, Hkv, D) of one float dtype and device, positions
    (T,) int64/int32 contiguous, cos_sin (max_pos, R) float with R even in [2, D] and a
    contiguous last dim. Returns (T, Hq, D, R)."""
    for name, t in (("q", q), ("k", k)):
        check_float(op, name, t, 3, "(T, H, D)")
        check(op, t.device == q.device, lambda: f"{name} is on {t.device}, expected q's device {q.device}")
    T, Hq, D = q.shape
    check(op, k.shape[0] == T and k.shape[2] == D,
          lambda: f"k must be (T={T}, Hkv, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    check(op, k.dtype == q.dtype, lambda: f"q and k must share a dtype, got q {q.dtype} k {k.dtype}")
    check(op, isinstance(positions, torch.Tensor) and positions.shape == (T,),
          lambda: f"positions must be ({T},), got {getattr(positions, 'shape', type(positions))}")
    check(op, positions.dtype in (torch.int64, torch.int32),
          lambda: f"positions.dtype must be int64 or int32, got {positions.dtype}")
    check(op, positions.device == q.device, lambda: f"positions is on {positions.device}, expected {q.device}")
    check(op, positions.is_contiguous(), "positions must be contiguous")
    check(op, isinstance(cos_sin, torch.Tensor) and cos_sin.dim() == 2,
          lambda: f"cos_sin must be a 2-D tensor (max_pos, R), got {getattr(cos_sin, 'shape', type(cos_sin))}")
    R = cos_sin.shape[1]
    check(op, R % 2 == 0 and 2 <= R <= D, lambda: f"cos_sin width R must be even and in [2, D={D}], got {R}")
    check(op, cos_sin.dtype in DTYPES, lambda: f"cos_sin.dtype must be a float type, got {cos_sin.dtype}")
    check(op, cos_sin.device == q.device, lambda: f"cos_sin is on {cos_sin.device}, expected {q.device}")
    check(op, cos_sin.stride(1) == 1,
          lambda: f"cos_sin must be contiguous in its last dim, got {tuple(cos_sin.stride())}")
    check_tile_span(op, 1, ("q", q), ("k", k))
    check_no_overlap(op, "q", q)
    check_no_overlap(op, "k", k)
    check_index_range(op, "positions", positions, cos_sin.shape[0], "cos_sin")
    return T, Hq, D, R



def rows_aligned(*tensors):
    """Whether the kernels should be told that every token and head stride of these
    (T, H, D) tensors is a multiple of 8 elements (so that, from a 16-byte aligned base,
    each row starts 16-byte aligned): True when all are positive multiples of 8 and some is
    not a multiple of 16. Triton marks only integer arguments divisible by 16 itself, so a
    head stride of 72 (SigLIP's) left it no proof of alignment, and it split every load into
    2-byte pieces (sm_90 PTX: 128 ld.global.b16 per thread where head_dim 64 takes 16-byte
    cp.async). Strides that are all multiples of 16 need no hint and get none, which keeps
    those kernels as they were measured."""
    strides = [s for t in tensors for s in t.stride()[:2]]
    return rows_16b(*tensors) and any(s % 16 for s in strides)


def rows_16b(*tensors):
    """Whether every token and head stride of these (T, H, D) tensors is a positive
    multiple of 8 elements: the kernels then load whole 16-byte pieces (with the hint of
    rows_aligned where Triton cannot see it), and padded head dims take the same tiles as
    unpadded ones."""
    return all(s > 0 and s % 8 == 0 for t in tensors for s in t.stride()[:2])
