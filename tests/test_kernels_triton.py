"""Triton kernels (pyengine.kernels) against the torch references in pyengine.ops.

On CPU these run in the Triton interpreter (TRITON_INTERPRET=1 from conftest), so shapes
stay small: fp32 and fp16 only, since the interpreter's bf16 arithmetic is not faithful.
Tests marked gpu use bf16 and realistic shapes. Every output buffer the kernels allocate
is filled with NaN first (see `poisoned`), so an element a kernel forgets to write fails.
"""
import importlib
import inspect
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from pyengine import ops  # noqa: E402
from kernel_refs import (FP16, FP32, activation64, assert_close, attention64, cu_seqlens,  # noqa: E402
                         gated64, gather64, layer_norm64, positions, rms_norm64, rotary64)
from pyengine.kernels import _validate as _v, pooled_query_attention as pqa, varlen_attention as va  # noqa: E402
from pyengine.kernels.gated_act import _erf  # noqa: E402

KERNEL_OPS = ("varlen_attention", "pooled_query_attention", "gather_pooled", "activation", "add_layer_norm", "add_rms_norm",
              "rotary", "gated_act", "embed_layer_norm", "pooled_norm")
DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(FP16, id="fp16")]
MIXED = [1, 17, 65]  # a 1-token sequence, a partial block, one full 64-block plus a 1-row tail


def _mod(op):
    return importlib.import_module(f"pyengine.kernels.{op}")


def _kernel(op):
    return getattr(_mod(op), op)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating tensor the kernels' launchers allocate starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))


def test_resolve_ops_triton_picks_every_kernel():
    # conftest sets TRITON_INTERPRET=1, which makes the triton backend available on CPU.
    assert os.environ.get("TRITON_INTERPRET") == "1"
    chosen = ops.resolve_ops("triton", "cpu")
    for op in KERNEL_OPS:
        assert op in ops.OP_NAMES
        assert chosen.chosen[op] == "triton", f"{op} resolved to {chosen.chosen[op]}"
        assert getattr(chosen, op) is _kernel(op)


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_public_signature_matches_reference(op):
    assert inspect.signature(_kernel(op)) == inspect.signature(getattr(ops, op))


# ----------------------------------------------------------------------------------------
# varlen attention
# ----------------------------------------------------------------------------------------

def _qkv(lens, Hq, Hkv, D, dtype, seed=0):
    T = sum(lens)
    return (_randn(T, Hq, D, seed=seed, dtype=dtype), _randn(T, Hkv, D, seed=seed + 1, dtype=dtype),
            _randn(T, Hkv, D, seed=seed + 2, dtype=dtype))


