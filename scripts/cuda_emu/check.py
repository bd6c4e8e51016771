"""Checks the kernels in csrc/ against the torch references on a CPU, through the
emulated build of scripts/cuda_emu/build.sh (build/cuda_emu/_C*.so).

The emulation runs every CUDA thread as a std::thread (blocks one after another), so it
checks indexing, vector widths, the scalar fallbacks, shared-memory reductions and the
Python launch path (pointers, strides, dtype codes) of pyengine.cuda_ops. It says nothing
about speed, real alignment faults or the compiler's GPU code: the `-m gpu` tests do.

    scripts/cuda_emu/check.sh [OP ...]      # build, then run this
"""
import itertools
import pathlib
import random
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "build" / "cuda_emu"))
import _C as emu_C  # noqa: E402

import pyengine.cuda_ops as co  # noqa: E402
import pyengine.ops as ref  # noqa: E402


class _Proxy:
    def __getattr__(self, name):
        return getattr(emu_C, name)


co._ext = _Proxy()
co._same_device = lambda *a, **k: None  # host tensors stand in for device tensors
co._stream = lambda t: 0

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
results = {"ok": 0, "fail": 0}


def close(name, got, want, dtype):
    atol, rtol = TOL[dtype] if got.dtype != torch.float32 or dtype == torch.float32 else (1e-4, 1e-4)
    if got.dtype != want.dtype or got.shape != want.shape:
        print(f"FAIL {name}: dtype/shape {got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)}")
        results["fail"] += 1
    elif not torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol, equal_nan=True):
        print(f"FAIL {name}: max diff {(got.float() - want.float()).abs().max().item():.3g}")
        results["fail"] += 1
    else:
        results["ok"] += 1


def cu_of(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)


def check_norms():
    cases = [(torch.float32, 64, 3, True, None, 0), (torch.float16, 384, 4, True, None, 0),
             (torch.bfloat16, 96, 2, False, torch.float32, 0), (torch.float16, 37, 3, True, None, 0),
             (torch.bfloat16, 128, 3, True, None, 3), (torch.float32, 2048, 2, True, None, 0),
             (torch.float16, 4096, 1, False, None, 0), (torch.float32, 16384, 2, True, None, 1),
             # 48 KiB of dynamic shared memory: with the kernel's static scratch, past what a
             # block may use without the opt-in (the emulator refuses the launch as a GPU does)
             (torch.float32, 12288, 1, True, None, 0)]
    for dt, H, rows, res, wdt, pad in cases:
        base = torch.randn(rows, H + pad, dtype=dt)
        x = base[:, pad:] if pad == 1 else base[:, :H]
        r = torch.randn(rows, H, dtype=dt) if res else None
        w, b = torch.randn(H, dtype=wdt or dt), torch.randn(H, dtype=wdt or dt)
        tag = f"{dt} H={H} rows={rows} res={res} pad={pad}"
        for off in (0.0, 1.0):
            got, want = co.add_rms_norm(x, r, w, 1e-6, off), ref.add_rms_norm(x, r, w, 1e-6, off)
            close(f"add_rms_norm {tag} offset={off}", got[0], want[0], dt)
            close(f"add_rms_norm summed {tag}", got[1], want[1], dt)
        for bias in (b, None):
            got, want = co.add_layer_norm(x, r, w, bias, 1e-5), ref.add_layer_norm(x, r, w, bias, 1e-5)
            close(f"add_layer_norm {tag} bias={bias is not None}", got[0], want[0], dt)
            close(f"add_layer_norm summed {tag}", got[1], want[1], dt)
    x, w = torch.randn(2, 3, 64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)
    close("add_rms_norm 3-D", co.add_rms_norm(x, None, w, 1e-6)[0], ref.add_rms_norm(x, None, w, 1e-6)[0],
          torch.float16)


def check_rotary():
    cases = [(torch.float32, 5, 2, 1, 64, 64, True, False), (torch.float16, 4, 4, 2, 128, 128, True, True),
             (torch.bfloat16, 3, 2, 2, 64, 32, False, True), (torch.float16, 3, 3, 1, 64, 64, False, False),
             (torch.float16, 2, 2, 1, 10, 6, True, False), (torch.bfloat16, 2, 2, 1, 10, 6, False, True),
             (torch.float32, 3, 2, 2, 80, 20, False, False), (torch.float16, 3, 2, 1, 80, 40, True, True)]
    for dt, T, Hq, Hk, D, R, neox, fused in cases:
        pos = torch.tensor([random.randrange(0, 50) for _ in range(T)], dtype=torch.int64)
        cs = torch.randn(50, R)
        if fused:
            qkv = torch.randn(T, Hq + 2 * Hk, D, dtype=dt)
            q, k = qkv[:, :Hq], qkv[:, Hq:Hq + Hk]
            v = qkv[:, Hq + Hk:].clone()
        else:
            q, k = torch.randn(T, Hq, D, dtype=dt), torch.randn(T, Hk, D, dtype=dt)
        q2, k2 = q.clone(), k.clone()
        ref.rotary(q2, k2, pos, cs, neox)
        co.rotary(q, k, pos, cs, neox)
        tag = f"{dt} D={D} R={R} neox={neox} fused={fused}"
        close(f"rotary q {tag}", q, q2, dt)
        close(f"rotary k {tag}", k, k2, dt)
        if fused:
            close(f"rotary v untouched {tag}", qkv[:, Hq + Hk:], v, dt)


