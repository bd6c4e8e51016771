"""The op surface: torch references and the one backend registry.

Every op has a torch reference here (runs on CPU and CUDA). Faster versions live in
``pyengine.kernels`` (Triton, one op per file) and ``pyengine.cuda_ops`` (the CUDA
extension). ``resolve_ops(backend, device)`` returns an :class:`Ops` namespace with one
callable per op; a model holds it and calls ``self.ops.<name>(...)``. Nothing is swapped
at import time.

Choice per op: ``cuda`` > ``triton`` > ``torch`` by availability on the device, unless a
backend is named (``LLM(kernel_backend=...)`` or ``PYENGINE_KERNEL_BACKEND``); a named
backend is used for every op it implements and torch for the rest.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kernels import _validate as _v

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "PYENGINE_KERNEL_BACKEND"


# ----------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------

def _attn_mask(q_pos, k_pos, k_len, causal, window):
    """(n, 1, Lq, Lk) bool: keys inside their sequence, and inside the causal/window
    band relative to each query's position. q_pos: (n, Lq); k_pos: (Lk,); k_len: (n,)."""
    rel = k_pos[None, None, :] - q_pos[:, :, None]  # key - query
    mask = (k_pos[None, None, :] < k_len[:, None, None]).expand_as(rel)
    if causal:
        mask = mask & (rel <= 0)
    if window is not None:
        left, right = window
        if left >= 0:
            mask = mask & (rel >= -left)
        if right >= 0:
            mask = mask & (rel <= right)
    return mask.unsqueeze(1)


def _length_groups(lens, max_tokens=16384, slack=1.25):
    """Cut sequence indices, sorted by length, into groups whose padded attention work
    (n * longest^2) stays within ``slack`` of the exact work (sum of length^2)."""
    order = sorted(range(len(lens)), key=lens.__getitem__)
    groups, cur, sq = [], [], 0
    for i in order:
        n = lens[i]
        if cur and (n * n * (len(cur) + 1) > slack * (sq + n * n) or n * (len(cur) + 1) > max_tokens):
            groups.append(cur)
            cur, sq = [], 0
        cur.append(i)
        sq += n * n
    if cur:
        groups.append(cur)
    return groups


def _band(L, causal, window, device):
    """(L, L) bool: which keys each query of one sequence may see, or None when it sees
    all of them."""
    if not causal and window is None:
        return None
    ar = torch.arange(L, device=device)
    return _attn_mask(ar[None], ar, torch.tensor([L], device=device), causal, window)[0, 0]