def _check_attention(lens, Hq, Hkv, D, tol, causal, window=None, scale=None, block_m=None,
                     block_n=None, seed=0, config=None, softcap=None):
    dtype = tol[0]
    q, k, v = _qkv(lens, Hq, Hkv, D, dtype, seed)
    cu = cu_seqlens(lens)
    launch = _mod("varlen_attention")._launch
    out = launch(q, k, v, cu, max(lens), causal, scale, window, block_m, block_n, config=config, softcap=softcap)
    assert out.dtype == dtype and out.shape == q.shape
    what = (f"lens={lens} Hq={Hq} Hkv={Hkv} D={D} {dtype} causal={causal} window={window} config={config} "
            f"softcap={softcap}")
    # The reference on the same values in fp32: the kernel accumulates in fp32 too.
    ref = ops.varlen_attention(q.float(), k.float(), v.float(), cu, max(lens), causal, scale, window, softcap)
    assert_close(out, ref, tol, what + " vs reference")
    # And against per-sequence float64 attention (no packing, explicit mask).
    assert_close(out, attention64(q, k, v, lens, causal, scale, window, softcap), tol, what + " vs float64")


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("D,heads", [
    (64, (2, 2)),   # MHA
    (64, (4, 1)),   # GQA 4:1: query head h reads kv head h // 4
    (128, (4, 1)),  # the D=128 config (8 warps on GPU), GQA
], ids=["64-mha", "64-gqa4", "128-gqa4"])
def test_varlen_attention_default_config(tol, causal, D, heads):
    # MIXED with the production blocks (BLOCK_M=128, BLOCK_N=64): len 65 crosses one key
    # block into a masked tail, len 1 runs a single masked row, causal skips key blocks
    # past the diagonal.
    _check_attention(MIXED, *heads, D, tol, causal)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("lens", [
    [1],            # a lone one-token sequence: every key block is the masked tail
    [17],           # one partial query block
    [65],           # five 16-row query blocks; causal walks the diagonal block by block
    [65, 1, 17, 1],  # long first, one-token sequences between: bounds from cu_seqlens
    [5, 0, 9],      # an empty sequence: its programs exit at once, neighbours unaffected
], ids=["1", "17", "65", "mix", "empty"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_varlen_attention_small_blocks(lens, causal):
    # 16x16 blocks reach the three-phase loop (masked head, unmasked middle, masked tail).
    _check_attention(lens, 2, 1, 32, FP32, causal, block_m=16, block_n=16)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("D", [16, 32, 80, 96])  # 80/96 pad to 128 inside (masked columns)
def test_varlen_attention_head_dims(D):
    _check_attention(MIXED, 2, 1, D, FP32, True, block_m=32, block_n=16)


@pytest.mark.parametrize("shape, view, hinted", [
    ((9, 4, 72), None, True),       # head stride 72: a multiple of 8 Triton cannot see
    ((9, 4, 64), None, False),      # every stride a multiple of 16: Triton sees it, no hint
    ((9, 4, 36), None, False),      # head stride 36: rows not 16-byte aligned, no claim
    ((9, 3, 4, 72), 1, True),       # q of a fused (T, 3, H, 72) qkv: token stride 864
    ((9, 4, 80), 72, False),        # the first 72 of 80 columns: strides 320 and 80, seen
])
def test_attention_stride_hint(shape, view, hinted):
    from pyengine.kernels import _validate
    t = torch.zeros(shape)
    if len(shape) == 4:
        t = t.unbind(view)[0]
    elif view:
        t = t[..., :view]
    assert _validate.rows_aligned(t, t) is hinted


@pytest.mark.usefixtures("poisoned")
def test_head_dim_off_the_multiples_of_16():
    # 72 (SigLIP-so400m) in fp16: both attention kernels take their CONFIGS_PADDED tiles.
    va = _mod("varlen_attention")
    assert va.config_for(torch.float16, 72) == va.CONFIGS_PADDED[128]
    assert va.config_for(torch.float16, 72, rows_16b=True) == va.CONFIGS[128]  # 16-byte loads: unpadded tiles
    assert va.config_for(torch.float16, 80) == va.CONFIGS[128]  # a multiple of 16 keeps the table's
    _check_attention(MIXED, 2, 1, 72, FP16, False)
    _check_pooled(MIXED, "mix", 2, 1, 72, FP16, True)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("window,causal", [
    ((5, 3), False),    # both sides bounded: masked blocks on both ends, a full middle
    ((20, -1), False),  # left only (Mistral-style): key blocks before the window skipped
    ((20, -1), True),   # sliding causal window
    ((0, 0), False),    # only the token itself
    ((-1, 0), False),   # right=0 without causal flag behaves causally
    ((-1, -1), True),   # both unbounded: the no-window kernel
], ids=["5-3", "left20", "left20-causal", "self", "right0", "unbounded"])
def test_varlen_attention_window(window, causal):
    _check_attention(MIXED, 2, 2, 16, FP32, causal, window=window, block_m=16, block_n=16)


@pytest.mark.usefixtures("poisoned")
def test_varlen_attention_fp16_window_gqa():
    _check_attention(MIXED, 4, 1, 64, FP16, True, window=(24, -1), block_m=32, block_n=16)


@pytest.mark.usefixtures("poisoned")
def test_varlen_attention_strided_views_and_scale():
    # q, k, v as views of one fused (T, Hq + 2 Hkv, D) projection: token stride != H * D.
    lens = [9, 33]
    T, Hq, Hkv, D = sum(lens), 4, 2, 32
    qkv = _randn(T, Hq + 2 * Hkv, D, seed=5)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=1)
    assert not q.is_contiguous()
    out = _kernel("varlen_attention")(q, k, v, cu_seqlens(lens), 33, causal=False, scale=0.2)
    assert_close(out, attention64(q, k, v, lens, False, 0.2), FP32, "strided views")


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("Hq,Hkv,group,causal,window", [
    (4, 1, 2, True, None),      # two of four heads per program, causal diagonal per token
    (4, 1, 4, False, None),     # the whole kv group in one program
    (8, 2, 2, True, (5, -1)),   # several kv heads, a sliding window masks per token row
    (8, 1, 8, False, (3, 3)),   # eight heads per program under a two-sided window
], ids=["g2-causal", "g4-bidir", "g2-window", "g8-band"])
def test_varlen_attention_grouped_heads(Hq, Hkv, group, causal, window):
    """GROUP query heads of one kv group stacked as tile rows give the same attention."""
    lens = [1, 17, 40, 9]
    q, k, v = _qkv(lens, Hq, Hkv, 16, torch.float32, seed=11)
    cu = cu_seqlens(lens)
    out = _mod("varlen_attention")._launch(q, k, v, cu, max(lens), causal, None, window, config=(16, 16, 4, 1, group))
    what = f"Hq={Hq} Hkv={Hkv} GROUP={group} causal={causal} window={window}"
    assert_close(out, attention64(q, k, v, lens, causal, None, window), FP32, what + " vs float64")


def test_varlen_attention_group_must_divide_the_kv_group():
    q, k, v = _qkv([4, 4], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"GROUP=4 heads per program must divide Hq / Hkv = 2"):
        _mod("varlen_attention")._launch(q, k, v, cu_seqlens([4, 4]), 4, config=(16, 16, 4, 1, 4))
    q, k, v = _qkv([4, 4], 6, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"GROUP=3 .* a power of two"):
        _mod("varlen_attention")._launch(q, k, v, cu_seqlens([4, 4]), 4, config=(16, 16, 4, 1, 3))


# BLOCK_N_FULL: the unmasked middle range in 32-key blocks, the rest in 16-key blocks.
# Without a window the middle of a 16-row query tile at m0 is [0, 16 * (len // 16))
# bidirectional and [0, m0) causal, so 20 / 64 / 90 tokens and the causal tiles at m0 =
# 16 / 32 / 48 reach a middle shorter than one wide block, a whole number of them and
# wide blocks plus a 16-key remainder.
WIDE = (16, 16, 4, 1, 1, 32)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("lens", [
    [20],              # bidir: 16-key middle, one narrow block, no wide one; masked 4-key tail
    [64],              # bidir: two wide blocks exactly, no remainder, no masked tail
    [90],              # bidir: two wide + one narrow + masked tail; causal m0=48/80: wide + remainder
    [90, 1, 20, 64],   # all of them in one batch, a one-token sequence between
], ids=["short", "exact", "remainder", "mix"])
def test_varlen_attention_wide_middle(lens, causal, tol):
    _check_attention(lens, 4, 2, 32, tol, causal, config=WIDE)  # GQA 2:1


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("window,causal", [
    ((40, 40), False),  # middle [m0 - 16, m0 + 32): wide blocks from keys 16, 32, 48 + remainder
    ((50, -1), True),   # sliding causal window: m0=80 has one wide block starting at key 48
], ids=["40-40", "left50-causal"])
def test_varlen_attention_wide_middle_window(window, causal):
    _check_attention([90, 20], 2, 2, 16, FP32, causal, window=window, config=WIDE)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("causal,window", [
    (True, None),       # two heads per program over the wide and narrow causal middle
    (False, (40, 40)),  # a two-sided window, each stacked head row masked per token
], ids=["causal", "band"])
def test_varlen_attention_wide_middle_grouped_heads(tol, causal, window):
    _check_attention([90, 20], 4, 1, 16, tol, causal, window=window, config=(16, 16, 4, 1, 2, 32))


@pytest.mark.usefixtures("poisoned")
def test_varlen_attention_wide_middle_of_four_blocks():
    # BLOCK_N_FULL = 4 * BLOCK_N: 90 tokens bidirectional run one 64-key block, then a
    # 16-key narrow block and the masked tail; 64 tokens one wide block only.
    _check_attention([90, 64], 2, 1, 16, FP32, False, config=(16, 16, 4, 1, 1, 64))


@pytest.mark.parametrize("config,match", [
    ((16, 16, 4, 1, 1, 24), r"BLOCK_N_FULL=24 must be a power of two and a multiple of BLOCK_N=16"),
    ((16, 32, 4, 1, 1, 16), r"BLOCK_N_FULL=16 must be a power of two and a multiple of BLOCK_N=32"),
    ((16, 16, 4, 1, 1, 0), r"positive ints, got \(16, 16, 4, 1, 1, 0\)"),
    ((16, 16, 4, 1, 1, 32, 1), r"config must be \(BLOCK_M, BLOCK_N, num_warps, num_stages\[, GROUP\[, BLOCK_N_FULL"),
], ids=["not-pow2", "not-multiple", "zero", "too-long"])
def test_varlen_attention_bad_block_n_full(config, match):
    q, k, v = _qkv([4, 4], 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        _mod("varlen_attention")._launch(q, k, v, cu_seqlens([4, 4]), 4, config=config)


def test_varlen_attention_tile_map():
    """The work list: one entry per (sequence, query block) in order, the tile count and
    each sequence's first tile; an empty sequence has none."""
    va = _mod("varlen_attention")
    lens = [5, 0, 16, 17, 1]
    tile_seq, tile_info, n = va.tile_map(cu_seqlens(lens), sum(lens), 16)
    expect = [0, 2, 3, 3, 4]  # ceil(len / 16) tiles each
    assert n == math.ceil(sum(lens) / 16) + len(lens) >= len(expect)
    assert tile_info.tolist() == [len(expect), 0, 1, 1, 2, 4]
    assert tile_seq[:len(expect)].tolist() == expect
    many = [(7 * i) % 40 for i in range(37)]  # several 8-wide blocks of sequences, empty ones too
    tile_seq, tile_info, _ = va.tile_map(cu_seqlens(many), sum(many), 16, block_b=8)
    expect = [i for i, n_ in enumerate(many) for _ in range(math.ceil(n_ / 16))]
    assert tile_info[0].item() == len(expect) and tile_seq[:len(expect)].tolist() == expect


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v, cu: (q.double(), k, v, cu), "q.dtype"),
    (lambda q, k, v, cu: (q, k.half(), v, cu), "share a dtype"),
    (lambda q, k, v, cu: (q[:, :3], k, v, cu), r"Hq \(3\) must be a multiple of Hkv \(2\)"),
    (lambda q, k, v, cu: (q, k, v[:-1], cu), "same shape"),
    (lambda q, k, v, cu: (q, k, v, cu.long()), "cu_seqlens.dtype must be int32"),
    (lambda q, k, v, cu: (q.transpose(1, 2), k, v, cu), "q must be contiguous in its last dim"),
    # cu_seqlens values, checked where they sit on the host (a bad one would index out of bounds)
    (lambda q, k, v, cu: (q, k, v, cu + 1), "cu_seqlens must start at 0, got 1"),
    (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 3, 10], dtype=torch.int32)), r"must end at T=8 .*got 10"),
    (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 6, 4, 8], dtype=torch.int32)), "must not decrease"),
])
def test_varlen_attention_validation(bad, match):
    q, k, v = _qkv([4, 4], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        _kernel("varlen_attention")(*bad(q, k, v, cu_seqlens([4, 4])), 4)


@pytest.mark.parametrize("op", ["varlen_attention", "pooled_query_attention"])
@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), True, "50"])
def test_attention_softcap_validation(op, softcap):
    q, k, v = _qkv([4, 4], 4, 2, 16, torch.float32)
    cu = cu_seqlens([4, 4])
    args = (q, k, v, cu, 4) if op == "varlen_attention" else (q[:2], k, v, cu, 4, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="softcap must be None or a positive number"):
        _kernel(op)(*args, softcap=softcap)


# ----------------------------------------------------------------------------------------
# pooled-query attention
# ----------------------------------------------------------------------------------------

