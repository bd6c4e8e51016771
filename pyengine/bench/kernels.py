"""Op microbenchmarks: every op, per available backend, against torch on realistic shapes.

``run(device=None, backends=None, quick=False, json_path=None) -> list[dict]`` times each
case and prints a table; ``main(argv)`` is its command line (``python -m pyengine.bench
kernels``). Backends come from ``pyengine.ops.resolve_ops(backend, device)``: a backend
is timed on an op only where it really implements it. Attention also gets two outside
baselines: SDPA over padded, length-sorted batches of 64 (what a careful transformers
user runs) and ``torch.nn.attention.varlen`` where this torch has it.

Shapes. On GPU, one ragged batch of DESIGN's "mixed" workload (2048 prompts, lengths
round(exp(N(ln 120, 0.8))) clipped to [8, 512], seed 0: about 325k tokens) in bf16:
bidirectional attention Hq=Hkv=12 D=64 (BERT-base), causal Hq=16 Hkv=8 D=128
(Qwen3-0.6B), causal Hq=12 Hkv=2 D=128 (Qwen2-1.5B), bidirectional Hq=Hkv=16 D=72 over
64 image tiles of 1024 patches (SigLIP-so400m); norms at hidden 1024; rotary and the
gated MLP of Qwen3-0.6B; BERT-base embeddings; pooling of 2048 rows. With quick=True (the
default on CPU) the same cases run on tiny shapes in fp32 within seconds.

Each row: ms (median over repeats, device synchronised), GB/s for memory-bound ops (the
bytes the op must move at least: inputs read once, outputs written once) and that as a
percentage of a measured device-to-device copy (``copy_bandwidth``), or TFLOP/s for
attention (useful FLOPs: 4 * D * Hq per visible query-key pair), the speedup over the
torch backend, and the max abs difference to torch's output.

Config sweeps (GPU): ``attention_sweep`` (``--attn-sweep``) times the attention tile
candidates; ``op_sweep`` (``--op-sweep``) times the launch-config candidates of the
memory-bound ops in SWEEP_CASES (each Triton module's SWEEP_CONFIGS, and
``pyengine.cuda_ops.SWEEP_CONFIGS`` where it has one) and prints the best per case.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pyengine import ops as ops_mod
from pyengine.bench.report import output_path_error, parse_device
from pyengine.kernels import _tuned, _validate as _v

BACKENDS = ("cuda", "triton", "torch")
REPEATS, QUICK_REPEATS = 20, 3  # default timed runs per case; quick mode is a fast check, not a measurement
EXTRA_BACKENDS = ("sdpa-padded", "torch-varlen")  # attention baselines outside the registry


# ----------------------------------------------------------------------------------------
# cases (shared with benchmarks/test_ops_bench.py)
# ----------------------------------------------------------------------------------------

@dataclass
class Case:
    op: str                       # op name in pyengine.ops
    name: str                     # stable id, the same in quick and full mode
    shape: str                    # human-readable shapes
    make: Callable[[], tuple]     # fresh arguments on the device (in-place ops need fresh ones)
    bytes: float = 0.0            # minimum bytes moved (memory-bound ops)
    flops: float = 0.0            # useful FLOPs (attention)
    attn: dict | None = None      # lens/causal/window for the attention baselines

    @property
    def id(self):
        return f"{self.op}/{self.name}"


def mixed_lengths(n=2048, seed=0, lo=8, hi=512):
    """DESIGN's "mixed" lengths: round(exp(N(ln 120, 0.8))) clipped to [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 0.8 + math.log(120)
    return x.exp().round().clamp(lo, hi).long().tolist()


def attention_pairs(lens, causal=False, window=None):
    """Number of (query, key) pairs attention must visit, summed over sequences."""
    total = 0
    left, right = (window if window is not None else (-1, -1))
    for n in set(lens):
        i = torch.arange(n)
        hi = torch.full((n,), n - 1) if not causal else i
        if right >= 0:
            hi = torch.minimum(hi, i + right)
        lo = torch.zeros(n, dtype=torch.long) if left < 0 else (i - left).clamp(min=0)
        total += int((hi - lo + 1).clamp(min=0).sum()) * lens.count(n)
    return total


def _cu(lens, device):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(device)


def _positions(lens, device):
    return torch.cat([torch.arange(n) for n in lens]).to(device)