def _capped_attention(q, k, v, allowed, scale, softcap):
    """Attention with soft-capped scores, softcap * tanh(s / softcap), which no fused
    kernel of torch's takes. q: (n, Hq, Lq, D); k, v: (n, Hkv, L, D); allowed: bool
    broadcastable to (n, Hq, Lq, L), or None. Returns (n, Hq, Lq, D) in q's dtype."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(g, dim=1) if g > 1 else x for x in (k, v))
    s = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
    s = softcap * torch.tanh(s / softcap)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1))  # a query that sees no key: zeros
    return torch.matmul(p, v.float()).to(q.dtype)


# Scores one CPU matmul may hold (n * Hq * L * L floats): a run of like-length
# sequences is cut into chunks of this size.
_CPU_SCORES = 1 << 24


def _same_length(q, k, v, n, causal, scale, window, softcap=None):
    """Exact attention of n sequences of one length packed back to back, on the CPU.
    q: (n * L, Hq, D); k, v: (n * L, Hkv, D). Returns (n * L, Hq, D) in q's dtype.

    Up to 1024 tokens the scores are materialised and two batched matmuls do the work
    (faster on CPU than the fused kernel at these sizes); the query heads that share a
    kv head are stacked into one matmul, so k and v are never repeated. Longer
    sequences take the fused kernel, whose memory does not grow with L^2."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    L, g = T // n, Hq // Hkv
    if softcap:
        o = _capped_attention(*(x.view(n, L, -1, D).transpose(1, 2) for x in (q, k, v)),
                              _band(L, causal, window, q.device), scale, softcap)
        return o.transpose(1, 2).reshape(T, Hq, D)
    if L > 1024:
        band = _band(L, causal, window, q.device) if window is not None else None
        o = F.scaled_dot_product_attention(*(x.view(n, L, -1, D).transpose(1, 2) for x in (q, k, v)),
                                           attn_mask=band, scale=scale, is_causal=causal and band is None,
                                           enable_gqa=g > 1)
        return o.transpose(1, 2).reshape(T, Hq, D)
    qg = q.view(n, L, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(n * Hkv, g * L, D)
    kt = k.view(n, L, Hkv, D).permute(0, 2, 3, 1).reshape(n * Hkv, D, L)
    s = torch.bmm(qg.float() * scale, kt.float())  # (n * Hkv, g * L, L)
    allowed = _band(L, causal, window, q.device)
    if allowed is not None:
        s.view(n * Hkv, g, L, L).masked_fill_(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.bmm(p, v.view(n, L, Hkv, D).transpose(1, 2).reshape(n * Hkv, L, D).float())  # (n * Hkv, g * L, D)
    return o.view(n, Hkv, g, L, D).permute(0, 3, 1, 2, 4).reshape(T, Hq, D).to(q.dtype)


def _host_cu(op, cu_seqlens, T):
    """cu_seqlens as a host list, checked: 1-D, from 0 up to T, never decreasing (a
    reference that reads it on the host checks it there for free)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D (B+1,) tensor, got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    bad = next((i for i in range(len(cu) - 1) if cu[i + 1] < cu[i]), None)
    if cu[0] != 0 or cu[-1] != T or bad is not None:
        why = (f"starts at {cu[0]}, not 0" if cu[0] != 0 else f"ends at {cu[-1]}, not T={T}" if cu[-1] != T
               else f"decreases at entry {bad + 1}")
        raise ValueError(f"{op}: cu_seqlens {why}; it must run from 0 to T without decreasing")
    return cu


def _attention_inputs(op, q, k, v, rows_of_q):
    """The reference's own checks of q (·, Hq, D), k and v (T, Hkv, D): one float dtype
    (float64 too: tests use the reference as a float64 oracle), shapes that agree (T = q's
    rows where rows_of_q), Hkv dividing Hq, as the Triton launchers check them."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _v.check(op, isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point(),
                 lambda: f"{name} must be a floating-point (·, H, D) tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    _v.check(op, k.dtype == q.dtype == v.dtype, lambda: f"q, k, v must share a dtype, got {q.dtype} {k.dtype} {v.dtype}")
    T = q.shape[0] if rows_of_q else k.shape[0]
    _v.check(op, k.shape == v.shape and k.shape[0] == T and k.shape[2] == q.shape[2],
             lambda: f"k and v must be (T={T}, Hkv, D={q.shape[2]}), got k {tuple(k.shape)} v {tuple(v.shape)}")
    _v.check(op, k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0,
             lambda: f"Hq ({q.shape[1]}) must be a multiple of Hkv ({k.shape[1]})")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, scale=None, window=None, softcap=None):
    """Attention within each packed sequence.

    q: (T, Hq, D); k, v: (T, Hkv, D) with Hq % Hkv == 0; cu_seqlens: (B+1,) int32;
    max_seqlen: int; window: None or (left, right) tokens visible on each side (-1 = all);
    softcap: None, or c > 0 for scores c * tanh(s / c) (Gemma 2).
    Returns (T, Hq, D) in q's dtype. Sequences never attend to each other. On the CPU
    each run of like-length sequences is computed on views of its rows (no copies, no
    padding); on a GPU,
    sequences of like length are gathered into small padded groups (few launches), keys
    masked past each sequence's end, and a group of equal lengths needs no mask.
    """
    _attention_inputs("varlen_attention", q, k, v, rows_of_q=True)
    max_seqlen = _v.check_max_seqlen("varlen_attention", max_seqlen)
    softcap = _v.check_softcap("varlen_attention", softcap) or None
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cu = _host_cu("varlen_attention", cu_seqlens, T)
    out = torch.empty_like(q)
    if q.device.type == "cpu":
        # Sequences of one length go through one batched matmul (a chunk of at most
        # _CPU_SCORES scores) each: on views of the packed rows where they sit back to
        # back (the scheduler sorts by length; image tiles are all one length), else
        # gathered (the windows of Qwen2.5-VL's tower repeat a few lengths frame after
        # frame; a matmul per short run cost more than the copies).
        by_len = {}
        for i in range(len(cu) - 1):
            by_len.setdefault(cu[i + 1] - cu[i], []).append(i)
        for L, seqs in by_len.items():
            if L == 0:
                continue
            most = max(1, _CPU_SCORES // max(1, Hq * L * L))
            for c in range(0, len(seqs), most):
                part = seqs[c:c + most]
                a, b = cu[part[0]], cu[part[-1]] + L
                if b - a == L * len(part):  # back to back
                    out[a:b] = _same_length(q[a:b], k[a:b], v[a:b], len(part), causal, scale, window, softcap)
                    continue
                rows = (torch.tensor([cu[i] for i in part])[:, None] + torch.arange(L)).flatten()
                out[rows] = _same_length(q[rows], k[rows], v[rows], len(part), causal, scale, window, softcap)
        return out
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    dev = q.device
    for group in _length_groups(lens):
        L = max(lens[i] for i in group)
        starts = torch.tensor([cu[i] for i in group], device=dev)
        glens = torch.tensor([lens[i] for i in group], device=dev)
        ar = torch.arange(L, device=dev)
        # Padded slots read token 0 and are masked out; they are never written back.
        idx = torch.where(ar[None] < glens[:, None], starts[:, None] + ar[None], 0)  # (n, L)
        qg, kg, vg = (x[idx].transpose(1, 2) for x in (q, k, v))  # (n, H, L, D)
        uniform = all(lens[i] == L for i in group)
        mask = None
        if not uniform or window is not None or (softcap and causal):
            mask = _attn_mask(ar[None].expand(len(group), L), ar, glens, causal, window)
        if softcap:
            o = _capped_attention(qg, kg, vg, mask, scale, softcap)
        else:
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale,
                                               is_causal=causal and mask is None, enable_gqa=Hq != Hkv)
        valid = ar[None] < glens[:, None]
        out[idx[valid]] = o.transpose(1, 2)[valid]
    return out


def pooled_query_attention(q, k, v, cu_seqlens, max_seqlen, q_pos, causal=False, scale=None, window=None,
                           softcap=None):
    """Attention for one query row per sequence against all of that sequence's keys:
    the last layer of a model that pools one token needs nothing else.

    q: (B, Hq, D); k, v: (T, Hkv, D); cu_seqlens: (B+1,) int32; max_seqlen: int;
    q_pos: (B,) int64, the query's position inside its sequence (0 for CLS, len-1 for
    the last token); softcap: as in varlen_attention. Returns (B, Hq, D) in q's dtype."""
    _attention_inputs("pooled_query_attention", q, k, v, rows_of_q=False)
    softcap = _v.check_softcap("pooled_query_attention", softcap) or None
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    S = _v.check_max_seqlen("pooled_query_attention", max_seqlen)
    if cu_seqlens.device.type == "cpu":  # free to check here (on a GPU: the caller's promise)
        cu = _host_cu("pooled_query_attention", cu_seqlens, k.shape[0])
        S = max([S] + [b - a for a, b in zip(cu[:-1], cu[1:])])  # a short max_seqlen would drop keys
    starts = cu_seqlens[:-1].long()
    lens = cu_seqlens[1:].long() - starts
    ar = torch.arange(S, device=q.device)
    idx = torch.where(ar[None] < lens[:, None], starts[:, None] + ar[None], 0)  # (B, S)
    kg, vg = k[idx].transpose(1, 2), v[idx].transpose(1, 2)  # (B, Hkv, S, D)
    mask = _attn_mask(q_pos.long()[:, None], ar, lens, causal, window)  # (B, 1, 1, S)
    if softcap:
        return _capped_attention(q[:, :, None], kg, vg, mask, scale, softcap)[:, :, 0]
    o = F.scaled_dot_product_attention(q[:, :, None], kg, vg, attn_mask=mask, scale=scale,
                                       enable_gqa=Hq != Hkv)
    return o[:, :, 0]


def gather_pooled(hidden, cu_seqlens, pooling):
    """One row per sequence. hidden: (T, H); cu_seqlens: (B+1,) int32;
    pooling: "cls" (first token), "last" (true last token) or "mean". Returns (B, H).
    An empty sequence's row is NaN whatever the pooling (mean's 0 / 0)."""
    if cu_seqlens.device.type == "cpu":  # free to check here (on a GPU: the caller's promise)
        _host_cu("gather_pooled", cu_seqlens, hidden.shape[0])
    if pooling in ("cls", "last"):
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        rows = starts if pooling == "cls" else ends - 1
        if hidden.shape[0] == 0:
            return hidden.new_full((rows.numel(), hidden.shape[1]), float("nan"))
        picked = hidden[rows.clamp(0, hidden.shape[0] - 1)]
        return torch.where((ends > starts)[:, None], picked, torch.full_like(picked, float("nan")))
    if pooling == "mean":
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_id = torch.repeat_interleave(
            torch.arange(lens.numel(), device=hidden.device), lens, output_size=hidden.shape[0])
        out = torch.zeros(lens.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        out.index_add_(0, seq_id, hidden.float())
        return (out / lens[:, None]).to(hidden.dtype)
    raise ValueError(f"unknown pooling {pooling!r}; expected 'cls', 'last' or 'mean'")


def activation(logits, kind, logit_bias=None, logit_scale=None):
    """act((logits - logit_bias) * logit_scale) in fp32. logits: (B, L);
    kind: "softmax" | "sigmoid" | "identity". Returns (B, L) fp32."""
    x = logits.float()
    if logit_bias is not None:
        x = x - logit_bias
    if logit_scale is not None:
        x = x * logit_scale
    if kind == "softmax":
        return torch.softmax(x, dim=-1)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "identity":
        return x
    raise ValueError(f"unknown activation {kind!r}; expected softmax, sigmoid or identity")


def add_layer_norm(x, residual, weight, bias, eps):
    """LayerNorm(x + residual) over the last dim, statistics in fp32.
    x, residual: (T, H) (residual may be None); weight, bias: (H,).
    Returns (normed, summed), both (T, H) in x's dtype."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s.float(), (s.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return y.to(x.dtype), s


def add_rms_norm(x, residual, weight, eps, offset=0.0):
    """RMSNorm(x + residual) * (weight + offset) (offset=1 for Gemma), fp32 statistics.
    Returns (normed, summed), both (T, H) in x's dtype."""
    s = x if residual is None else x + residual
    sf = s.float()
    y = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + offset)
    return y.to(x.dtype), s


def rotary(q, k, positions, cos_sin, neox=True):
    """Rotary embedding on packed positions, in place on q (T, Hq, D) and k (T, Hkv, D).
    positions: (T,) int64, restarting at 0 per sequence; cos_sin: (max_pos, R) fp32 with
    cos in the first R/2 columns and sin in the last R/2, R <= D the rotated width.
    neox=True rotates halves (Llama/Qwen); False rotates interleaved pairs (GPT-J)."""
    _rotary_inputs("rotary", q, k, positions, cos_sin)
    return _rotate(q, k, positions, cos_sin, neox)


def _rotary_inputs(op, q, k, positions, cos_sin):
    """What the in-place rotary references refuse before writing anything: q or k whose
    tokens share memory, positions outside cos_sin's rows (-1 would wrap to the last)."""
    for name, x in (("q", q), ("k", k)):
        _v.check_no_overlap(op, name, x)
    _v.check_index_range(op, "positions", positions, cos_sin.shape[0], "cos_sin")


def _rotate(q, k, positions, cos_sin, neox):
    R = cos_sin.shape[1]
    cos, sin = cos_sin[positions].chunk(2, dim=-1)  # (T, R/2)
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (q, k):
        xr = x[..., :R].float()
        if neox:
            x1, x2 = xr.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        x[..., :R] = out.to(x.dtype)
    return q, k


def qk_norm_rotary(q, k, q_weight, k_weight, positions, cos_sin, eps, offset=0.0, neox=True):
    """Per-head RMSNorm of q and k (Qwen3's q_norm/k_norm), then rotary, in place on both.
    q: (T, Hq, D); k: (T, Hkv, D), same float dtype (views of a fused qkv tensor work);
    q_weight, k_weight: (D,); eps, offset: as in add_rms_norm (each head normed over D in
    fp32 and rounded to q's dtype); positions, cos_sin, neox: as in rotary. Returns (q, k)."""
    _rotary_inputs("qk_norm_rotary", q, k, positions, cos_sin)  # before q changes
    q.copy_(add_rms_norm(q, None, q_weight, eps, offset)[0])
    k.copy_(add_rms_norm(k, None, k_weight, eps, offset)[0])
    return _rotate(q, k, positions, cos_sin, neox)


def gated_act(x, kind):
    """act(gate) * up for x: (T, 2I) = [gate | up]; kind: "silu" (SwiGLU) or
    "gelu_tanh" (GeGLU as Gemma). Returns (T, I)."""
    gate, up = x.chunk(2, dim=-1)
    if kind == "silu":
        return F.silu(gate) * up
    if kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if kind == "gelu":
        return F.gelu(gate) * up
    raise ValueError(f"unknown gated activation {kind!r}")


def expert_matmul(x, w, experts, weights=None, per_pair=False):
    """Mixture-of-experts matmul: pair p (token p // k, slot p % k) -> x[row] @ w[e]^T
    (times weights[token, slot] where given), e = experts[token, slot]. x: (T, K), or
    with per_pair (T * k, K); w: (E, N, K); experts, weights: (T, k). Returns (T * k, N).
    One matmul per expert over its pairs, sorted by expert (reads the counts on the host)."""
    _v.check("expert_matmul", experts.dtype in (torch.int32, torch.int64),
             lambda: f"experts must be an int32/int64 tensor (T, k), got {experts.dtype}")
    _v.check_index_range("expert_matmul", "experts", experts, w.shape[0], "w")
    T, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w.shape[0]).tolist()
    rows = x[order if per_pair else order // k]
    out = torch.empty(T * k, w.shape[1], dtype=x.dtype, device=x.device)
    at = 0
    for e, n in enumerate(counts):
        if n:
            y = F.linear(rows[at:at + n], w[e])
            if weights is not None:
                y = (y.float() * weights.reshape(-1)[order[at:at + n], None].float()).to(x.dtype)
            out[order[at:at + n]] = y
            at += n
    return out


def embed_layer_norm(input_ids, positions, token_type_ids, word, pos, type_, weight, bias, eps,
                     extra=None):
    """BERT embeddings: LayerNorm(word[ids] + pos[positions] + type[token_type_ids] (+ extra)).
    input_ids, positions, token_type_ids: (T,) int64; word: (V, H); pos: (P, H);
    type_: (TT, H) or None; extra: (H,) or None (Ernie's task-type row). Returns (T, H)."""
    for name, ids, table, tname in (("input_ids", input_ids, word, "word"), ("positions", positions, pos, "pos"),
                                    ("token_type_ids", token_type_ids, type_, "type_")):
        if table is not None:
            _v.check_index_range("embed_layer_norm", name, ids, table.shape[0], tname)
    x = F.embedding(input_ids, word) + F.embedding(positions, pos)
    if type_ is not None:
        x = x + F.embedding(token_type_ids, type_)
    if extra is not None:
        x = x + extra
    return add_layer_norm(x, None, weight, bias, eps)[0]


def pooled_norm(hidden, cu_seqlens, pooling, norm_kind, weight, bias, eps, offset=0.0, residual=None):
    """One pooled row per sequence through the model's final norm, in fp32: the input of
    the fp32 head. hidden: (T, H); cu_seqlens: (B+1,) int32; pooling: "cls" | "last" |
    "mean"; norm_kind: None | "layer" | "rms"; weight: (H,) (unused when norm_kind is
    None); bias: (H,) or None ("layer" only); eps: float; offset: float added to the
    weight for "rms" (1 for Gemma); residual: (T, H) or None, the last layer's pending
    residual add, summed in hidden's dtype first (as add_*_norm do).

    The norm is per token, so "cls" and "last" norm only the B pooled rows; "mean"
    averages the normed tokens (the same as norming every token and then pooling).
    Nothing is rounded back to hidden's dtype. Returns (B, H) fp32."""
    s = hidden if residual is None else hidden + residual
    H = s.shape[-1]

    def norm(x):
        if norm_kind is None:
            return x
        if norm_kind == "layer":
            return F.layer_norm(x, (H,), weight.float(), None if bias is None else bias.float(), eps)
        if norm_kind == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + offset)
        raise ValueError(f"unknown norm_kind {norm_kind!r}; expected None, 'layer' or 'rms'")

    if pooling in ("cls", "last"):
        return norm(gather_pooled(s, cu_seqlens, pooling).float())
    if pooling == "mean":
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_id = torch.repeat_interleave(
            torch.arange(lens.numel(), device=s.device), lens, output_size=s.shape[0])
        out = torch.zeros(lens.numel(), H, dtype=torch.float32, device=s.device)
        out.index_add_(0, seq_id, norm(s.float()))
        return out / lens[:, None]
    raise ValueError(f"unknown pooling {pooling!r}; expected 'cls', 'last' or 'mean'")


