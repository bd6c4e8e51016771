"""Shared by the op tests: independent float64 computations (loops per sequence, no
packing tricks), ragged-batch builders and a comparison that says where it failed."""
import math

import torch

# (dtype, atol, rtol) per comparison kind.
FP32 = (torch.float32, 2e-5, 1e-5)
FP16 = (torch.float16, 3e-3, 3e-3)


def cu_seqlens(lens, device="cpu"):
    """(B+1,) int32 offsets (0, l0, l0+l1, ...)."""
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return cu.to(device)


def positions(lens, device="cpu"):
    """(T,) int64 positions restarting at 0 for every sequence."""
    if not lens:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat([torch.arange(n, dtype=torch.int64) for n in lens]).to(device)


def spans(lens):
    """(start, length) of each sequence in the packed layout."""
    out, start = [], 0
    for n in lens:
        out.append((start, n))
        start += n
    return out


def assert_close(actual, expected, tol, what=""):
    """tol: (atol, rtol) or (dtype, atol, rtol). Reports unwritten (NaN) outputs, the
    number of mismatches, the max abs diff and where it is, with both values."""
    atol, rtol = tol[-2], tol[-1]
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return
    nan = torch.isnan(a) & ~torch.isnan(e)
    if nan.any():
        first = tuple(torch.unravel_index(nan.flatten().nonzero()[0, 0], a.shape))
        raise AssertionError(f"{what}: {int(nan.sum())} of {a.numel()} outputs are NaN where the "
                             f"expected value is not (never written?); first at index {tuple(int(i) for i in first)}")
    diff = (a - e).abs().nan_to_num(0.0)
    bad = diff > atol + rtol * e.abs().nan_to_num(0.0)
    bad |= torch.isnan(e) != torch.isnan(a)
    if bad.any():
        worst = tuple(int(i) for i in torch.unravel_index(diff.flatten().argmax(), a.shape))
        first = tuple(int(i) for i in torch.unravel_index(bad.flatten().nonzero()[0, 0], a.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ beyond atol={atol} rtol={rtol}; "
            f"max abs diff {diff.max().item():.4g} at index {worst} (got {a[worst].item():.6g}, "
            f"expected {e[worst].item():.6g}); first mismatch at {first} "
            f"(got {a[first].item():.6g}, expected {e[first].item():.6g})")


def attention64(q, k, v, lens, causal=False, scale=None, window=None, softcap=None):
    """Attention per sequence and head in float64 with an explicit mask; the kv head of
    query head h is h // (Hq // Hkv); softcap: scores c * tanh(s / c). Returns (T, Hq, D)
    float64."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    for start, n in spans(lens):
        if n == 0:
            continue
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        allowed = torch.ones(n, n, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if window is not None:
            left, right = window
            if left >= 0:
                allowed &= j >= i - left
            if right >= 0:
                allowed &= j <= i + right
        for h in range(Hq):
            qs = q[start:start + n, h].double()
            ks = k[start:start + n, h // group].double()
            vs = v[start:start + n, h // group].double()
            s = qs @ ks.T * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~allowed, float("-inf"))
            out[start:start + n, h] = torch.softmax(s, dim=-1) @ vs
    return out


def gather64(hidden, lens, pooling):
    rows = []
    for start, n in spans(lens):
        seq = hidden[start:start + n].double()
        rows.append({"cls": lambda: seq[0], "last": lambda: seq[-1], "mean": lambda: seq.mean(0)}[pooling]())
    return torch.stack(rows)


def layer_norm64(x, weight, bias, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight.double()
    return y if bias is None else y + bias.double()


def rms_norm64(x, weight, eps, offset=0.0):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (weight.double() + offset)


def activation64(logits, kind, bias=None, scale=None):
    x = logits.double()
    if bias is not None:
        x = x - (bias.double() if isinstance(bias, torch.Tensor) else bias)
    if scale is not None:
        x = x * (scale.double() if isinstance(scale, torch.Tensor) else scale)
    if kind == "softmax":
        e = torch.exp(x - x.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)
    if kind == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-x))
    return x


def rotary64(x, pos, cos_sin, neox):
    """x: (T, H, D) rotated on its first R features, R = cos_sin.shape[1]."""
    x = x.double().clone()
    R = cos_sin.shape[1]
    half = R // 2
    for t in range(x.shape[0]):
        c = cos_sin[pos[t], :half].double()
        s = cos_sin[pos[t], half:].double()
        for j in range(half):
            a, b = (j, j + half) if neox else (2 * j, 2 * j + 1)
            x1, x2 = x[t, :, a].clone(), x[t, :, b].clone()
            x[t, :, a] = x1 * c[j] - x2 * s[j]
            x[t, :, b] = x2 * c[j] + x1 * s[j]
    return x


def gated64(x, kind):
    x = x.double()
    gate, up = x.chunk(2, dim=-1)
    if kind == "silu":
        a = gate / (1.0 + torch.exp(-gate))
    elif kind == "gelu_tanh":
        a = 0.5 * gate * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate ** 3)))
    else:
        a = gate.clone().apply_(lambda g: 0.5 * g * (1.0 + math.erf(g / math.sqrt(2.0))))
    return a * up