def cases(device="cpu", quick=False):
    """The benchmark cases for a device; quick: tiny shapes (CPU, interpreter)."""
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    es = torch.finfo(dtype).bits // 8
    lens = [5, 17, 9, 30, 1] if quick else mixed_lengths()
    T, B = sum(lens), len(lens)
    H = 64 if quick else 1024
    Hb = 64 if quick else 768  # BERT-base width for the embeddings
    I = 96 if quick else 3072
    V = 100 if quick else 30522

    def rand(*shape, seed, dt=dtype):
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    out = []
    for name, Hq, Hkv, D, causal in (("bidir-mha", 12, 12, 64, False), ("causal-gqa2", 16, 8, 128, True),
                                     ("causal-gqa6", 12, 2, 128, True)):
        if quick:
            Hq, Hkv, D = Hq // 4 or 1, max(Hkv // 4, 1), 16 if D == 64 else 32
        pairs = attention_pairs(lens, causal)

        def make(Hq=Hq, Hkv=Hkv, D=D, causal=causal):
            return (rand(T, Hq, D, seed=1), rand(T, Hkv, D, seed=2), rand(T, Hkv, D, seed=3),
                    _cu(lens, device), max(lens), causal)
        out.append(Case("varlen_attention", name, f"T={T} B={B} Hq={Hq} Hkv={Hkv} D={D}", make,
                        bytes=2 * T * (Hq + Hkv) * D * es, flops=4.0 * D * Hq * pairs,
                        attn=dict(lens=lens, causal=causal, window=None, heads=(Hq, Hkv, D), dtype=dtype)))
    # SigLIP-so400m's image tiles: sequences of 1024 patches, 16 heads of 72 (off the
    # multiples of 16: padded inside, with config_for's CONFIGS_PADDED tiles).
    tiles, Hv, Dv = ([16] * 3, 2, 24) if quick else ([1024] * 64, 16, 72)
    Tv = sum(tiles)
    out.append(Case("varlen_attention", "vision-tiles", f"T={Tv} B={len(tiles)} Hq=Hkv={Hv} D={Dv}",
                    lambda: (rand(Tv, Hv, Dv, seed=1), rand(Tv, Hv, Dv, seed=2), rand(Tv, Hv, Dv, seed=3),
                             _cu(tiles, device), max(tiles), False),
                    bytes=2 * Tv * 2 * Hv * Dv * es, flops=4.0 * Dv * Hv * attention_pairs(tiles),
                    attn=dict(lens=tiles, causal=False, window=None, heads=(Hv, Hv, Dv), dtype=dtype)))
    Hq, Hkv, D, W = (2, 1, 16, 8) if quick else (8, 2, 64, 64)
    out.append(Case("varlen_attention", "sliding-window", f"T={T} window=({W},0) Hq={Hq} Hkv={Hkv} D={D}",
                    lambda: (rand(T, Hq, D, seed=1), rand(T, Hkv, D, seed=2), rand(T, Hkv, D, seed=3),
                             _cu(lens, device), max(lens), True, None, (W, 0)),
                    flops=4.0 * D * Hq * attention_pairs(lens, True, (W, 0)),
                    attn=dict(lens=lens, causal=True, window=(W, 0), heads=(Hq, Hkv, D), dtype=dtype)))
    out.append(Case("add_rms_norm", "residual", f"T={T} H={H}",
                    lambda: (rand(T, H, seed=4), rand(T, H, seed=5), rand(H, seed=6), 1e-6),
                    bytes=4 * T * H * es + H * es))
    out.append(Case("add_layer_norm", "residual", f"T={T} H={H}",
                    lambda: (rand(T, H, seed=4), rand(T, H, seed=5), rand(H, seed=6), rand(H, seed=7), 1e-5),
                    bytes=4 * T * H * es + 2 * H * es))
    Hq, Hkv, D = (4, 2, 32) if quick else (16, 8, 128)
    ang = rand(max(lens), D // 2, seed=8, dt=torch.float32)
    out.append(Case("rotary", "neox", f"T={T} Hq={Hq} Hkv={Hkv} D={D}",
                    lambda: (rand(T, Hq, D, seed=9), rand(T, Hkv, D, seed=10), _positions(lens, device),
                             torch.cat([ang.cos(), ang.sin()], 1), True),
                    # the cos / sin table's rows once (as many as the longest sequence), not per token
                    bytes=2 * T * (Hq + Hkv) * D * es + max(lens) * D * 4 + T * 8))
    # Qwen3's per-head q/k RMSNorm fused with rotary, in place on views of the qkv output.
    def make_qk(Hq=Hq, Hkv=Hkv, D=D):
        qkv = rand(T, Hq + 2 * Hkv, D, seed=23)
        return (qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], rand(D, seed=24), rand(D, seed=25), _positions(lens, device),
                torch.cat([ang.cos(), ang.sin()], 1), 1e-6)
    out.append(Case("qk_norm_rotary", "qwen3", f"T={T} Hq={Hq} Hkv={Hkv} D={D}", make_qk,
                    bytes=2 * T * (Hq + Hkv) * D * es + max(lens) * D * 4 + T * 8 + 2 * D * es))
    for kind in ("silu", "gelu"):
        out.append(Case("gated_act", kind, f"T={T} I={I}", lambda kind=kind: (rand(T, 2 * I, seed=11), kind),
                        bytes=3 * T * I * es))
    # Mixture-of-experts matmuls at Qwen3-30B-A3B's shapes (128 experts, top 8, H 2048,
    # I 768) over one batch of 16k tokens: [gate | up] over tokens, the weighted down over pairs.
    Tm, E, k, Hm, Im = (40, 4, 2, 64, 32) if quick else (16384, 128, 8, 2048, 768)
    g = torch.Generator().manual_seed(26)
    experts = torch.rand(Tm, E, generator=g).topk(k, dim=-1).indices.to(device)
    out.append(Case("expert_matmul", "moe-up", f"T={Tm} E={E} k={k} H={Hm} N={2 * Im}",
                    lambda: (rand(Tm, Hm, seed=27), rand(E, 2 * Im, Hm, seed=28), experts),
                    bytes=(Tm * Hm + E * 2 * Im * Hm + Tm * k * 2 * Im) * es, flops=2.0 * Tm * k * 2 * Im * Hm))
    out.append(Case("expert_matmul", "moe-down", f"T={Tm} E={E} k={k} I={Im} N={Hm}",
                    lambda: (rand(Tm * k, Im, seed=29), rand(E, Hm, Im, seed=30), experts,
                             rand(Tm, k, seed=31), True),
                    bytes=(Tm * k * Im + E * Hm * Im + Tm * k * Hm) * es, flops=2.0 * Tm * k * Im * Hm))
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, V, (T,), generator=g).to(device)
    out.append(Case("embed_layer_norm", "bert", f"T={T} H={Hb} V={V}",
                    lambda: (ids, _positions(lens, device), ids % 2, rand(V, Hb, seed=13),
                             rand(512, Hb, seed=14), rand(2, Hb, seed=15), rand(Hb, seed=16),
                             rand(Hb, seed=17), 1e-12),
                    # ids, positions and types in, rows out; of the tables, each row read once:
                    # the distinct word ids, the positions up to the longest sequence, 2 types
                    bytes=(T + ids.unique().numel() + max(lens) + 2) * Hb * es + 3 * T * 8))
    for pooling in ("last", "mean"):
        read = (T if pooling == "mean" else B) * H * es
        out.append(Case("gather_pooled", pooling, f"T={T} B={B} H={H}",
                        lambda pooling=pooling: (rand(T, H, seed=18), _cu(lens, device), pooling),
                        bytes=read + B * H * es))
    out.append(Case("pooled_norm", "last-rms-residual", f"T={T} B={B} H={H}",
                    lambda: (rand(T, H, seed=18), _cu(lens, device), "last", "rms", rand(H, seed=19), None,
                             1e-6, 0.0, rand(T, H, seed=20)),
                    bytes=2 * B * H * es + B * H * 4))
    out.append(Case("pooled_norm", "mean-layer", f"T={T} B={B} H={H}",
                    lambda: (rand(T, H, seed=18), _cu(lens, device), "mean", "layer", rand(H, seed=19),
                             rand(H, seed=21), 1e-6),
                    bytes=T * H * es + B * H * 4))
    out.append(Case("activation", "softmax", f"B={B} L=2",
                    lambda: (rand(B, 2, seed=22, dt=torch.float32), "softmax", 0.5, 2.0),
                    bytes=B * 2 * 4 * 2))
    return out