def causal_conv1d(x, weight, bias, positions, activation=None):
    """Depthwise causal convolution within each packed sequence (Mamba's conv).
    x: (T, C); weight: (C, K) (tap K-1 multiplies the current token); bias: (C,) or
    None; positions: (T,) int64 restarting at 0 per sequence, so no tap reaches back
    past its sequence's first token; activation: None or "silu". Returns (T, C) in x's
    dtype, computed in fp32."""
    K = weight.shape[1]
    xf, w = x.float(), weight.float()
    out = xf * w[:, K - 1]
    for j in range(1, min(K, x.shape[0])):  # tap K-1-j reads the token j steps back
        back = F.pad(xf[:-j], (0, 0, j, 0))
        out = out + back * w[:, K - 1 - j] * (positions >= j)[:, None]
    if bias is not None:
        out = out + bias.float()
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"unknown conv activation {activation!r}; expected None or 'silu'")
    return out.to(x.dtype)


def selective_scan(x, dt, A, B, C, D, z, dt_bias, cu_seqlens, max_seqlen):
    """Mamba's selective scan over packed sequences; the state is zero before each
    sequence's first token. x, dt, z: (T, Ci); A: (Ci, N), negative; B, C: (T, N);
    D, dt_bias: (Ci,); cu_seqlens: (B+1,) int32; max_seqlen: int.
    With d = softplus(dt + dt_bias): h_t = exp(d_t A) h_{t-1} + d_t B_t x_t,
    y_t = (C_t . h_t + D x_t) * silu(z_t), in fp32. Returns (T, Ci) in x's dtype."""
    T, Ci = x.shape
    cu = _host_cu("selective_scan", cu_seqlens, T)
    starts, lens = torch.tensor(cu[:-1]), [b - a for a, b in zip(cu[:-1], cu[1:])]
    # Longest first: the sequences still running at step s are a prefix of this order.
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    starts = starts[order].to(x.device)
    sorted_lens = [lens[i] for i in order]
    d = F.softplus(dt.float() + dt_bias.float())
    xf, Af, Bf, Cf = x.float(), A.float(), B.float(), C.float()
    h = torch.zeros(len(lens), Ci, A.shape[1], dtype=torch.float32, device=x.device)
    y = torch.empty(T, Ci, dtype=torch.float32, device=x.device)
    n = len(lens)
    for step in range(max(lens, default=0)):  # the lengths are on the host: max_seqlen is not needed
        while n and sorted_lens[n - 1] <= step:
            n -= 1
        rows = starts[:n] + step
        dr = d[rows]
        h[:n] = torch.exp(dr[:, :, None] * Af) * h[:n] + (dr * xf[rows])[:, :, None] * Bf[rows][:, None, :]
        y[rows] = (h[:n] @ Cf[rows][:, :, None])[:, :, 0]
    y = (y + xf * D.float()) * F.silu(z.float())
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------