def check_pooling():
    cases = [(torch.float32, 64, [1, 5, 3], 0), (torch.float16, 384, [2, 1, 7, 1], 0),
             (torch.bfloat16, 40, [3, 9], 8), (torch.float16, 33, [1, 2], 0), (torch.bfloat16, 256, [20, 1], 0),
             # cls / last: 11 sequences over two blocks of the warp-per-row kernel (8 warps
             # each), a row of 1024; and rows past its bound (block kernel) in fp32
             (torch.bfloat16, 1024, [1, 4, 2, 9, 1, 3, 5, 1, 2, 7, 1], 0), (torch.float32, 2176, [2, 1, 3], 0),
             # empty first, middle and last sequences: NaN rows (no row read out of bounds)
             (torch.bfloat16, 1024, [0, 3, 0, 2, 0], 0), (torch.float32, 2176, [0, 2, 0], 0),
             # the block kernel's 2 * H floats of dynamic shared memory at 48 KiB (see check_norms)
             (torch.float32, 6144, [2, 1], 0)]
    for dt, H, lens, pad in cases:
        T = sum(lens)
        hid = torch.randn(T, H + pad, dtype=dt)[:, :H]
        cu = cu_of(lens)
        res = torch.randn(T, H, dtype=dt)
        for p in ("cls", "last", "mean"):
            tag = f"{dt} H={H} lens={lens} pad={pad} {p}"
            close(f"gather_pooled {tag}", co.gather_pooled(hid, cu, p), ref.gather_pooled(hid, cu, p), dt)
            for nk in (None, "layer", "rms"):
                for rr in (None, res):
                    for wdt in (dt, torch.float32):
                        w = torch.randn(H, dtype=wdt)
                        # LayerNorm without a bias once per case (the fp32-weight pass)
                        b = None if nk == "layer" and wdt == torch.float32 else torch.randn(H, dtype=wdt)
                        off = 1.0 if nk == "rms" else 0.0
                        close(f"pooled_norm {tag} {nk} res={rr is not None} w={wdt}",
                              co.pooled_norm(hid, cu, p, nk, w, b, 1e-5, off, rr),
                              ref.pooled_norm(hid, cu, p, nk, w, b, 1e-5, off, rr), dt)


def check_pooled_mean():
    """pooled_norm "mean" through the warp-per-row kernel (H <= 32 * VEC * 16; 8 with a
    residual) and the block kernel it falls back to (H not a multiple of the vector width,
    a misaligned row, larger H), plus gather_pooled "mean" across its unrolled row loop.
    Lengths cover 1, an empty sequence (NaN), fewer rows than warps and several rounds."""
    lens = [1, 0, 5, 19, 2]
    cases = [(torch.float32, 13, 0), (torch.bfloat16, 13, 0), (torch.float16, 64, 0),
             (torch.bfloat16, 384, 0), (torch.float32, 384, 1), (torch.bfloat16, 1024, 0),
             (torch.float16, 1536, 0), (torch.float32, 1536, 0), (torch.bfloat16, 4096, 0),
             (torch.float32, 4096, 0), (torch.float16, 8192, 0)]
    for dt, H, pad in cases:
        T = sum(lens)
        base = torch.randn(T, H + pad, dtype=dt) * 3 + 0.5
        hid = base[:, pad:] if pad else base
        cu = cu_of(lens)
        res = torch.randn(T, H, dtype=dt)
        tag = f"{dt} H={H} lens={lens} pad={pad} mean"
        close(f"gather_pooled {tag}", co.gather_pooled(hid, cu, "mean"), ref.gather_pooled(hid, cu, "mean"), dt)
        for nk in (None, "layer", "rms"):
            for rr in (None, res):
                wdts = (dt, torch.float32) if H <= 1024 else (torch.float32,)
                for wdt in wdts:
                    w, b = torch.randn(H, dtype=wdt), torch.randn(H, dtype=wdt)
                    off = 1.0 if nk == "rms" else 0.0
                    for bias in ((b, None) if nk == "layer" else (None,)):
                        close(f"pooled_norm {tag} {nk} res={rr is not None} w={wdt} bias={bias is not None}",
                              co.pooled_norm(hid, cu, "mean", nk, w, bias, 1e-5, off, rr),
                              ref.pooled_norm(hid, cu, "mean", nk, w, bias, 1e-5, off, rr), dt)