def _q_pos(lens, kind):
    """(B,) int64 query positions: "cls" 0, "last" len-1, "mid" len//2, "mix" cycles them."""
    pick = {"cls": lambda n, i: 0, "last": lambda n, i: n - 1, "mid": lambda n, i: n // 2,
            "mix": lambda n, i: (0, n - 1, n // 2)[i % 3]}[kind]
    return torch.tensor([pick(n, i) for i, n in enumerate(lens)], dtype=torch.int64)


def _check_pooled(lens, kind, Hq, Hkv, D, tol, causal, window=None, scale=None, block_n=None, seed=0, softcap=None):
    dtype = tol[0]
    q_all, k, v = _qkv(lens, Hq, Hkv, D, dtype, seed)
    cu = cu_seqlens(lens)
    pos = _q_pos(lens, kind)
    rows = cu[:-1].long() + pos
    q = q_all[rows]
    out = _mod("pooled_query_attention")._launch(q, k, v, cu, max(lens), pos, causal, scale, window, block_n,
                                                 softcap=softcap)
    assert out.dtype == dtype and out.shape == q.shape
    what = (f"lens={lens} q_pos={pos.tolist()} Hq={Hq} Hkv={Hkv} D={D} {dtype} causal={causal} window={window} "
            f"softcap={softcap}")
    ref = ops.pooled_query_attention(q.float(), k.float(), v.float(), cu, max(lens), pos, causal, scale, window,
                                     softcap)
    assert_close(out, ref, tol, what + " vs reference")
    # Full float64 attention per sequence, read at the pooled rows.
    assert_close(out, attention64(q_all, k, v, lens, causal, scale, window, softcap)[rows], tol,
                 what + " vs float64")


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", ["cls", "last", "mid"])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 1, 64), (2, 2, 16)], ids=["gqa4-64", "mha-16"])
def test_pooled_query_attention(tol, causal, kind, Hq, Hkv, D):
    # MIXED with the production blocks: len 65 crosses key blocks, len 1 is a single key;
    # causal with q_pos = 0 sees one key, with len-1 the whole sequence, mid half of it.
    _check_pooled(MIXED, kind, Hq, Hkv, D, tol, causal)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("window,causal,kind", [
    ((5, 3), False, "mid"),     # bounded both sides: the first key block starts mid-block
    ((20, -1), True, "last"),   # sliding causal window from the last token
    ((0, 0), False, "mix"),     # only the token itself
    ((-1, -1), True, "mix"),    # both unbounded: the no-window kernel
], ids=["5-3", "left20-causal", "self", "unbounded"])
def test_pooled_query_attention_window(window, causal, kind):
    _check_pooled([65, 1, 17, 40], kind, 4, 1, 16, FP32, causal, window=window, block_n=16)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("causal,window", [(True, (8, 0)), (False, None)], ids=["causal-window", "bidir"])
def test_soft_capped_attention(tol, causal, window):
    # Gemma 2's tanh cap on the scores, small enough here (scale 2) to bend most of them;
    # masked blocks (the window, sequence ends) and unmasked ones both go through it.
    _check_attention(MIXED, 4, 2, 16, tol, causal, window=window, scale=2.0, block_m=16, block_n=16, softcap=3.0)
    _check_pooled(MIXED, "mix", 4, 2, 16, tol, causal, window=window, scale=2.0, block_n=16, softcap=3.0)


@pytest.mark.usefixtures("poisoned")
def test_pooled_query_attention_fp16_gqa_padded_head_dim():
    # g = 8 rows padded to 16, head dim 80 padded to 128, several 16-key blocks.
    _check_pooled(MIXED, "mix", 8, 1, 80, FP16, True, window=(24, -1), scale=0.1, block_n=16)


@pytest.mark.usefixtures("poisoned")
def test_varlen_attention_max_seqlen_is_only_a_hint():
    # The tiles come from cu_seqlens: a max_seqlen short of the longest sequence (0
    # included) changes nothing, and every row is written.
    lens = [3, 5]
    q, k, v = _qkv(lens, 2, 1, 16, torch.float32)
    want = attention64(q, k, v, lens, False, 16 ** -0.5)
    for max_seqlen in (0, 2, 5):
        out = _kernel("varlen_attention")(q, k, v, cu_seqlens(lens), max_seqlen)
        assert_close(out, want, FP32, f"max_seqlen={max_seqlen}")


@pytest.mark.usefixtures("poisoned")
def test_pooled_query_attention_views_and_empty_sequence():
    # k and v as views of a fused (T, 2, Hkv, D) projection (as BERT's last layer passes
    # them), q a strided view; an empty sequence gets zeros, its neighbours are unaffected.
    lens = [9, 0, 33]
    T, Hq, Hkv, D = sum(lens), 4, 2, 32
    kv = _randn(T, 2, Hkv, D, seed=7)
    k, v = kv[:, 0], kv[:, 1]
    q_all = _randn(T, Hq, D, seed=8)
    pos = torch.tensor([8, 0, 5])
    rows = cu_seqlens(lens)[:-1].long() + pos
    q = _randn(3, Hq, 2 * D, seed=9)[:, :, :D]
    q[[0, 2]] = q_all[rows[[0, 2]]]
    assert not q.is_contiguous() and not k.is_contiguous()
    out = _kernel("pooled_query_attention")(q, k, v, cu_seqlens(lens), 33, pos, causal=False, scale=0.2)
    ref = attention64(q_all, k, v, lens, False, 0.2)
    assert_close(out[[0, 2]], ref[rows[[0, 2]]], FP32, "strided views")
    assert torch.equal(out[1], torch.zeros(Hq, D)), "an empty sequence's output must be zeros"


def test_attention_offsets_past_int32_in_a_long_sequence():
    """A position times the token stride passes 2^31 (views of a fused qkv row over a long
    sequence: 2^31 / ((Hq + 2 Hkv) D) tokens) while one tile stays below it. Here a token
    stride of 2^27 + 8 with 17 tokens: token 16 sits 2^31 + 128 elements in. The buffer
    is 4 GiB of address space; only the rows written are touched."""
    S, T, D = 2 ** 27 + 8, 17, 16
    buf = torch.empty(16 * S + 64, dtype=torch.float16)
    q, k, v = (buf.as_strided((T, 1, D), (S, D, 1), off) for off in (0, D, 2 * D))
    g = torch.Generator().manual_seed(3)
    for t in (q, k, v):
        t.copy_(torch.randn(T, 1, D, generator=g).half())
    cu = cu_seqlens([T])
    ref = attention64(q.contiguous(), k.contiguous(), v.contiguous(), [T], True, D ** -0.5)
    # two query tiles and two key blocks of 16: the second of each starts at token 16
    out = va._launch(q, k, v, cu, T, True, block_m=16, block_n=16)
    assert_close(out, ref, FP16, "varlen_attention, long sequence")
    last = pqa._launch(q[T - 1:].contiguous(), k, v, cu, T, torch.tensor([T - 1]), True, block_n=16)
    assert_close(last, ref[T - 1:], FP16, "pooled_query_attention, long sequence")
    # A tile past int32 (a stride of 2^27 + 8 over 32 rows) is refused, not read wrong.
    with pytest.raises(ValueError, match=r"varlen_attention: q's strides \(134217736, 16, 1\) put 32 token\(s\) "
                                         r"of its 1 heads \d+ elements apart, past int32 offsets"):
        va._launch(q, k, v, cu, T, True, block_m=32, block_n=16)
    # The usual shapes keep the plain offsets (the code the configs were measured on).
    assert not _v.long_offsets(16384, *(torch.empty(1, 24, 128) for _ in range(3)))
    assert _v.long_offsets(T, q, k, v)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v, cu, p: (q.double(), k, v, cu, p), "q.dtype"),
    (lambda q, k, v, cu, p: (q, k.half(), v, cu, p), "share a dtype"),
    (lambda q, k, v, cu, p: (q[:, :3], k, v, cu, p), r"Hq \(3\) must be a multiple of Hkv \(2\)"),
    (lambda q, k, v, cu, p: (q, k, v[:-1], cu, p), "same shape"),
    (lambda q, k, v, cu, p: (q, k, v, cu.long(), p), "cu_seqlens.dtype must be int32"),
    (lambda q, k, v, cu, p: (q[:1], k, v, cu, p[:1]), r"cu_seqlens must be \(B\+1,\) = \(2,\)"),
    (lambda q, k, v, cu, p: (q, k, v, cu, p[:1]), r"q_pos must be a \(2,\) tensor"),
    (lambda q, k, v, cu, p: (q, k, v, cu, p.float()), "q_pos.dtype must be int64 or int32"),
    (lambda q, k, v, cu, p: (q.transpose(1, 2), k, v, cu, p), "q must be contiguous in its last dim"),
])
def test_pooled_query_attention_validation(bad, match):
    _, k, v = _qkv([4, 4], 4, 2, 16, torch.float32)
    q = _randn(2, 4, 16, seed=3)
    q_, k_, v_, cu_, p_ = bad(q, k, v, cu_seqlens([4, 4]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="^pooled_query_attention: .*" + match):
        _kernel("pooled_query_attention")(q_, k_, v_, cu_, 4, p_)


# ----------------------------------------------------------------------------------------
# the other ops
# ----------------------------------------------------------------------------------------

@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
@pytest.mark.parametrize("lens,H", [
    (MIXED, 96),          # mean loops 65 rows in BLOCK_T steps; H not a power of two
    ([3, 2], 1500),       # H past one 1024-wide block: a second program along H
], ids=["mixed", "wide"])
def test_gather_pooled(tol, pooling, lens, H):
    h = _randn(sum(lens), H, seed=10, dtype=tol[0])
    out = _kernel("gather_pooled")(h, cu_seqlens(lens), pooling)
    assert out.dtype == h.dtype
    assert_close(out, ops.gather_pooled(h, cu_seqlens(lens), pooling), tol, pooling)
    assert_close(out, gather64(h, lens, pooling), tol, pooling + " vs float64")


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("op", ["gather_pooled", "pooled_norm"])
@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
def test_empty_sequences_pool_to_nan(op, pooling):
    # Empty first, middle and last sequences: NaN rows (mean's 0 / 0, and no row to take
    # for cls / last, none read out of bounds), their neighbours as the reference.
    lens, H = [0, 3, 0, 2, 0], 40
    h, cu = _randn(sum(lens), H, seed=31), cu_seqlens(lens)
    if op == "gather_pooled":
        out, want = _kernel(op)(h, cu, pooling), ops.gather_pooled(h, cu, pooling)
    else:
        w, b = _randn(H, seed=32), _randn(H, seed=33)
        out, want = _kernel(op)(h, cu, pooling, "layer", w, b, 1e-5), ops.pooled_norm(h, cu, pooling, "layer", w, b,
                                                                                       1e-5)
    empty = torch.tensor([n == 0 for n in lens])
    assert out[empty].isnan().all() and want[empty].isnan().all()
    assert_close(out[~empty], want[~empty], FP32, f"{op} {pooling} beside empty sequences")



@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "identity"])
@pytest.mark.parametrize("bias,scale", [
    (None, None),                       # plain activation
    (0.7, 2.5),                         # scalar arguments (PoolerConfig floats)
    ("vec", "scalar_tensor"),           # per-label bias vector, 0-d scale tensor
], ids=["none", "scalars", "tensors"])
@pytest.mark.parametrize("L", [1, 2, 7])  # one label (sigmoid heads), binary, odd width
def test_activation(kind, bias, scale, L):
    logits = _randn(5, L, seed=11, scale=4.0)
    if bias == "vec":
        bias = _randn(L, seed=12)
    if scale == "scalar_tensor":
        scale = torch.tensor(1.5)
    out = _kernel("activation")(logits, kind, bias, scale)
    assert out.dtype == torch.float32
    assert_close(out, ops.activation(logits, kind, bias, scale), FP32, kind)
    assert_close(out, activation64(logits, kind, bias, scale), FP32, kind + " vs float64")