OP_NAMES = ("varlen_attention", "pooled_query_attention", "gather_pooled", "activation", "add_layer_norm",
            "add_rms_norm", "rotary", "qk_norm_rotary", "gated_act", "embed_layer_norm", "pooled_norm",
            "causal_conv1d", "selective_scan", "expert_matmul")

# Where the faster versions live: "module:function". A module that is missing or fails
# to import (no triton, no built extension) simply makes that backend unavailable.
_TRITON = {name: f"pyengine.kernels.{name}:{name}" for name in OP_NAMES}
_CUDA = {name: f"pyengine.cuda_ops:{name}" for name in OP_NAMES}
_IMPLS = {"triton": _TRITON, "cuda": _CUDA}
# Torch references that copy cu_seqlens to the host (a sync, and no CUDA graph capture).
_HOST_READS = ("varlen_attention", "selective_scan", "expert_matmul")


def _load(spec):
    mod, fn = spec.split(":")
    try:
        return getattr(importlib.import_module(mod), fn, None)
    except ImportError:
        return None


def _available(backend, device):
    if backend == "torch":
        return True
    if backend == "cuda":
        if device.type != "cuda":
            return False
        try:
            importlib.import_module("pyengine._C")
        except ImportError:
            return False
        return True
    if backend == "triton":
        try:
            importlib.import_module("triton")
        except ImportError:
            return False
        # On CPU Triton only runs in interpreter mode, which is for tests, not speed.
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS} or 'auto'")