# Small configs that stress the slicing where SWEEP_CONFIGS' slices (64 rows and up) would
# split little: one-row slices, slices of 3 (not a multiple of warps * rows_per_warp),
# single-warp and odd-warp blocks, and grids of a few blocks looping over every slice.
STRESS_CONFIGS = [
    {"variant": "slices", "slice_rows": 1, "warps": 2, "rows_per_warp": 1, "blocks_per_sm": 0},
    {"variant": "slices", "slice_rows": 3, "warps": 3, "rows_per_warp": 4, "blocks_per_sm": 0},
    {"variant": "slices", "slice_rows": 5, "warps": 1, "rows_per_warp": 2, "blocks_per_sm": 1},
    {"variant": "slices", "slice_rows": 0, "warps": 5, "rows_per_warp": 1, "blocks_per_sm": 2},
]


def _pooled_configs():
    return list(co.SWEEP_CONFIGS["pooled_norm"]) + STRESS_CONFIGS


def check_pooled_configs():
    """pooled_norm "mean" under every config of cuda_ops.SWEEP_CONFIGS (and STRESS_CONFIGS)
    against the reference: ragged lengths with 1, an empty sequence (NaN), sequences longer
    than the largest slice and one more than a multiple of it; fp32 and fp16, with and
    without a residual, layer / rms / no norm, weights in fp32 and in the input's dtype.
    Then the kernel dispatch over row widths (packs per lane, rows per warp lowered for wide
    or residual rows, the fallbacks that ignore a config), and bitwise batch invariance."""
    # One more than a multiple of each sweep slice (65, 129, 257), so every sweep entry
    # splits; the stress configs (slices of a few rows) get shorter ones (the emulation
    # runs a std::thread per CUDA thread).
    long_lens, short_lens = [1, 0, 7, 129, 65, 1, 257], [1, 17, 0, 7, 30, 1, 12]
    # Every (norm, residual) pair in fp32; three in fp16. No norm and no residual is the
    # gather kernel, which takes no config.
    combos = {torch.float32: [(nk, rr) for nk in (None, "layer", "rms") for rr in (False, True)
                              if nk or rr],
              torch.float16: [("layer", True), ("rms", False), (None, True)]}
    for cfg in _pooled_configs():
        lens = short_lens if cfg in STRESS_CONFIGS else long_lens
        cu, T = cu_of(lens), sum(lens)
        for dt, H in ((torch.float32, 64), (torch.float16, 384)):
            hid = torch.randn(T, H, dtype=dt) * 3 + 0.5
            res = torch.randn(T, H, dtype=dt)
            w32, b32 = torch.randn(H), torch.randn(H)
            for nk, with_res in combos[dt]:
                rr = res if with_res else None
                # fp32 weights with the residual, the input's dtype without
                w, b = (w32, b32) if with_res else (w32.to(dt), b32.to(dt))
                off = 1.0 if nk == "rms" else 0.0
                close(f"pooled_norm config {cfg} {dt} H={H} lens={lens} {nk} res={with_res} w={w.dtype}",
                      co.pooled_norm(hid, cu, "mean", nk, w, b, 1e-5, off, rr, config=cfg),
                      ref.pooled_norm(hid, cu, "mean", nk, w, b, 1e-5, off, rr), dt)

    # Row widths: packs per lane 4 / 8 / 16 and 8 with a residual (rows per warp lowered),
    # H not a multiple of the vector width and a misaligned row (the block kernel).
    lens = [1, 9, 0, 20]
    cu = cu_of(lens)
    T = sum(lens)
    cfg = {"variant": "slices", "slice_rows": 6, "warps": 2, "rows_per_warp": 4, "blocks_per_sm": 0}
    for dt, H, with_res, pad in ((torch.float16, 1024, False, 0), (torch.float32, 1024, True, 0),
                                 (torch.bfloat16, 2048, True, 0), (torch.float16, 4096, False, 0),
                                 (torch.float32, 13, True, 0), (torch.bfloat16, 256, False, 1)):
        base = torch.randn(T, H + pad, dtype=dt) * 3 + 0.5
        hid = base[:, pad:] if pad else base
        rr = torch.randn(T, H, dtype=dt) if with_res else None
        w, b = torch.randn(H), torch.randn(H)
        for nk in ("layer", "rms"):
            close(f"pooled_norm config dispatch {dt} H={H} pad={pad} {nk} res={with_res}",
                  co.pooled_norm(hid, cu, "mean", nk, w, b, 1e-5, 0.0, rr, config=cfg),
                  ref.pooled_norm(hid, cu, "mean", nk, w, b, 1e-5, 0.0, rr), dt)

    # A sequence's row is bitwise the same alone, in a batch, and after other rows.
    lens = [5, 40, 7, 1, 23]
    H = 64
    hid = torch.randn(sum(lens), H, dtype=torch.float16)
    res = torch.randn(sum(lens), H, dtype=torch.float16)
    w, b = torch.randn(H), torch.randn(H)
    starts = [0] + list(itertools.accumulate(lens))
    lead = torch.randn(13, H, dtype=torch.float16)
    for cfg in (STRESS_CONFIGS[1], STRESS_CONFIGS[2],
                {"variant": "slices", "slice_rows": 8, "warps": 2, "rows_per_warp": 2, "blocks_per_sm": 0}):
        batch = co.pooled_norm(hid, cu_of(lens), "mean", "layer", w, b, 1e-5, 0.0, res, config=cfg)
        for i in (1, 4):
            rows = slice(starts[i], starts[i + 1])
            alone = co.pooled_norm(hid[rows], cu_of([lens[i]]), "mean", "layer", w, b, 1e-5, 0.0,
                                   res[rows], config=cfg)
            shifted = co.pooled_norm(torch.cat([lead, hid[rows]]), cu_of([13, lens[i]]), "mean",
                                     "layer", w, b, 1e-5, 0.0, torch.cat([lead, res[rows]]), config=cfg)
            ok = torch.equal(batch[i], alone[0]) and torch.equal(batch[i], shifted[1])
            results["ok" if ok else "fail"] += 1
            if not ok:
                print(f"FAIL pooled_norm config {cfg}: sequence {i} differs alone / shifted / in its batch")