def test_activation_extremes_and_fp16_input():
    logits = torch.tensor([[-200.0, 0.0, 200.0], [1e4, -1e4, 3.0]], dtype=torch.float16)
    for kind in ("softmax", "sigmoid"):
        out = _kernel("activation")(logits, kind)
        assert torch.isfinite(out).all(), out
        assert_close(out, ops.activation(logits, kind), FP32, kind)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_add_layer_norm(tol, residual, bias):
    dtype = tol[0]
    x = _randn(13, 96, seed=20, dtype=dtype)  # H=96 pads to 128: masked columns in the stats
    r = _randn(13, 96, seed=21, dtype=dtype) if residual else None
    w, b = _randn(96, seed=22), (_randn(96, seed=23) if bias else None)
    y, s = _kernel("add_layer_norm")(x, r, w, b, 1e-5)
    ry, rs = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert y.dtype == dtype and s.dtype == dtype
    assert_close(s, rs, (0, 0), "summed (rounded exactly like the reference)")
    assert_close(y, ry, tol, "normed")
    assert_close(y, layer_norm64(s, w, b, 1e-5), tol, "normed vs float64")
    if not residual:
        assert s is x


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_add_rms_norm(tol, residual, offset):
    dtype = tol[0]
    x = _randn(13, 96, seed=30, dtype=dtype)
    r = _randn(13, 96, seed=31, dtype=dtype) if residual else None
    w = _randn(96, seed=32)
    y, s = _kernel("add_rms_norm")(x, r, w, 1e-6, offset)
    ry, rs = ops.add_rms_norm(x, r, w, 1e-6, offset)
    assert_close(s, rs, (0, 0), "summed")
    assert_close(y, ry, tol, "normed")
    assert_close(y, rms_norm64(s, w, 1e-6, offset), tol, "normed vs float64")


@pytest.mark.usefixtures("poisoned")
def test_norms_leading_dims_and_strided_rows():
    # (2, 5, H) input, and a residual that is a row-strided view (a slice of a wider buffer).
    x = _randn(2, 5, 64, seed=33)
    r = _randn(2, 5, 80, seed=34)[..., :64]
    w, b = _randn(64, seed=35), _randn(64, seed=36)
    for got, ref in ((_kernel("add_layer_norm")(x, r, w, b, 1e-5), ops.add_layer_norm(x, r, w, b, 1e-5)),
                     (_kernel("add_rms_norm")(x, r, w, 1e-5), ops.add_rms_norm(x, r, w, 1e-5))):
        assert got[0].shape == x.shape and got[1].shape == x.shape
        assert_close(got[0], ref[0], FP32, "normed")
        assert_close(got[1], ref[1], FP32, "summed")