@dataclass
class Ops:
    """One callable per op, resolved for a device; ``chosen[name]`` says which backend."""
    backend: str
    chosen: dict = field(default_factory=dict)

    def describe(self):
        return ", ".join(f"{k}={v}" for k, v in self.chosen.items())

    def capturable(self, names) -> bool:
        """Whether a forward that calls the ops ``names`` can be captured in a CUDA graph:
        none of them runs a torch reference that reads ``cu_seqlens`` on the host."""
        return not any(self.chosen.get(name) == "torch" for name in names if name in _HOST_READS)


def resolve_ops(backend="auto", device="cpu"):
    """Resolve every op for ``device``. backend: "auto" | "cuda" | "triton" | "torch";
    "auto" reads PYENGINE_KERNEL_BACKEND first. A named backend that cannot run on the
    device is an error, not a silent fallback; its missing ops fall back to torch, except
    that "cuda" takes Triton before torch (so "cuda" on a GPU is the same as "auto")."""
    device = torch.device(device)
    if backend in (None, "auto"):
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS} or 'auto'")
    if backend == "auto":
        # The Triton interpreter is for tests: "auto" takes Triton only on a GPU.
        order = [b for b in BACKENDS
                 if _available(b, device) and (b != "triton" or device.type == "cuda")]
    else:
        if not _available(backend, device):
            why = {"cuda": "needs a CUDA device and the built extension pyengine._C",
                   "triton": "needs triton, and a CUDA device or TRITON_INTERPRET=1"}[backend]
            raise RuntimeError(f"kernel backend {backend!r} is not available on {device}: {why}")
        # "cuda" means the CUDA ops first: the ops it has no CUDA version of (attention,
        # the gated MLP, embeddings) run in Triton where it can, rather than in torch.
        order = [backend, "torch"]
        if backend == "cuda" and _available("triton", device):
            order = ["cuda", "triton", "torch"]
    ops = Ops(backend=backend)
    for name in OP_NAMES:
        for b in order:
            fn = globals()[name] if b == "torch" else _load(_IMPLS[b][name])
            if fn is not None:
                setattr(ops, name, fn)
                ops.chosen[name] = b
                break
    return ops