def check_activation():
    for dt, B, L in [(torch.float32, 5, 1), (torch.float32, 6, 2), (torch.float16, 3, 40),
                     (torch.bfloat16, 9, 70), (torch.float32, 2, 1000)]:
        lg = torch.randn(B, L, dtype=dt) * 4
        for kind in ("softmax", "sigmoid", "identity"):
            for bias, scale in [(None, None), (0.5, None), (0.25, 2.0), (torch.tensor(0.3), torch.randn(L))]:
                close(f"activation {dt} {kind} B={B} L={L} bias={bias is not None}",
                      co.activation(lg, kind, bias, scale), ref.activation(lg, kind, bias, scale), torch.float32)


def check_dispatcher():
    """torch.ops.pyengine.* gives what the eager fast path gives."""
    x, r, w = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(64)
    a, b = torch.ops.pyengine.add_rms_norm(x, r, w, 1e-6, 1.0), co.add_rms_norm(x, r, w, 1e-6, 1.0)
    close("dispatcher add_rms_norm", a[0], b[0], torch.bfloat16)
    q, k = torch.randn(3, 2, 16), torch.randn(3, 1, 16)
    q2, k2 = q.clone(), k.clone()
    pos, cs = torch.tensor([0, 1, 2]), torch.randn(4, 16)
    torch.ops.pyengine.rotary(q, k, pos, cs, False)
    co.rotary(q2, k2, pos, cs, False)
    close("dispatcher rotary", q, q2, torch.float32)
    # A pooled_norm config crosses the op schema as plain ints.
    cu = cu_of([1, 4])
    cfg = {"variant": "slices", "slice_rows": 2, "warps": 2, "rows_per_warp": 2, "blocks_per_sm": 0}
    a = torch.ops.pyengine.pooled_norm(x, cu, "mean", "rms", w, None, 1e-6, 1.0, r, [1, 2, 2, 2, 0])
    b = co.pooled_norm(x, cu, "mean", "rms", w, None, 1e-6, 1.0, r, config=cfg)
    ok = torch.equal(a, b)
    results["ok" if ok else "fail"] += 1
    if not ok:
        print("FAIL dispatcher pooled_norm config")


CHECKS = {"add_rms_norm": (check_norms,), "add_layer_norm": (check_norms,), "rotary": (check_rotary,),
          "gather_pooled": (check_pooling,), "pooled_norm": (check_pooling, check_pooled_configs),
          "pooled_mean": (check_pooled_mean,), "pooled_configs": (check_pooled_configs,),
          "activation": (check_activation,)}

if __name__ == "__main__":
    torch.manual_seed(0)
    random.seed(0)
    wanted = sys.argv[1:] or ["all"]
    bad = [w for w in wanted if w != "all" and w not in CHECKS]
    if bad:
        sys.exit(f"unknown op(s) {bad}; expected among {sorted(CHECKS)} or all")
    groups = CHECKS.values() if "all" in wanted else (CHECKS[w] for w in wanted)
    fns = list(dict.fromkeys(fn for group in groups for fn in group))
    for fn in fns + [check_dispatcher]:
        fn()
    print(f"cuda_emu: {results['ok']} passed, {results['fail']} failed")
    sys.exit(1 if results["fail"] else 0)