# ----------------------------------------------------------------------------------------
# attention baselines outside the registry
# ----------------------------------------------------------------------------------------

def torch_varlen_fn():
    """torch.nn.attention.varlen.varlen_attn adapted to this op's arguments, or None.
    Older torch takes is_causal, newer only window_size; GQA through enable_gqa where
    it exists, else with k/v repeated per query head."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters

    def run(q, k, v, cu, max_seqlen, causal=False, scale=None, window=None):
        kw = {} if scale is None else {"scale": scale}
        left, right = window if window is not None else (-1, -1)
        if causal:
            right = 0
        if "window_size" in params:
            kw["window_size"] = (left, right)
        elif "is_causal" in params and left < 0 and right in (-1, 0):
            kw["is_causal"] = right == 0
        else:
            raise NotImplementedError("this torch's varlen_attn has no sliding window")
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                # No GQA in this torch: k/v repeated per query head, inside the timed call
                # (what a user of this API has to do).
                g = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw)
    return run


def padded_sdpa(q, k, v, lens, causal, window=None, batch=64):
    """A callable running SDPA over length-sorted padded batches of `batch` sequences,
    with the padding (and the tensors it needs) built here, outside the timed call."""
    if window is not None:
        raise NotImplementedError("padded SDPA baseline: no sliding window")
    Hq, Hkv = q.shape[1], k.shape[1]
    gqa = Hq != Hkv and "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    order = sorted(range(len(lens)), key=lens.__getitem__)
    groups = []
    for g0 in range(0, len(order), batch):
        idx = order[g0:g0 + batch]
        S = max(lens[i] for i in idx)

        def pad(x):
            out = x.new_zeros(len(idx), S, x.shape[1], x.shape[2])
            for j, i in enumerate(idx):
                out[j, :lens[i]] = x[starts[i]:starts[i] + lens[i]]
            return out.transpose(1, 2)  # (b, H, S, D)
        qg, kg, vg = pad(q), pad(k), pad(v)
        if Hq != Hkv and not gqa:
            kg, vg = kg.repeat_interleave(Hq // Hkv, 1), vg.repeat_interleave(Hq // Hkv, 1)
        glens = torch.tensor([lens[i] for i in idx], device=q.device)
        if bool((glens == S).all()):
            mask = None  # no padding: SDPA may take its fastest (flash) path
        else:
            ar = torch.arange(S, device=q.device)
            mask = (ar[None, None, None, :] < glens[:, None, None, None])
            if causal:
                mask = mask & (ar[None, :] <= ar[:, None])[None, None]
        groups.append((qg, kg, vg, mask))

    def run():
        outs = []
        for qg, kg, vg, mask in groups:
            kw = {"enable_gqa": True} if gqa and Hq != Hkv else {}
            outs.append(F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask,
                                                       is_causal=causal and mask is None, **kw))
        return outs
    return run


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, repeats=20, warmup=2, budget_ms=2000.0, min_repeats=3):
    """Median milliseconds of fn() over up to `repeats` runs (fewer when one run is slow,
    at least min_repeats unless repeats is smaller), after `warmup` runs (the first compiles)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = (time.perf_counter() - t0) * 1e3
    n = max(min(min_repeats, repeats), min(repeats, int(budget_ms / max(one, 1e-3))))
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes=None, repeats=20, graph=False):
    """GB/s of a plain device-to-device copy, counting bytes read + bytes written, the
    ceiling the memory-bound ops are held against. nbytes: read + written bytes (default
    2 GiB on GPU, far past the L2 cache; 32 MiB on CPU)."""
    device = torch.device(device)
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (32 << 20))
    src = torch.empty(max(1, nbytes // 4), dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)

    def copy():
        # An elementwise kernel, not dst.copy_(src): captured in a CUDA graph, that memcpy
        # ran about 1.5x slower than launched eagerly (H200), which would inflate every
        # graph-timed "% copy"; a kernel that reads and writes the bytes times the same both ways.
        torch.mul(src, 1.0, out=dst)
    ms = None
    if graph and device.type == "cuda":
        try:
            ms = time_graph(copy, device)
        except Exception:  # capture refused: event pairs instead
            torch.cuda.synchronize(device)
    if ms is None:
        ms = time_call(copy, device, repeats=repeats, warmup=2)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return moved / (ms / 1e3) / 1e9


def time_graph(fn, device, calls=20, replays=5):
    """Median milliseconds of one fn() from CUDA-graph replays of `calls` back-to-back
    calls: the GPU time alone, without the Python and launch overhead that an event
    pair around one call includes (which dominates ops that run for a few microseconds).
    Raises whatever capture raises (the caller falls back to time_call)."""
    device = torch.device(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture needs warmed-up kernels and allocator pools
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    if any("Graph is empty" in str(w.message) for w in caught):
        # fn launched nothing on the capturing stream (work on another stream, or none): a
        # replay would time nothing.
        raise RuntimeError("the captured CUDA graph is empty")
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def _copy_ms(nbytes, device, graph, cache):
    """Milliseconds of a device copy that reads and writes `nbytes` in all (rounded to
    whole bf16 pairs), measured once per size: cache maps bytes -> ms."""
    nbytes = max(4, int(nbytes) // 4 * 4)
    if nbytes not in cache:
        cache[nbytes] = nbytes / (copy_bandwidth(device, nbytes, graph=graph) * 1e9) * 1e3
    return cache[nbytes]


def _first_tensor(x):
    while isinstance(x, (tuple, list)):
        x = x[0]
    return x


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(y) for y in x)
    return x


def _max_diff(a, b):
    if a is None or b is None:
        return None
    a, b = _first_tensor(a), _first_tensor(b)
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return None
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _available_backends(device, backends):
    """({backend: Ops} for the registry backends that run on device, {backend: why not}
    for the others)."""
    out, skipped = {}, {}
    for b in backends:
        if b in EXTRA_BACKENDS:
            continue
        if b == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            skipped[b] = "on CPU Triton runs only in its interpreter (TRITON_INTERPRET=1)"
            continue
        try:
            out[b] = ops_mod.resolve_ops(b, device)
        except (RuntimeError, ImportError) as e:
            skipped[b] = str(e)
    return out, skipped


def run(device=None, backends=None, quick=False, json_path=None, ops=None, repeats=None, out=sys.stdout,
        graph=False):
    """Time every case on every available backend; print a table; return the rows.

    device: "cuda" if available else "cpu" by default; backends: names among
    cuda/triton/torch/sdpa-padded/torch-varlen (default: all that run here); quick: tiny
    shapes (forced on CPU); json_path: also write the rows there; ops: op names to keep;
    repeats: timed runs per case (default REPEATS, QUICK_REPEATS with quick); graph: on
    CUDA, time ops and copies by CUDA-graph replay (time_graph), falling back to event
    pairs per case where capture fails (row["timing"] says which). A backend named in
    ``backends`` that cannot run here is printed with the reason, before the table."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        quick = True
    repeats = repeats or (QUICK_REPEATS if quick else REPEATS)
    named = list(backends or ())
    backends = list(backends or (BACKENDS + EXTRA_BACKENDS))
    if "torch" not in backends:
        backends.append("torch")  # the baseline every speedup is against
    resolved, skipped = _available_backends(device, backends)
    varlen = torch_varlen_fn() if device.type == "cuda" and "torch-varlen" in backends else None
    if "torch-varlen" in backends and varlen is None:
        skipped["torch-varlen"] = "needs a CUDA device" if device.type != "cuda" else \
            "this torch has no torch.nn.attention.varlen"
    graph = graph and device.type == "cuda"
    copy_gbps = copy_bandwidth(device)
    print(f"device copy of {'2 GiB' if device.type == 'cuda' else '32 MiB'}: {copy_gbps:.0f} GB/s (read + "
          "write); '% copy': the time of a copy moving the op's bytes over the op's time", file=out)
    print(f"launch configs: {_tuned.source(device) or 'built-in (no tuned-configs file applies)'}", file=out)
    for b in named:
        if b in skipped:
            print(f"backend {b} skipped: {skipped[b]}", file=out)
    copy_ms = {}  # bytes -> ms of a copy that reads and writes that many bytes in all
    rows = []
    for case in cases(device, quick):
        if ops and case.op not in ops:
            continue
        torch_out, torch_ms = None, None
        order = ["torch"] + [b for b in backends if b != "torch"]
        for b in order:
            if b in resolved:
                if resolved[b].chosen.get(case.op) != b:
                    continue  # a named backend falls back to torch for ops it lacks
                fn = getattr(resolved[b], case.op)
            elif b == "sdpa-padded" and case.attn is not None:
                fn = None
            elif b == "torch-varlen" and case.attn is not None and varlen is not None:
                fn = varlen
            else:
                continue
            row = {"op": case.op, "case": case.name, "shape": case.shape, "backend": b,
                   "device": str(device), "ms": None, "gbps": None, "tflops": None,
                   "pct_copy": None, "vs_torch": None, "max_diff": None, "error": None, "timing": "events"}
            try:
                args = case.make()
                if b == "sdpa-padded":
                    call = padded_sdpa(*args[:3], case.attn["lens"], case.attn["causal"], case.attn["window"])
                    first = None  # padded layout: not comparable element-wise
                else:
                    def call(fn=fn, args=args):
                        return fn(*args)
                    first = _clone(call())
                if device.type == "cpu" and b == "triton":
                    # The interpreter runs kernels in Python: one run says all it can.
                    row["ms"] = time_call(call, device, repeats=1, warmup=0, min_repeats=1)
                else:
                    row["ms"] = None
                    if graph and b != "sdpa-padded":
                        try:
                            row["ms"], row["timing"] = time_graph(call, device), "graph"
                        except Exception:  # not capturable: event pairs instead
                            torch.cuda.synchronize(device)
                    if row["ms"] is None:
                        row["ms"] = time_call(call, device, repeats=repeats, warmup=1)
                if b == "torch":
                    torch_out, torch_ms = first, row["ms"]
                else:
                    row["max_diff"] = _max_diff(first, torch_out)
                del args, first
            except Exception as e:  # one failing backend (OOM, missing feature) must not end the run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if row["ms"]:
                s = row["ms"] / 1e3
                row["gbps"] = case.bytes / s / 1e9 if case.bytes and not case.flops else None
                if row["gbps"]:
                    # Against a copy of the same bytes: small ops are launch-latency bound,
                    # and so is a copy of their size.
                    row["pct_copy"] = 100.0 * _copy_ms(case.bytes, device, graph, copy_ms) / row["ms"]
                row["tflops"] = case.flops / s / 1e12 if case.flops else None
                row["vs_torch"] = torch_ms / row["ms"] if torch_ms else None
            rows.append(row)
        torch_out = None
    print_table(rows, out=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def attention_sweep(device=None, repeats=20, out=sys.stdout):
    """Time every candidate config of the Triton varlen attention (``sweep_configs``, and
    the built-in choice where they do not list it) on the GPU attention cases; print a
    table; return rows like run()'s, backend "triton BMxBN/wW/sS[/gG][/nfF]" (gG: G query
    heads per program, shown for a 5th element other than 1; nfF: key blocks of F over the
    unmasked middle, shown for a 6th element other than BLOCK_N), "default" marking the
    launcher's built-in choice (tuned configs files are ignored here), "config" the
    candidate as given and "tune_key" the case's shape key for a configs file."""
    from pyengine.kernels import varlen_attention as va

    device = torch.device(device or "cuda")
    rows = []
    with _tuned.disabled():
        for case in cases(device, quick=device.type == "cpu"):  # CPU: interpreter tests only
            if case.op == "varlen_attention" and case.attn["window"] is None:
                rows += _attention_case_sweep(va, case, device, repeats)
    print("\nvarlen_attention config sweep (BLOCK_M x BLOCK_N / warps / stages / g: query heads per program"
          " / nf: key block of the unmasked middle)", file=out)
    for r in rows:
        print(f"  {r['case']:14} {r['backend']:37} " + (f"{r['ms']:.4f} ms  {r['tflops']:.0f} TFLOP/s  "
              f"max diff {r['max_diff']:.2g}" if r["ms"] else f"ERROR {r['error']}"), file=out)
    return rows


def _attention_case_sweep(va, case, device, repeats):
    """attention_sweep's rows for one case."""
    args = case.make()
    q, k, v, cu, max_seqlen, causal = args[:6]
    rows16 = _v.rows_16b(q, k, v)
    default = va.config_fields(va.config_for(q.dtype, q.shape[-1], rows16))  # the launcher's own choice
    ref = va._launch(q, k, v, cu, max_seqlen, causal)
    rows = []
    for cfg in _case_candidates(va, case, rows16):
        group, block_n_full = va.config_fields(cfg)[4:]
        is_default = va.config_fields(cfg) == default
        row = {"op": case.op, "case": case.name, "shape": case.shape, "device": str(device),
               "backend": "triton {}x{}/w{}/s{}".format(*cfg[:4]) + (f"/g{group}" if group != 1 else "")
                          + (f"/nf{block_n_full}" if block_n_full != cfg[1] else "")
                          + (" default" if is_default else ""),
               "sweep": "attention", "impl": "triton", "tune_key": va.tune_key(*args), "default": is_default,
               "config": list(cfg), "ms": None, "tflops": None, "max_diff": None, "error": None}
        try:
            def call(cfg=cfg):
                return va._launch(q, k, v, cu, max_seqlen, causal, config=cfg)
            row["max_diff"] = _max_diff(call(), ref)
            row["ms"] = time_call(call, device, repeats=repeats, warmup=1)
            row["tflops"] = case.flops / (row["ms"] / 1e3) / 1e12
        except Exception as e:  # a config the GPU refuses must not end the sweep
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
    return rows


# The ops with launch-config candidates besides attention (SWEEP_CONFIGS in their Triton
# module): op -> the cases of cases() they are timed on.
SWEEP_CASES = {"gated_act": ("silu", "gelu"), "qk_norm_rotary": ("qwen3",), "gather_pooled": ("mean",),
               "pooled_norm": ("mean-layer",), "expert_matmul": ("moe-up", "moe-down")}


def config_label(config):
    """A sweep config as printed: "default" for None (the launcher's own choice)."""
    if config is None:
        return "default"
    if isinstance(config, dict):
        return " ".join(f"{k}={v}" for k, v in config.items())
    return str(config)


def _cuda_sweeps(device, ops=None):
    """[("cuda", op, fn, configs)] for the ops pyengine.cuda_ops sweeps: where it defines a
    dict SWEEP_CONFIGS (op name -> configs), the op's function takes config=, the op has a
    case in SWEEP_CASES and the built extension runs it on this device; [] otherwise."""
    if device.type != "cuda":
        return []
    try:
        from pyengine import cuda_ops
        resolved = ops_mod.resolve_ops("cuda", device)
    except (ImportError, RuntimeError):
        return []
    table = getattr(cuda_ops, "SWEEP_CONFIGS", None)
    out = []
    for op, configs in (table.items() if isinstance(table, dict) else ()):
        fn = getattr(cuda_ops, op, None)
        if op not in SWEEP_CASES or (ops and op not in ops) or fn is None or resolved.chosen.get(op) != "cuda":
            continue
        try:
            takes_config = "config" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_config = False
        if takes_config:
            out.append(("cuda", op, fn, [None] + list(configs)))
    return out


def op_sweep(device=None, repeats=20, out=sys.stdout, graph=False, ops=None):
    """Time every launch-config candidate of the memory-bound Triton ops (each module's
    SWEEP_CONFIGS, through its ``_launch(..., config=)``), and of ``pyengine.cuda_ops``
    where it defines SWEEP_CONFIGS, on the cases in SWEEP_CASES; print a table and the
    best config per case; return rows like run()'s, with "config" (None: the launcher's
    own choice, timed first) and "sweep": "op". max_diff is against that backend's
    default output. graph: CUDA-graph replay timing, per row falling back to event pairs.
    ops: op names to keep. CPU: the interpreter on the quick shapes (tests only)."""
    import importlib

    device = torch.device(device or "cuda")
    graph = graph and device.type == "cuda"
    sweeps, keys = [], {}
    for op in SWEEP_CASES:
        if not ops or op in ops:
            mod = importlib.import_module(f"pyengine.kernels.{op}")
            sweeps.append(("triton", op, mod._launch, [None] + list(mod.SWEEP_CONFIGS)))
            keys["triton", op] = mod.tune_key
    cuda_sweeps = _cuda_sweeps(device, ops)
    if cuda_sweeps:
        from pyengine import cuda_ops
        keys.update({("cuda", op): fn for op, fn in getattr(cuda_ops, "TUNE_KEYS", {}).items()})
    sweeps += cuda_sweeps
    by_id = {case.id: case for case in cases(device, quick=device.type == "cpu")}
    with _tuned.disabled():  # "default" is the built-in choice, whatever configs file applies
        rows = _op_sweep_rows(sweeps, keys, by_id, device, repeats, graph)
    print_op_sweep(rows, out=out)
    return rows


def _op_sweep_rows(sweeps, keys, by_id, device, repeats, graph):
    copy_ms, rows = {}, []
    for backend, op, fn, configs in sweeps:
        key_fn = keys.get((backend, op))
        for name in SWEEP_CASES[op]:
            case = by_id[f"{op}/{name}"]
            ref = None
            for cfg in configs:
                row = {"op": op, "case": name, "shape": case.shape, "backend": backend, "device": str(device),
                       "sweep": "op", "impl": backend, "tune_key": None, "default": cfg is None, "config": cfg,
                       "ms": None, "gbps": None, "pct_copy": None, "tflops": None,
                       "vs_torch": None, "max_diff": None, "error": None, "timing": "events"}
                try:
                    kw = {} if cfg is None else {"config": cfg}
                    # Fresh arguments per config: in-place ops (qk_norm_rotary) compare
                    # outputs from the same inputs.
                    args = case.make()
                    row["tune_key"] = key_fn(*args) if key_fn else None

                    def call(args=args, kw=kw):
                        return fn(*args, **kw)
                    first = _clone(call())
                    if cfg is None:
                        ref = first
                    else:
                        row["max_diff"] = _max_diff(first, ref)
                    if device.type == "cpu":
                        row["ms"] = time_call(call, device, repeats=1, warmup=0, min_repeats=1)
                    else:
                        if graph:
                            try:
                                row["ms"], row["timing"] = time_graph(call, device), "graph"
                            except Exception:  # not capturable: event pairs instead
                                torch.cuda.synchronize(device)
                        if row["ms"] is None:
                            row["ms"] = time_call(call, device, repeats=repeats, warmup=1)
                    row["gbps"] = case.bytes / (row["ms"] / 1e3) / 1e9
                    row["pct_copy"] = 100.0 * _copy_ms(case.bytes, device, graph, copy_ms) / row["ms"]
                    del args, first
                except Exception as e:  # a config the GPU refuses must not end the sweep
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
            ref = None
    return rows


def sweep_jobs(device, attn=True, ops=None):
    """Every Triton launch the sweeps will make, as (op, case name, config) triples: the
    attention candidates per case (and the built-in config) with ``attn``, each swept op's
    candidates (None: its built-in config) for the op names in ``ops`` (None: none)."""
    import importlib

    from pyengine.kernels import varlen_attention as va

    jobs = []
    for case in cases(device, quick=torch.device(device).type == "cpu"):
        if attn and case.op == "varlen_attention" and case.attn["window"] is None:
            jobs += [(case.op, case.name, cfg) for cfg in _case_candidates(va, case)]
        if ops is not None and case.op in SWEEP_CASES and case.name in SWEEP_CASES[case.op] and (
                not ops or case.op in ops):
            mod = importlib.import_module(f"pyengine.kernels.{case.op}")
            jobs += [(case.op, case.name, cfg) for cfg in [None] + list(mod.SWEEP_CONFIGS)]
    return jobs


def _case_candidates(va, case, rows16=None):
    """An attention case's sweep configs: the built-in one first where the candidates do
    not list it, then each candidate that fits the case's kv groups. rows16: as
    _validate.rows_16b of the case's tensors (None: the contiguous (T, H, D) tensors the
    cases make), which picks the launcher's built-in config for a padded head dim."""
    Hq, Hkv, D = case.attn["heads"]
    if rows16 is None:
        rows16 = D % 8 == 0
    builtin = va.config_for(case.attn["dtype"], D, rows16)
    candidates = list(va.sweep_configs(D))
    if va.config_fields(builtin) not in {va.config_fields(c) for c in candidates}:
        candidates.insert(0, builtin)
    return [c for c in candidates if len(c) <= 4 or (Hq // Hkv) % c[4] == 0]


def _precompile_task(task):
    """In a precompile worker: the launches of one task (jobs of one case) on the device,
    which compile them into Triton's on-disk cache; the case's tensors are made once and
    freed after. Returns the number of jobs that failed (the sweep reports them again)."""
    import importlib

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    op, name = task[0][:2]
    case = next(c for c in cases(device, quick=device.type == "cpu") if c.id == f"{op}/{name}")
    mod = importlib.import_module(f"pyengine.kernels.{op}")
    failed = 0
    try:
        args = case.make()
        with _tuned.disabled():
            for _, _, cfg in task:
                try:
                    mod._launch(*args, config=cfg)
                except Exception:  # noqa: BLE001 - the sweep reports it with its message
                    failed += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - the inputs could not be made (out of memory): the sweep compiles these
        return len(task)
    finally:
        args = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return failed


def precompile(jobs, workers, out=None, per_task=3):
    """Compile the sweeps' launches (``sweep_jobs``) on ``workers`` processes at once
    (spawned, each on the device), filling Triton's on-disk cache so that the timed sweeps
    load each kernel instead of compiling it in turn: compiling, not timing, is most of a
    sweep's time. A task is up to ``per_task`` jobs of one case (its tensors made once);
    attention and op tasks alternate, so that few of the large gated-MLP inputs are made at
    once. Returns the number of jobs that failed (the sweep reports them again); never raises."""
    import concurrent.futures
    import multiprocessing

    if workers < 1 or not jobs:
        return 0
    out = out or sys.stdout
    by_case = {}
    for job in jobs:
        by_case.setdefault(job[:2], []).append(job)
    tasks = [[g[i:i + per_task] for i in range(0, len(g), per_task)] for g in by_case.values()]
    attn = [t for g, key in zip(tasks, by_case) if key[0] == "varlen_attention" for t in g]
    other = [t for g, key in zip(tasks, by_case) if key[0] != "varlen_attention" for t in g]
    order = [t for pair in itertools.zip_longest(attn, other) for t in pair if t is not None]
    t0 = time.perf_counter()
    n = min(workers, len(order))
    try:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with concurrent.futures.ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
            failed = sum(pool.map(_precompile_task, order))
    except Exception as e:  # a pool that cannot start: the sweeps compile as they go
        print(f"precompile skipped: {type(e).__name__}: {e}", file=out)
        return 0
    print(f"precompiled {len(jobs)} sweep launches ({len(order)} tasks) on {n} processes in "
          f"{time.perf_counter() - t0:.1f} s ({failed} failed)", file=out)
    return failed


def best_configs(rows):
    """{(backend, op, case): (default row, fastest row)} over op-sweep rows that ran."""
    best = {}
    for r in rows:
        if r.get("sweep") != "op" or not r["ms"]:
            continue
        key = (r["backend"], r["op"], r["case"])
        default, fastest = best.get(key, (None, None))
        if r["config"] is None:
            default = r
        if fastest is None or r["ms"] < fastest["ms"]:
            fastest = r
        best[key] = (default, fastest)
    return best


def tuned_entries(rows, margin=0.03):
    """What a sweep says a configs file should hold: {("impl/op", shape key): entry or
    None} for every shape whose built-in config was timed (attention or op sweep rows).
    The entry {"config", "ms", "default_ms", "case"} is the fastest candidate where it
    beats the built-in choice by more than ``margin`` (a fraction, against timing noise);
    None where the built-in choice stays."""
    groups = {}
    for r in rows:
        if r.get("sweep") in ("attention", "op") and r.get("tune_key") and r["ms"]:
            groups.setdefault((f"{r['impl']}/{r['op']}", r["tune_key"]), []).append(r)
    out = {}
    for key, group in groups.items():
        default = next((r for r in group if r["default"]), None)
        if default is None:
            continue  # nothing to beat: no claim either way
        best = min(group, key=lambda r: r["ms"])
        out[key] = None
        if not best["default"] and best["ms"] < default["ms"] * (1.0 - margin):
            out[key] = {"config": best["config"], "ms": round(best["ms"], 5), "default_ms": round(default["ms"], 5),
                        "case": best["case"]}
    return out


def _other_device(path, data, name) -> str | None:
    """Why the configs ``data`` read from ``path`` may not take verdicts measured on the
    device called ``name`` (one file, one GPU: two GPUs' verdicts under one name would
    mislead both), or None."""
    there = data.get("device")
    if there in (None, name):
        return None
    return f"{path} holds configs measured on {there!r}, not on this {name!r}: write them to another file"


def write_configs(path, rows, device, out=sys.stdout, margin=0.03):
    """Merge a sweep's verdicts into the configs file at ``path`` (pyengine.kernels._tuned's
    format; created if absent): winners set, shapes whose built-in choice won removed,
    other shapes kept. Returns the file's content."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    data = {"format": _tuned.FORMAT, "ops": {}}
    if os.path.exists(path):
        _tuned.load(path)  # a bad file is reported, not overwritten
        with open(path) as f:
            data = json.load(f)
        data.setdefault("ops", {})
        why = _other_device(path, data, name)
        if why:
            raise ValueError(why)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    data["device"] = name
    data["measured"] = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
                        "triton": triton_version, "cuda": torch.version.cuda,
                        "by": "python -m pyengine.bench kernels --write-configs", "margin": margin}
    verdicts = tuned_entries(rows, margin)
    for (op, key), entry in sorted(verdicts.items()):
        table = data["ops"].setdefault(op, {})
        if entry is None:
            table.pop(key, None)
        else:
            table[key] = entry
    data["ops"] = {op: dict(sorted(t.items())) for op, t in sorted(data["ops"].items()) if t}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # A new file renamed over the old one: a run stopped mid-write (a time limit) keeps the
    # old file whole rather than half of the new one.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    print(f"\ntuned kernel configs -> {path} (a candidate is kept where it beats the built-in choice by more "
          f"than {margin:.0%})", file=out)
    for (op, key), entry in sorted(verdicts.items()):
        print(f"  {op:26} {key:34} " + ("built-in choice kept" if entry is None else
              f"{config_label(entry['config'])}: {entry['ms']:.4f} ms, built-in {entry['default_ms']:.4f} ms "
              f"({entry['default_ms'] / entry['ms']:.2f}x)"), file=out)
    return data


def print_op_sweep(rows, out=sys.stdout):
    print("\nmemory-bound op config sweep (max diff: against the same backend's default config)", file=out)
    head = ("op", "case", "backend", "config", "ms", "GB/s", "% copy", "max diff")
    lines = [head] + [(r["op"], r["case"], r["backend"], config_label(r["config"]), _fmt(r["ms"], ".4f"),
                       _fmt(r["gbps"], ".0f"), _fmt(r["pct_copy"], ".0f"),
                       _fmt(r["max_diff"], ".2g") if r["error"] is None else "ERROR " + r["error"])
                      for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head) - 1)]
    for line in lines:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + str(line[-1]), file=out)
    print("best config per case:", file=out)
    for (backend, op, case), (default, fastest) in best_configs(rows).items():
        gain = f", {default['ms'] / fastest['ms']:.2f}x the default's speed" if default else ""
        print(f"  {op}/{case} {backend}: {config_label(fastest['config'])}  {fastest['ms']:.4f} ms, "
              f"{fastest['pct_copy']:.0f}% copy{gain}", file=out)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows, out=sys.stdout):
    head = ("op", "case", "backend", "ms", "GB/s", "% copy", "TFLOP/s", "vs torch", "max diff", "shape / error")
    lines = [head]
    for r in rows:
        lines.append((r["op"], r["case"], r["backend"], _fmt(r["ms"], ".4g"), _fmt(r["gbps"], ".4g"),
                      _fmt(r.get("pct_copy"), ".0f"),
                      _fmt(r["tflops"], ".4g"), _fmt(r["vs_torch"], ".2f") + ("x" if r["vs_torch"] else ""),
                      _fmt(r["max_diff"], ".2g"), r["error"] or r["shape"]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head) - 1)]
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + str(line[-1]), file=out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyengine.bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backends", default=None,
                   help="comma list among cuda,triton,torch,sdpa-padded,torch-varlen (default: all available)")
    p.add_argument("--ops", default=None, help="comma list of op names (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (always on CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed runs per case, at most (fewer where one run is slow; median reported; default "
                        f"{REPEATS}, {QUICK_REPEATS} with --quick or on CPU)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--graph", action="store_true",
                   help="time by CUDA-graph replay (GPU time without per-call host overhead)")
    p.add_argument("--attn-sweep", action="store_true",
                   help="also time every candidate Triton attention config (GPU only)")
    p.add_argument("--op-sweep", action="store_true",
                   help=f"also time every launch-config candidate of {', '.join(SWEEP_CASES)} (Triton, and CUDA "
                        "where pyengine.cuda_ops has a sweep; GPU only)")
    p.add_argument("--write-configs", default=None, metavar="PATH",
                   help="with --attn-sweep / --op-sweep: write each swept shape's fastest config, where it beats "
                        "the built-in choice, into this tuned-configs JSON (merged into an existing file); "
                        "kernels/configs/<device>.json is the file a GPU of that name reads")
    p.add_argument("--precompile", type=int, default=None, metavar="N",
                   help="with a sweep: compile its launches on N processes first (default: up to 8, by the CPU "
                        "count; 0: compile as the sweep goes)")
    a = p.parse_args(argv)
    if a.device is not None:
        parse_device(p, a.device)
    if a.repeats is not None and a.repeats < 1:
        p.error(f"--repeats must be a positive integer, got {a.repeats}")
    why = output_path_error(a.json) if a.json is not None else None
    if why:
        p.error(f"--json {why}")
    split = (lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None)
    backends = split(a.backends)
    unknown = [b for b in backends or () if b not in BACKENDS + EXTRA_BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; expected among {BACKENDS + EXTRA_BACKENDS}")
    op_names = split(a.ops)
    bad = [o for o in op_names or () if o not in ops_mod.OP_NAMES]
    if bad:
        p.error(f"unknown op(s) {bad}; expected among {ops_mod.OP_NAMES}")
    on_cuda = torch.cuda.is_available() and (not a.device or torch.device(a.device).type == "cuda")
    for flag, wanted in (("--attn-sweep", a.attn_sweep), ("--op-sweep", a.op_sweep)):
        if wanted and not on_cuda:
            p.error(f"{flag} needs a CUDA device (the sweep times GPU launch configs; none here)")
    if a.write_configs and not (a.attn_sweep or a.op_sweep):
        p.error("--write-configs needs --attn-sweep and/or --op-sweep (it writes what they measure)")
    if a.write_configs:
        why = output_path_error(a.write_configs)
        if why:
            p.error(f"--write-configs {why}")
    if a.write_configs and os.path.exists(a.write_configs):
        try:
            _tuned.load(a.write_configs)
            with open(a.write_configs) as f:
                why = _other_device(a.write_configs, json.load(f),
                                    torch.cuda.get_device_name(torch.device(a.device or "cuda")) if on_cuda else None)
        except ValueError as e:
            why = str(e)
        if why:
            p.error(f"--write-configs: {why}")
    if a.precompile is not None and a.precompile < 0:
        p.error(f"--precompile takes a process count >= 0, got {a.precompile}")
    if a.attn_sweep or a.op_sweep:
        workers = a.precompile if a.precompile is not None else min(8, max(0, (os.cpu_count() or 1) - 2))
        precompile(sweep_jobs(a.device or "cuda", a.attn_sweep, (op_names or []) if a.op_sweep else None), workers)
    rows = []

    def save(sweep_done):
        # After each phase, so that a run stopped by a time limit keeps what it measured
        # (the rows first: they are the measurement, the configs a verdict on them).
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        if a.write_configs and sweep_done:
            write_configs(a.write_configs, rows, a.device or "cuda")

    rows += run(a.device, backends, a.quick, None, ops=op_names, repeats=a.repeats, graph=a.graph)
    save(False)
    if a.attn_sweep:
        rows += attention_sweep(a.device, repeats=a.repeats or REPEATS)
        save(True)
    if a.op_sweep:
        rows += op_sweep(a.device, repeats=a.repeats or REPEATS, graph=a.graph, ops=op_names)
        save(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