def _cos_sin(max_pos, R, seed):
    ang = torch.rand(max_pos, R // 2, generator=_gen(seed)) * 2 * math.pi
    return torch.cat([ang.cos(), ang.sin()], 1)


@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("D,R", [(64, 64), (64, 32), (80, 40)],
                         ids=["full", "partial", "partial-nonpow2"])  # R < D leaves a tail untouched
def test_rotary(tol, neox, D, R):
    dtype = tol[0]
    lens = [1, 17, 6]  # positions restart at 0 for each sequence
    pos = positions(lens)
    T = sum(lens)
    cos_sin = _cos_sin(20, R, 40)
    # q and k as views of a fused qkv buffer: strided token dim, in-place writes through views.
    qkv = _randn(T, 4 + 2 + 2, D, seed=41, dtype=dtype)
    q, k, _ = qkv.split([4, 2, 2], dim=1)
    q0, k0 = q.clone(), k.clone()
    v_before = qkv[:, 6:].clone()
    rq, rk = q.clone(), k.clone()
    ops.rotary(rq, rk, pos, cos_sin, neox)
    q1, k1 = _kernel("rotary")(q, k, pos, cos_sin, neox)
    assert q1 is q and k1 is k
    assert_close(q, rq, tol, "q")
    assert_close(k, rk, tol, "k")
    assert_close(q, rotary64(q0, pos, cos_sin, neox), tol, "q vs float64")
    assert_close(k, rotary64(k0, pos, cos_sin, neox), tol, "k vs float64")
    assert torch.equal(q[..., R:], q0[..., R:]), "features past R must be untouched"
    assert torch.equal(qkv[:, 6:], v_before), "v (beside q and k in the buffer) must be untouched"


def test_rotary_keys_only():
    # No query heads (q of shape (T, 0, D)): the keys are rotated as with queries present.
    pos = torch.tensor([0, 3, 1, 7])
    ang = _randn(8, 4, seed=34)
    cos_sin = torch.cat([ang.cos(), ang.sin()], 1)
    k = _randn(4, 2, 8, seed=35)
    want = ops.rotary(_randn(4, 1, 8, seed=36), k.clone(), pos, cos_sin)[1]
    _, got = _kernel("rotary")(torch.empty(4, 0, 8), k.clone(), pos, cos_sin)
    assert_close(got, want, FP32, "keys only")



@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", [pytest.param(FP32, id="fp32"), pytest.param((torch.float16, 2e-2, 4e-3), id="fp16")])
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("I", [80, 2100])  # 2100 > the 2048 block: a second program per row
def test_gated_act(tol, kind, I):
    dtype = tol[0]
    x = _randn(3, 2 * I, seed=50, dtype=dtype, scale=3.0)
    out = _kernel("gated_act")(x, kind)
    assert out.dtype == dtype and out.shape == (3, I)
    # fp16: the reference rounds act(gate) to fp16 before the product; the kernel does not.
    assert_close(out, ops.gated_act(x, kind), tol, kind)
    assert_close(out, gated64(x, kind), tol, kind + " vs float64")


@triton.jit
def _erf_probe(X, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, _erf(tl.load(X + offs, mask=offs < N)), mask=offs < N)


def test_erf_approximation_is_fp32_accurate():
    # The erf inside "gelu" (no libdevice) stays within ~2 ulp of float64 erf everywhere,
    # including the switch between its two polynomials at |x| = 0.9277 and the tails.
    x = torch.cat([torch.linspace(-6, 6, 24001), torch.tensor([0.0, 0.927734375, -0.927734375, 1e-30])])
    out = torch.empty_like(x)
    _erf_probe[(triton.cdiv(x.numel(), 8192),)](x, out, x.numel(), BLOCK=8192)
    err = (out.double() - x.double().apply_(math.erf)).abs()
    assert err.max() < 2.5e-7, f"max |erf error| {err.max():.3g} at x={x[err.argmax()]:.7g}"


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", [pytest.param(FP32, id="fp32"), pytest.param((torch.float16, 1e-2, 1e-2), id="fp16")])
@pytest.mark.parametrize("with_type,with_extra,with_bias", [
    (True, False, True),    # BERT: word + position + token type
    (True, True, True),     # Ernie: + task-type row
    (False, False, False),  # no type table (ids may be None), LayerNorm without bias
], ids=["bert", "ernie", "bare"])
def test_embed_layer_norm(tol, with_type, with_extra, with_bias):
    dtype = tol[0]
    lens = [4, 9]
    T = sum(lens)
    g = _gen(60)
    ids = torch.randint(0, 50, (T,), generator=g)
    tt = torch.randint(0, 2, (T,), generator=g) if with_type else None
    pos = positions(lens)
    word, pe = _randn(50, 96, seed=61, dtype=dtype), _randn(16, 96, seed=62, dtype=dtype)
    te = _randn(2, 96, seed=63, dtype=dtype) if with_type else None
    extra = _randn(96, seed=64, dtype=dtype) if with_extra else None
    w = _randn(96, seed=65)
    b = _randn(96, seed=66) if with_bias else None
    args = (ids, pos, tt, word, pe, te, w, b, 1e-12, extra)
    out = _kernel("embed_layer_norm")(*args)
    assert out.dtype == dtype and out.shape == (T, 96)
    # fp16: the reference rounds the embedding sum to fp16 before the norm; the kernel sums in fp32.
    assert_close(out, ops.embed_layer_norm(*args), tol, "embed_layer_norm")
    s = word.double()[ids] + pe.double()[pos]
    if with_type:
        s = s + te.double()[tt]
    if with_extra:
        s = s + extra.double()
    assert_close(out, layer_norm64(s, w, b, 1e-12), tol, "embed_layer_norm vs float64")


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
@pytest.mark.parametrize("norm_kind", [None, "layer", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_pooled_norm(tol, pooling, norm_kind, residual):
    dtype = tol[0]
    T = sum(MIXED)
    h = _randn(T, 96, seed=70, dtype=dtype)
    r = _randn(T, 96, seed=71, dtype=dtype) if residual else None
    w, b = _randn(96, seed=72), _randn(96, seed=73)
    args = (h, cu_seqlens(MIXED), pooling, norm_kind, w, b, 1e-6, 0.5, r)
    out = _kernel("pooled_norm")(*args)
    assert out.dtype == torch.float32 and out.shape == (3, 96)
    # Both compute from the same rounded hidden + residual, in fp32 after that.
    assert_close(out, ops.pooled_norm(*args), FP32[1:], f"{pooling}/{norm_kind}")


@pytest.mark.parametrize("norm_kind", [None, "layer", "rms"])
@pytest.mark.parametrize("lens", [
    [1, 100, 300, 7],        # T >= 64 B: the mean is cut into 3 slices per sequence
    [600],                   # one long sequence: 18 slices capped at 16
    [40, 0, 90],             # an empty sequence among sliced ones: NaN, as the reference
], ids=["sliced", "one-long", "empty"])
def test_pooled_norm_mean_slices(lens, norm_kind):
    """Mean pooling sums slices of each sequence in separate programs, then adds them up;
    checked against the reference and a float64 mean of the normed rows."""
    T, H = sum(lens), 96
    h, r = _randn(T, H, seed=80), _randn(T, H, seed=81)
    w, b = _randn(H, seed=82), _randn(H, seed=83)
    cu = cu_seqlens(lens)
    args = (h, cu, "mean", norm_kind, w, b, 1e-6, 0.0, r)
    out = _kernel("pooled_norm")(*args)
    ref = ops.pooled_norm(*args)
    assert_close(out, ref, FP32[1:], f"mean/{norm_kind} {lens}")
    x = (h + r).double()
    if norm_kind == "layer":
        x = torch.nn.functional.layer_norm(x, (H,), w.double(), b.double(), 1e-6)
    elif norm_kind == "rms":
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    ref64 = torch.stack([x[a:e].mean(0) for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    torch.testing.assert_close(out.double(), ref64, atol=1e-4, rtol=1e-4, equal_nan=True)


# ----------------------------------------------------------------------------------------
# launch-config candidates (SWEEP_CONFIGS, timed by python -m pyengine.bench kernels --op-sweep)
# ----------------------------------------------------------------------------------------

def _sweep(op):
    return [pytest.param(cfg, id=" ".join(f"{k}={v}" for k, v in cfg.items())) for cfg in _mod(op).SWEEP_CONFIGS]


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("config", _sweep("gated_act"))
def test_gated_act_sweep_configs(config):
    # I = 600: several column blocks for the narrow candidates, a masked tail for all.
    x = _randn(3, 2 * 600, seed=51, scale=3.0)
    for kind in ("silu", "gelu"):
        out = _mod("gated_act")._launch(x, kind, config=config)
        assert_close(out, ops.gated_act(x, kind), FP32, f"{kind} {config}")


@pytest.mark.parametrize("config", _sweep("qk_norm_rotary"))
def test_qk_norm_rotary_sweep_configs(config):
    # Heads that no candidate divides evenly (5 q, 3 k) and a 1-token sequence.
    lens, Hq, Hkv, D = [1, 4, 2], 5, 3, 16
    T = sum(lens)
    qkv = _randn(T, Hq + 2 * Hkv, D, seed=52, scale=2.0)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=1)
    qw, kw = 1 + 0.2 * _randn(D, seed=53), 1 + 0.2 * _randn(D, seed=54)
    pos, cos_sin = positions(lens), _cos_sin(8, D, 55)
    v0 = v.clone()
    rq, rk = ops.qk_norm_rotary(q.clone(), k.clone(), qw, kw, pos, cos_sin, 1e-6)
    _mod("qk_norm_rotary")._launch(q, k, qw, kw, pos, cos_sin, 1e-6, config=config)
    assert_close(q, rq, FP32, f"q {config}")
    assert_close(k, rk, FP32, f"k {config}")
    assert torch.equal(v, v0), "v (beside q and k in the buffer) must be untouched"


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("config", _sweep("gather_pooled"))
def test_gather_pooled_sweep_configs(config):
    lens = [1, 70, 9]  # 70 rows: several row tiles for every candidate
    h = _randn(sum(lens), 96, seed=56)
    out = _mod("gather_pooled")._launch(h, cu_seqlens(lens), "mean", config=config)
    assert_close(out, ops.gather_pooled(h, cu_seqlens(lens), "mean"), FP32, str(config))


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("config", _sweep("pooled_norm"))
def test_pooled_norm_sweep_configs(config):
    lens = [1, 40, 9]
    T = sum(lens)
    h, r = _randn(T, 96, seed=57), _randn(T, 96, seed=58)
    w, b = _randn(96, seed=59), _randn(96, seed=60)
    for norm_kind in ("layer", "rms"):
        args = (h, cu_seqlens(lens), "mean", norm_kind, w, b, 1e-6, 0.0, r)
        out = _mod("pooled_norm")._launch(*args, config=config)
        assert_close(out, ops.pooled_norm(*args), FP32[1:], f"{norm_kind} {config}")


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("tol", [FP16, FP32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("config", [
    {"warp_rows": 1, "block_t": 4, "num_warps": 4, "stages": 2},               # one row per warp, prefetched
    {"warp_rows": 1, "block_t": 2, "num_warps": 2, "splits": 8},               # slices past short sequences' ends
    {"warp_rows": 1, "block_t": 8, "num_warps": 4, "stages": 2, "splits": 1},  # two rows per warp, no workspace
    {"warp_rows": 1, "block_t": 4, "num_warps": 4, "async_stages": 3},          # Triton-pipelined loads
    {"warp_rows": 1, "block_t": 1, "num_warps": 1, "async_stages": 4, "splits": 1},  # one warp, no workspace
])
@pytest.mark.parametrize("H", [
    600,  # row chunks of 256 (fp16) or 128 (fp32) columns with a masked tail
    256,  # H == BLOCK_H: no column masked (EVEN_H)
])
def test_pooled_norm_warp_rows(tol, config, H):
    # Lengths 1 to 41 across slices and row tiles; every norm, with and without bias and
    # residual.
    lens = [1, 41, 3, 17]
    T, dt = sum(lens), tol[0]
    h, r = _randn(T, H, seed=63).to(dt), _randn(T, H, seed=64).to(dt)
    w, b = (1 + 0.3 * _randn(H, seed=65)).to(dt), _randn(H, seed=66).to(dt)
    for norm_kind, bias, res in (("layer", b, r), ("layer", None, None), ("rms", None, r), (None, None, r)):
        args = (h, cu_seqlens(lens), "mean", norm_kind, w, bias, 1e-5, 0.5 if norm_kind == "rms" else 0.0, res)
        out = _mod("pooled_norm")._launch(*args, config=config)
        ref = ops.pooled_norm(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                for a in args))
        assert_close(out, ref, (torch.float32,) + tuple(tol[1:]), f"{norm_kind} bias={bias is not None} "
                     f"res={res is not None} {config}")


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("rows_first", [False, True], ids=["chunks-rows-span", "rows-chunks-span"])
@pytest.mark.parametrize("H", [600, 256])
def test_pooled_norm_warp_rows_dimension_orders(monkeypatch, rows_first, H):
    # The tile's dimension order is chosen by triton version (_ROWS_FIRST); this
    # interpreter's triton takes one of them, so both are run here.
    monkeypatch.setattr(_mod("pooled_norm"), "_ROWS_FIRST", rows_first)
    lens = [1, 41, 3, 17]
    T = sum(lens)
    h, r = _randn(T, H, seed=68), _randn(T, H, seed=69)
    w, b = 1 + 0.3 * _randn(H, seed=70), _randn(H, seed=71)
    for config in ({"warp_rows": 1, "block_t": 4, "num_warps": 4, "stages": 2},
                   {"warp_rows": 1, "block_t": 2, "num_warps": 1, "async_stages": 3, "splits": 2}):
        for norm_kind, res in (("layer", r), ("rms", None)):
            args = (h, cu_seqlens(lens), "mean", norm_kind, w, b if norm_kind == "layer" else None, 1e-5, 0.0, res)
            out = _mod("pooled_norm")._launch(*args, config=config)
            assert_close(out, ops.pooled_norm(*args), FP32[1:], f"{norm_kind} {config} rows_first={rows_first}")


def test_pooled_norm_warp_rows_needs_a_wide_row():
    h = _randn(5, 64, seed=67).half()
    with pytest.raises(ValueError, match=r"warp_rows needs H >= 256 for torch.float16, got H=64"):
        _mod("pooled_norm")._launch(h, cu_seqlens([5]), "mean", "rms", torch.ones(64).half(), None, 1e-5,
                                    config={"warp_rows": 1})


def test_prefetching_mean_is_bit_identical():
    # "stages": 2 and "async_stages" only issue the next tiles' loads earlier: the same sums
    # in the same order.
    lens = [1, 70, 9]
    cu = cu_seqlens(lens)
    h, w = _randn(sum(lens), 96, seed=61), _randn(96, seed=62)
    g = _mod("gather_pooled")._launch
    assert torch.equal(g(h, cu, "mean", config={"stages": 2}), g(h, cu, "mean"))
    p = _mod("pooled_norm")._launch
    assert torch.equal(p(h, cu, "mean", "rms", w, None, 1e-6, config={"stages": 2}),
                       p(h, cu, "mean", "rms", w, None, 1e-6, config={"stages": 1}))
    # rows one per warp: registers one step ahead, or Triton's pipelined loads
    rows = {"warp_rows": 1, "block_t": 2, "num_warps": 2}
    plain = p(h, cu, "mean", "layer", w, w, 1e-6, config=rows)
    for extra in ({"stages": 2}, {"async_stages": 3}):
        assert torch.equal(p(h, cu, "mean", "layer", w, w, 1e-6, config={**rows, **extra}), plain), extra


@pytest.mark.parametrize("op,args,match", [
    ("gather_pooled", lambda: (torch.randn(4, 8), cu_seqlens([4]), "max"), "unknown pooling"),
    ("gather_pooled", lambda: (torch.randn(4, 8), cu_seqlens([4]).long(), "cls"), "cu_seqlens.dtype"),
    ("activation", lambda: (torch.randn(2, 3), "relu"), "unknown activation"),
    ("activation", lambda: (torch.randn(2, 3), "softmax", torch.ones(2)), "logit_bias must have 1 or L=3"),
    ("activation", lambda: (torch.randn(1, 32769), "softmax"), "L=32769 labels is past 32768, the widest row"),
    # a head-major view whose last head starts past int32 (2^31 + 32 elements in): refused
    ("rotary", lambda: (torch.empty(2 ** 31 + 64, dtype=torch.float16).as_strided((1, 2, 16), (16, 2 ** 31 + 32, 1)),
                        torch.randn(1, 1, 16).half(), torch.arange(1), torch.randn(4, 16)),
     r"q's strides \(16, 2147483680, 1\) put 1 token\(s\) of its 2 heads 2147483696 elements apart"),
    # ... and a pooled query whose heads span past int32 the same way
    ("pooled_query_attention",
     lambda: (torch.empty(2 ** 31 + 64, dtype=torch.float16).as_strided((1, 2, 16), (16, 2 ** 31 + 32, 1)),
              torch.randn(3, 1, 16).half(), torch.randn(3, 1, 16).half(), cu_seqlens([3]), 3, torch.tensor([2])),
     r"q's strides \(16, 2147483680, 1\) put 1 token\(s\) of its 2 heads 2147483696 elements apart"),
    ("add_layer_norm", lambda: (torch.randn(2, 8), torch.randn(2, 7), torch.ones(8), None, 1e-5), "residual"),
    ("add_rms_norm", lambda: (torch.randn(2, 8), None, torch.ones(7), 1e-5), r"weight must be \(8,\)"),
    ("rotary", lambda: (torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.arange(3), torch.randn(4, 10)),
     "R must be even and in"),
    ("gated_act", lambda: (torch.randn(2, 7), "silu"), "must be even"),
    ("gated_act", lambda: (torch.randn(2, 8), "relu"), "unknown gated activation"),
    ("embed_layer_norm", lambda: (torch.arange(3), torch.arange(4), None, torch.randn(5, 8),
                                  torch.randn(5, 8), None, torch.ones(8), None, 1e-5), r"positions must be \(3,\)"),
    ("pooled_norm", lambda: (torch.randn(4, 8), cu_seqlens([4]), "cls", "batch", torch.ones(8), None, 1e-5),
     "unknown norm_kind"),
    ("pooled_norm", lambda: (torch.randn(4, 8), cu_seqlens([4]), "cls", "rms", torch.ones(6), None, 1e-5),
     r"weight must be \(8,\)"),
])
def test_validation_messages(op, args, match):
    with pytest.raises(ValueError, match=match):
        _kernel(op)(*args())


# ----------------------------------------------------------------------------------------
# no recompilation on ragged shapes
# ----------------------------------------------------------------------------------------

# The constexpr parameters each kernel may have: head dims, block sizes and feature flags.
# Nothing derived from T, B or max_seqlen may appear here.
ALLOWED_CONSTEXPRS = {
    # SOFTCAP: a model's constant (Gemma 2), not a shape; ALIGNED_ROWS: from the strides,
    # which the head count and head dim set, not T or B; LONG_OFFSETS: on only where T times
    # a token stride passes 2^31 (batches of some 2^31 / ((Hq + 2 Hkv) D) tokens and more)
    "varlen_attention": {"HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "IS_CAUSAL", "HAS_WINDOW", "PRECISION",
                         "GROUP", "BLOCK_N_FULL", "SOFTCAP", "ALIGNED_ROWS", "LONG_OFFSETS"},
    "pooled_query_attention": {"HEAD_DIM", "BLOCK_D", "BLOCK_G", "BLOCK_N", "IS_CAUSAL", "HAS_WINDOW",
                               "PRECISION", "SOFTCAP", "ALIGNED_ROWS", "LONG_OFFSETS"},
    "gather_pooled": {"POOLING", "BLOCK_T", "BLOCK_H", "PREFETCH"},
    "activation": {"KIND", "BIAS_MODE", "SCALE_MODE", "BLOCK_L"},
    "add_layer_norm": {"HAS_RESIDUAL", "HAS_BIAS", "BLOCK_H"},
    "add_rms_norm": {"HAS_RESIDUAL", "BLOCK_H"},
    "rotary": {"HALF", "NEOX", "BLOCK_HALF", "BLOCK_HQ", "BLOCK_HK"},
    "gated_act": {"KIND", "BLOCK"},
    "embed_layer_norm": {"HAS_TYPE", "HAS_EXTRA", "HAS_BIAS", "BLOCK_H"},
    "pooled_norm": {"POOLING", "NORM", "HAS_BIAS", "HAS_RESIDUAL", "BLOCK_T", "BLOCK_H", "PREFETCH", "WARP_ROWS",
                    "EVEN_H", "ASYNC", "ROWS_FIRST"},
}


def _jit_kernel(op):
    return getattr(_mod(op), f"_{op}_kernel")


def _params(kernel):
    """(name, is_constexpr) of a @triton.jit function, interpreted or compiled."""
    fn = getattr(kernel, "fn", kernel)
    return [(p.name, p.annotation is tl.constexpr or "constexpr" in str(p.annotation))
            for p in inspect.signature(fn).parameters.values()]


def _unspecialised(kernel):
    """Names of the ints a kernel marks do_not_specialize (compiled or interpreted)."""
    marked = getattr(kernel, "do_not_specialize", None)
    if marked is None:
        marked = getattr(kernel, "kwargs", {}).get("do_not_specialize")
    names = [n for n, _ in _params(kernel)]
    return {names[m] if isinstance(m, int) else m for m in marked or ()}


def _spec_key(kernel, args, kwargs):
    """What Triton's JIT keys its compiled-kernel cache on: constexpr values, tensor
    dtypes and 16-byte alignment, and for plain ints whether they are 1, divisible by 16,
    and 32-bit (only the last for an int marked do_not_specialize)."""
    names = [n for n, _ in _params(kernel)]
    unspecialised = _unspecialised(kernel)
    constexpr = {n for n, c in _params(kernel) if c}
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    key = []
    for name in names:
        v = bound[name]
        if name in constexpr:
            key.append((name, v))
        elif isinstance(v, torch.Tensor):
            key.append((name, v.dtype, v.data_ptr() % 16 == 0))
        elif isinstance(v, bool):
            key.append((name, "i1", v))
        elif isinstance(v, int) and name in unspecialised:
            key.append((name, "int", -2 ** 31 <= v < 2 ** 31))
        elif isinstance(v, int):
            key.append((name, "int", v == 1, v % 16 == 0, -2 ** 31 <= v < 2 ** 31))
        elif isinstance(v, float):
            key.append((name, "fp32"))
        else:
            key.append((name, type(v).__name__, v))
    return tuple(key)


class _Recorder:
    """Stands in for a kernel: records each launch's specialisation key, then launches."""

    def __init__(self, kernel):
        self.kernel, self.keys, self.ints = kernel, [], []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.keys.append(_spec_key(self.kernel, args, kwargs))
            names = [n for n, _ in _params(self.kernel)]
            self.ints.append({n: v for n, v in zip(names, args)
                              if isinstance(v, int) and not isinstance(v, bool)})
            return launch(*args, **kwargs)
        return run


def _ragged_call(op, lens):
    """A call of `op` on a ragged batch with these lengths; model dims fixed."""
    T = sum(lens)
    cu, pos = cu_seqlens(lens), positions(lens)
    h = _randn(T, 32, seed=T)
    if op == "varlen_attention":
        q, k, v = _qkv(lens, 2, 1, 16, torch.float32, seed=T)
        return lambda f: f(q, k, v, cu, max(lens), True, None, (8, -1))
    if op == "pooled_query_attention":
        q, k, v = _qkv(lens, 4, 1, 16, torch.float32, seed=T)
        pos = cu[1:].long() - cu[:-1].long() - 1
        return lambda f: f(q[:len(lens)], k, v, cu, max(lens), pos, True, None, (8, -1))
    if op == "gather_pooled":
        return lambda f: f(h, cu, "mean")
    if op == "activation":
        return lambda f: f(_randn(len(lens), 3, seed=T), "softmax", 0.5, None)
    if op == "add_layer_norm":
        return lambda f: f(h, h.clone(), torch.ones(32), torch.zeros(32), 1e-5)
    if op == "add_rms_norm":
        return lambda f: f(h, h.clone(), torch.ones(32), 1e-5, 1.0)
    if op == "rotary":
        q, k = _randn(T, 4, 16, seed=T), _randn(T, 2, 16, seed=T + 1)
        return lambda f: f(q, k, pos, _cos_sin(80, 16, 0), True)
    if op == "gated_act":
        return lambda f: f(h, "silu")
    if op == "embed_layer_norm":
        ids = torch.arange(T) % 7
        return lambda f: f(ids, pos, ids % 2, _randn(7, 32, seed=1), _randn(80, 32, seed=2),
                           _randn(2, 32, seed=3), torch.ones(32), torch.zeros(32), 1e-12)
    if op == "pooled_norm":
        return lambda f: f(h, cu, "last", "rms", torch.ones(32), None, 1e-6, 0.0, None)
    raise KeyError(op)


# T = 1, 31, 32, 24; B = 1, 3, 2, 5; max_seqlen = 1, 17, 16, 9: they hit 1, multiples of
# 16 and neither, which would split Triton's cache if they reached the kernel as ints.
RAGGED = [[1], [1, 17, 13], [16, 16], [9, 2, 5, 1, 7]]


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_ragged_shapes_do_not_change_specialisation(op, monkeypatch):
    kernel = _jit_kernel(op)
    constexpr = {n for n, c in _params(kernel) if c}
    assert constexpr <= ALLOWED_CONSTEXPRS[op], f"unexpected constexprs {constexpr - ALLOWED_CONSTEXPRS[op]}"
    rec = _Recorder(kernel)
    monkeypatch.setattr(_mod(op), f"_{op}_kernel", rec)
    for lens in RAGGED:
        _ragged_call(op, lens)(_kernel(op))
    assert len(rec.keys) == len(RAGGED)
    # Stronger than the key: no runtime int takes a value that depends on the batch.
    for name in set(rec.ints[0]) - _unspecialised(kernel):
        values = {ints[name] for ints in rec.ints}
        assert len(values) == 1, f"int argument {name} varies with the ragged shape: {sorted(values)}"
    distinct = set(rec.keys)
    assert len(distinct) == 1, "specialisation differs across ragged batches:\n" + "\n".join(
        str([kv for kv in key if kv not in rec.keys[0]]) for key in distinct)


def test_pooled_norm_mean_slices_do_not_change_specialisation(monkeypatch):
    """Mean pooling cuts sequences into n_splits slices, a number that follows T / B: batches
    with 1, 2, 16 and 9 slices per sequence (1 and 16 would each split an int's cache entry)
    share one key in the kernel and in the kernel that sums the slices."""
    from pyengine.kernels import pooled_norm as mod
    recs = {name: _Recorder(getattr(mod, name)) for name in ("_pooled_norm_kernel", "_mean_finish_kernel")}
    for name, rec in recs.items():
        monkeypatch.setattr(mod, name, rec)
    # n_splits = min(16, T // (32 B)): 1, 2, 16 and 9
    batches = [[3, 5], [70, 60], [600], [300, 300]]
    splits = []
    for lens in batches:
        h = _randn(sum(lens), 32, seed=len(lens))
        splits.append(min(16, max(1, sum(lens) // (32 * len(lens)))))
        mod.pooled_norm(h, cu_seqlens(lens), "mean", "layer", torch.ones(32), torch.zeros(32), 1e-5)
    assert splits == [1, 2, 16, 9]
    for name, rec in recs.items():
        assert len(set(rec.keys)) == 1, f"{name}: specialisation differs across ragged batches:\n" + "\n".join(
            str([kv for kv in key if kv not in rec.keys[0]]) for key in set(rec.keys))
    assert len(recs["_mean_finish_kernel"].keys) == 3  # only batches with more than one slice sum them


# ----------------------------------------------------------------------------------------
# GPU: bf16, realistic shapes, the compiled cache
# ----------------------------------------------------------------------------------------

def _cache_entries(kernel):
    """Compiled variants held by a JITFunction (triton 3.x layouts)."""
    if hasattr(kernel, "device_caches"):
        return sum(len(c[0]) for c in kernel.device_caches.values())
    return sum(len(c) for c in kernel.cache.values())


def _mixed_lens(n, seed=0, lo=8, hi=512):
    g = torch.Generator().manual_seed(seed)
    lens = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(120)).round().clamp(lo, hi)
    return [int(x) for x in lens]


@pytest.mark.gpu
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_gpu_ragged_shapes_compile_once(op):
    kernel = _jit_kernel(op)
    calls = [_ragged_call(op, lens) for lens in RAGGED]

    def on_cuda(*args):
        return _kernel(op)(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])

    calls[0](on_cuda)  # compiles the one variant this feature set needs
    before = _cache_entries(kernel)
    for call in calls[1:]:
        call(on_cuda)
    torch.cuda.synchronize()
    assert _cache_entries(kernel) == before, f"{op} recompiled for a ragged shape"


@pytest.mark.gpu
@pytest.mark.parametrize("causal,Hq,Hkv,D,window", [
    (False, 12, 12, 64, None),     # BERT-base bidirectional
    (True, 16, 8, 128, None),      # Qwen3-0.6B style GQA 2:1
    (True, 12, 2, 128, None),      # Qwen2-1.5B style GQA 6:1
    (True, 8, 8, 256, None),       # Gemma head_dim 256
    (True, 16, 4, 96, (255, -1)),  # sliding window, padded head dim
])
def test_gpu_varlen_attention_bf16(causal, Hq, Hkv, D, window):
    lens = _mixed_lens(64, seed=1)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    cu = cu_seqlens(lens, "cuda")
    out = _kernel("varlen_attention")(q, k, v, cu, max(lens), causal, None, window)
    tol = (torch.bfloat16, 2e-2, 2e-2)
    assert_close(out, ops.varlen_attention(q, k, v, cu, max(lens), causal, None, window), tol, "vs reference")
    if window is None:
        # Per-sequence SDPA, the independent check at realistic sizes.
        start = 0
        for n in lens[:16]:
            qs, ks, vs = (x[start:start + n].transpose(0, 1) for x in (q, k, v))
            ref = torch.nn.functional.scaled_dot_product_attention(
                qs[None], ks[None], vs[None], is_causal=causal, enable_gqa=Hq != Hkv)[0].transpose(0, 1)
            assert_close(out[start:start + n], ref, tol, f"seq len {n} vs SDPA")
            start += n


def _wide_sweep_configs():
    va = _mod("varlen_attention")
    return [pytest.param(D, cfg, id=f"{D}-" + "-".join(map(str, cfg)))
            for D, configs in va.SWEEP_CONFIGS.items() for cfg in configs if len(cfg) > 5]


@pytest.mark.gpu
@pytest.mark.parametrize("D,config", _wide_sweep_configs())
def test_gpu_varlen_attention_wide_middle_sweep_configs(D, config):
    # The --attn-sweep candidates with BLOCK_N_FULL, on the sweep's cases (D=64
    # bidirectional MHA, D=128 causal GQA 2:1) against the reference in bf16.
    causal, Hq, Hkv = (False, 12, 12) if D == 64 else (True, 16, 8)
    lens = _mixed_lens(64, seed=3)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    cu = cu_seqlens(lens, "cuda")
    out = _mod("varlen_attention")._launch(q, k, v, cu, max(lens), causal, config=config)
    assert_close(out, ops.varlen_attention(q, k, v, cu, max(lens), causal), (torch.bfloat16, 2e-2, 2e-2),
                 f"config {config} vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_varlen_attention_fp32(D):
    # fp32 runs its dots as 3xTF32 on the GPU: still within fp32 tolerances of float64.
    lens = _mixed_lens(6, seed=4, hi=300)
    q, k, v = (x.cuda() for x in _qkv(lens, 4, 2, D, torch.float32, seed=9))
    out = _kernel("varlen_attention")(q, k, v, cu_seqlens(lens, "cuda"), max(lens), True)
    assert_close(out, attention64(q.cpu(), k.cpu(), v.cpu(), lens, True), (1e-4, 1e-4), "fp32 vs float64")


@pytest.mark.gpu
@pytest.mark.parametrize("causal,Hq,Hkv", [(True, 16, 16), (False, 12, 12), (True, 16, 8)])
def test_gpu_varlen_attention_matches_torch_varlen(causal, Hq, Hkv):
    from pyengine.bench.kernels import torch_varlen_fn
    varlen = torch_varlen_fn()
    if varlen is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    lens = _mixed_lens(32, seed=2)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, 128, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    cu = cu_seqlens(lens, "cuda")
    try:
        ref = varlen(q, k, v, cu, max(lens), causal)
    except (NotImplementedError, RuntimeError) as e:  # no GQA or no flash kernel for this GPU
        pytest.skip(f"torch varlen_attn cannot run this case: {e}")
    out = _kernel("varlen_attention")(q, k, v, cu, max(lens), causal)
    assert_close(out, ref, (2e-2, 2e-2), "vs torch.nn.attention.varlen")


@pytest.mark.gpu
def test_gpu_other_ops_bf16():
    tol = (torch.bfloat16, 2e-2, 2e-2)
    lens = _mixed_lens(64, seed=3)
    T, H = sum(lens), 1024
    cu = cu_seqlens(lens, "cuda")
    dev = dict(device="cuda", dtype=torch.bfloat16)
    x, r = torch.randn(T, H, **dev), torch.randn(T, H, **dev)
    w, b = torch.randn(H, device="cuda"), torch.randn(H, device="cuda")
    for got, ref in ((_kernel("add_layer_norm")(x, r, w, b, 1e-5), ops.add_layer_norm(x, r, w, b, 1e-5)),
                     (_kernel("add_rms_norm")(x, r, w, 1e-6, 1.0), ops.add_rms_norm(x, r, w, 1e-6, 1.0))):
        assert_close(got[1], ref[1], (0, 0), "summed")
        assert_close(got[0], ref[0], tol, "normed")
    for pooling in ("cls", "last", "mean"):
        assert_close(_kernel("gather_pooled")(x, cu, pooling), ops.gather_pooled(x, cu, pooling), tol, pooling)
        for nk in (None, "layer", "rms"):
            assert_close(_kernel("pooled_norm")(x, cu, pooling, nk, w, b, 1e-6, 0.0, r),
                         ops.pooled_norm(x, cu, pooling, nk, w, b, 1e-6, 0.0, r), (1e-3, 1e-3), f"{pooling}/{nk}")
    g = torch.randn(T, 2 * 3072, **dev)
    for kind in ("silu", "gelu_tanh", "gelu"):
        assert_close(_kernel("gated_act")(g, kind), ops.gated_act(g, kind), tol, kind)
    pos = positions(lens, "cuda")
    cs = _cos_sin(512, 128, 0).cuda()
    q, k = torch.randn(T, 16, 128, **dev), torch.randn(T, 8, 128, **dev)
    rq, rk = q.clone(), k.clone()
    _kernel("rotary")(q, k, pos, cs, True)
    ops.rotary(rq, rk, pos, cs, True)
    assert_close(q, rq, tol, "rotary q")
    assert_close(k, rk, tol, "rotary k")
    ids = torch.randint(0, 30522, (T,), device="cuda")
    tables = (torch.randn(30522, 768, **dev), torch.randn(512, 768, **dev), torch.randn(2, 768, **dev))
    args = (ids, pos, ids % 2, *tables, torch.ones(768, device="cuda"), torch.zeros(768, device="cuda"), 1e-12)
    assert_close(_kernel("embed_layer_norm")(*args), ops.embed_layer_norm(*args), (5e-2, 5e-2), "embed")
    logits = torch.randn(64, 3, device="cuda")
    assert_close(_kernel("activation")(logits, "softmax", 0.5, 2.0),
                 ops.activation(logits, "softmax", 0.5, 2.0), FP32, "activation")


@pytest.mark.gpu
@pytest.mark.parametrize("causal,Hq,Hkv,D,window,kind", [
    (False, 12, 12, 64, None, "cls"),       # BERT-base CLS pooling
    (True, 16, 8, 128, None, "last"),       # Qwen3-0.6B style, last-token pooling
    (True, 14, 2, 64, None, "mix"),         # GQA 7:1, mixed positions
    (True, 8, 8, 256, None, "last"),        # head_dim 256
    (True, 16, 4, 96, (255, -1), "last"),   # sliding window, padded head dim
])
def test_gpu_pooled_query_attention_bf16(causal, Hq, Hkv, D, window, kind):
    lens = _mixed_lens(64, seed=5)
    T = sum(lens)
    q_all, k, v = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    cu = cu_seqlens(lens, "cuda")
    pos = _q_pos(lens, kind).cuda()
    rows = cu[:-1].long() + pos
    q = q_all[rows]
    out = _kernel("pooled_query_attention")(q, k, v, cu, max(lens), pos, causal, None, window)
    tol = (torch.bfloat16, 2e-2, 2e-2)
    assert_close(out, ops.pooled_query_attention(q, k, v, cu, max(lens), pos, causal, None, window), tol,
                 "vs reference")
    # The same rows of full varlen attention (the Triton kernel, checked on its own above).
    full = _kernel("varlen_attention")(q_all, k, v, cu, max(lens), causal, None, window)
    assert_close(out, full[rows], tol, "vs varlen_attention rows")


def _rot_args(pos=None, q=None):
    ang = _randn(8, 4, seed=37)
    k = _randn(4, 2, 8, seed=38)
    q = _randn(4, 3, 8, seed=39) if q is None else q
    return q, k, torch.tensor([0, 1, 2, 3]) if pos is None else pos, torch.cat([ang.cos(), ang.sin()], 1)


def _embed_args(ids=(1, 6, 0), pos=(0, 1, 9), types=(0, 1, 1)):
    t = lambda v: torch.tensor(v)  # noqa: E731
    return (t(ids), t(pos), t(types), _randn(7, 16, seed=80), _randn(10, 16, seed=81), _randn(2, 16, seed=82),
            _randn(16, seed=83), _randn(16, seed=84), 1e-5)


def _moe_args(experts):
    return _randn(2, 16, seed=85), _randn(3, 16, 16, seed=86), experts


@pytest.mark.parametrize("op, args, match", [
    # positions past the cos/sin table, or negative (torch's indexing would wrap -1 to the last row)
    ("rotary", lambda: _rot_args(pos=torch.tensor([0, 1, 2, 8])), r"positions must lie in \[0, 8\) .* 0 to 8"),
    ("rotary", lambda: _rot_args(pos=torch.tensor([0, -1, 2, 3])), r"positions must lie in \[0, 8\) .* -1 to 3"),
    ("qk_norm_rotary", lambda: (*_rot_args(pos=torch.tensor([0, 1, 2, 8]))[:2], torch.ones(8), torch.ones(8),
                                torch.tensor([0, 1, 2, 8]), _rot_args()[3], 1e-6), r"positions must lie in \[0, 8\)"),
    # a q whose tokens share memory: an in-place write would race with itself
    ("rotary", lambda: _rot_args(q=_randn(1, 3, 8, seed=40).expand(4, 3, 8)), "q is written in place .* stride 0"),
    # ids past their tables (word 7 rows, pos 10, type 2), or negative
    ("embed_layer_norm", lambda: _embed_args(ids=(1, 7, 0)), r"input_ids must lie in \[0, 7\)"),
    ("embed_layer_norm", lambda: _embed_args(ids=(1, -1, 0)), r"input_ids must lie in \[0, 7\) .* -1 to 1"),
    ("embed_layer_norm", lambda: _embed_args(pos=(0, 1, 10)), r"positions must lie in \[0, 10\)"),
    ("embed_layer_norm", lambda: _embed_args(types=(0, 2, 1)), r"token_type_ids must lie in \[0, 2\)"),
    # expert ids past the 3 experts, or not integers
    ("expert_matmul", lambda: _moe_args(torch.tensor([[0, 3], [1, 2]])), r"experts must lie in \[0, 3\)"),
    ("expert_matmul", lambda: _moe_args(torch.tensor([[0, 1], [-1, 2]])), r"experts must lie in \[0, 3\)"),
    ("expert_matmul", lambda: _moe_args(torch.tensor([[True, False], [True, True]])), "int32/int64"),
    # cu_seqlens that does not cover the T rows (the reference clamped its reads)
    ("gather_pooled", lambda: (_randn(9, 8, seed=87), torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32), "last"),
     "cu_seqlens .*T=9"),
    # what the attention kernels refuse, the reference refuses too
    ("varlen_attention", lambda: (*(x.int() for x in _qkv([4, 4], 4, 2, 16, torch.float32)), cu_seqlens([4, 4]), 4),
     "q.dtype must be float16, bfloat16 or float32|q must be a floating-point"),
    ("varlen_attention", lambda: (*_qkv([4, 4], 3, 2, 16, torch.float32), cu_seqlens([4, 4]), 4),
     r"Hq \(3\) must be a multiple of Hkv \(2\)"),
    ("varlen_attention", lambda: (*_qkv([4, 4], 4, 2, 16, torch.float32), cu_seqlens([4, 4]), -1),
     "max_seqlen must be a non-negative int"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_both_backends_refuse_the_same_bad_inputs(op, args, match, backend):
    """Out-of-table indices and racing in-place views are refused by the launcher and the
    torch reference alike, with the op's own message, where they would read out of bounds,
    wrap around or race."""
    fn = getattr(ops, op) if backend == "torch" else getattr(importlib.import_module(f"pyengine.kernels.{op}"), op)
    with pytest.raises(ValueError, match=match):
        fn(*args())


@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
def test_norm_of_a_view_without_a_residual(op):
    """x (..., H) whose leading dims cannot be flattened into a view, with no residual."""
    x = _randn(3, 5, 8, seed=88).transpose(0, 1)
    args = (x, None, _randn(8, seed=89)) + ((_randn(8, seed=90),) if op == "add_layer_norm" else ()) + (1e-5,)
    out, _ = _kernel(op)(*args)
    assert_close(out, getattr(ops, op)(*args)[0], FP32, op)
