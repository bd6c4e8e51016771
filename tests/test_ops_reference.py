"""The torch references in pyengine.ops against independent float64 computations."""
import pytest
import torch

from pyengine import ops
from kernel_refs import (activation64, assert_close, attention64, cu_seqlens, gated64, gather64,
                         layer_norm64, positions, rms_norm64, rotary64)

LENS = [1, 17, 65]  # one token, a short tail, a sequence longer than one 64-wide block
TOL = (1e-5, 1e-5)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("window", [None, (5, 3), (20, -1)], ids=["nowin", "win5-3", "left20"])
def test_varlen_attention_reference(causal, heads, window):
    g = _gen(1)
    Hq, Hkv = heads
    T = sum(LENS)
    q = torch.randn(T, Hq, 32, generator=g)
    k = torch.randn(T, Hkv, 32, generator=g)
    v = torch.randn(T, Hkv, 32, generator=g)
    out = ops.varlen_attention(q, k, v, cu_seqlens(LENS), max(LENS), causal=causal, window=window)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, attention64(q, k, v, LENS, causal, None, window), TOL, "varlen_attention")


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, (40, -1))])
def test_varlen_attention_reference_long_sequence(causal, window):
    # A sequence over 1024 tokens takes the fused kernel instead of materialised scores.
    g = _gen(4)
    lens = [3, 1100]
    q = torch.randn(sum(lens), 4, 16, generator=g)
    k, v = (torch.randn(sum(lens), 2, 16, generator=g) for _ in range(2))
    out = ops.varlen_attention(q, k, v, cu_seqlens(lens), max(lens), causal=causal, window=window)
    assert_close(out, attention64(q, k, v, lens, causal, None, window), TOL, "varlen_attention long")


@pytest.mark.parametrize("causal,window,softcap", [
    (False, None, None),   # image tiles: one batched matmul per run
    (True, (4, -1), None),  # a band mask shared by the run
    (True, None, 5.0),     # soft-capped scores, batched
])
@pytest.mark.parametrize("chunk", [None, 3], ids=["whole-runs", "runs-cut-in-3"])
def test_varlen_attention_reference_like_lengths(causal, window, softcap, chunk, monkeypatch):
    # Runs of equal lengths (as the scheduler's length-sorted batches and image tiles
    # have them) share one computation, cut where the scores would exceed a budget; the
    # last three repeat lengths met before (as windows of frames do): gathered to them.
    if chunk is not None:
        monkeypatch.setattr(ops, "_CPU_SCORES", chunk * 4 * 9 * 9)  # 3 sequences of 9 tokens a chunk
    g = _gen(6)
    lens = [9, 9, 9, 9, 9, 9, 9, 2, 2, 1, 17, 17, 9, 2, 9]
    q = torch.randn(sum(lens), 4, 16, generator=g)
    k, v = (torch.randn(sum(lens), 2, 16, generator=g) for _ in range(2))
    out = ops.varlen_attention(q, k, v, cu_seqlens(lens), max(lens), causal=causal, window=window, softcap=softcap)
    assert_close(out, attention64(q, k, v, lens, causal, None, window, softcap), TOL, "varlen_attention runs")


def test_varlen_attention_reference_long_like_lengths():
    # Two sequences over 1024 tokens: one batched call of the fused kernel.
    g = _gen(7)
    lens = [1030, 1030]
    q = torch.randn(sum(lens), 2, 16, generator=g)
    k, v = (torch.randn(sum(lens), 1, 16, generator=g) for _ in range(2))
    out = ops.varlen_attention(q, k, v, cu_seqlens(lens), max(lens), causal=True)
    assert_close(out, attention64(q, k, v, lens, True), TOL, "varlen_attention long runs")


def test_pooled_query_attention_reference():
    # One query per sequence (CLS at 0, or the last token) against every key of its sequence.
    g = _gen(5)
    lens = [1, 17, 65]
    T = sum(lens)
    q_all = torch.randn(T, 4, 32, generator=g)
    k, v = (torch.randn(T, 2, 32, generator=g) for _ in range(2))
    cu = cu_seqlens(lens)
    for causal, pos in ((False, torch.zeros(3, dtype=torch.long)), (True, torch.tensor(lens) - 1)):
        rows = cu[:-1].long() + pos
        out = ops.pooled_query_attention(q_all[rows], k, v, cu, max(lens), pos, causal=causal)
        full = attention64(q_all, k, v, lens, causal)
        assert_close(out, full[rows], TOL, f"pooled_query_attention causal={causal}")
        # On the host, a max_seqlen short of the longest sequence drops no key.
        short = ops.pooled_query_attention(q_all[rows], k, v, cu, 2, pos, causal=causal)
        assert_close(short, out, (0, 0), "max_seqlen=2")


def test_varlen_attention_reference_scale_and_isolation():
    # A sequence's output must not change when other sequences share the batch.
    g = _gen(2)
    lens = [9, 30, 4]
    q, k, v = (torch.randn(sum(lens), 2, 16, generator=g) for _ in range(3))
    out = ops.varlen_attention(q, k, v, cu_seqlens(lens), 30, causal=True, scale=0.3)
    assert_close(out, attention64(q, k, v, lens, True, 0.3), TOL, "scaled")
    alone = ops.varlen_attention(q[9:39], k[9:39], v[9:39], cu_seqlens([30]), 30, causal=True, scale=0.3)
    assert_close(out[9:39], alone, (1e-6, 1e-6), "isolation")


@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
def test_gather_pooled_reference(pooling):
    h = torch.randn(sum(LENS), 24, generator=_gen(3))
    out = ops.gather_pooled(h, cu_seqlens(LENS), pooling)
    assert out.dtype == h.dtype
    assert_close(out, gather64(h, LENS, pooling), TOL, pooling)


@pytest.mark.parametrize("cu,match", [
    ([0, 3, 6], "ends at 6, not T=8"),
    ([2, 3, 8], "starts at 2, not 0"),
    ([0, 5, 3, 8], "decreases at entry 2"),
    ([[0, 3, 8]], r"must be a 1-D \(B\+1,\) tensor"),
])
def test_varlen_attention_reference_checks_cu_seqlens(cu, match):
    # It reads cu_seqlens on the host anyway: a bad one is an error, not rows left unwritten.
    q, k, v = (torch.randn(8, 2, 16, generator=_gen(7)) for _ in range(3))
    with pytest.raises(ValueError, match="varlen_attention: cu_seqlens " + match if "1-D" not in match else match):
        ops.varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), 5)


def test_gather_pooled_reference_unknown():
    with pytest.raises(ValueError, match="pooling"):
        ops.gather_pooled(torch.randn(3, 4), cu_seqlens([3]), "max")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "identity"])
@pytest.mark.parametrize("bias_scale", [(None, None), (0.5, None), (0.5, 2.0)])
def test_activation_reference(kind, bias_scale):
    logits = torch.randn(5, 3, generator=_gen(4)) * 4
    out = ops.activation(logits, kind, *bias_scale)
    assert out.dtype == torch.float32
    assert_close(out, activation64(logits, kind, *bias_scale), TOL, kind)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_add_layer_norm_reference(residual, bias):
    g = _gen(5)
    x = torch.randn(7, 48, generator=g)
    r = torch.randn(7, 48, generator=g) if residual else None
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    y, s = ops.add_layer_norm(x, r, w, b if bias else None, 1e-5)
    expect_s = x.double() + (r.double() if residual else 0)
    assert_close(s, expect_s, TOL, "summed")
    assert_close(y, layer_norm64(expect_s, w, b if bias else None, 1e-5), TOL, "normed")


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm_reference(offset):
    g = _gen(6)
    x, r = torch.randn(7, 48, generator=g), torch.randn(7, 48, generator=g)
    w = torch.randn(48, generator=g)
    y, s = ops.add_rms_norm(x, r, w, 1e-6, offset)
    assert_close(s, x.double() + r.double(), TOL, "summed")
    assert_close(y, rms_norm64(x.double() + r.double(), w, 1e-6, offset), TOL, "normed")


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("R", [16, 8], ids=["full", "partial"])
def test_rotary_reference(neox, R):
    g = _gen(7)
    lens = [3, 5]
    pos = positions(lens)
    ang = torch.rand(8, R // 2, generator=g) * 6
    cos_sin = torch.cat([ang.cos(), ang.sin()], 1)
    q, k = torch.randn(8, 2, 16, generator=g), torch.randn(8, 1, 16, generator=g)
    q0, k0 = q.clone(), k.clone()
    q1, k1 = ops.rotary(q, k, pos, cos_sin, neox)
    assert q1 is q and k1 is k  # in place
    assert_close(q, rotary64(q0, pos, cos_sin, neox), TOL, "q")
    assert_close(k, rotary64(k0, pos, cos_sin, neox), TOL, "k")


def test_rotary_reference_is_a_rotation_by_position():
    # With angles pos * theta, the dot product of a rotated q and k depends only on the
    # distance between their positions, which is what makes restarting positions valid.
    theta = 1.0 / (10000 ** (torch.arange(0, 16, 2).double() / 16))
    ang = torch.arange(32).double()[:, None] * theta[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], 1).float()
    x = torch.randn(1, 1, 16, generator=_gen(8))
    dots = []
    for p in (0, 7):
        q, k = x.clone().expand(2, 1, 16).clone(), x.clone().expand(2, 1, 16).clone()
        ops.rotary(q, k, torch.tensor([p + 3, p]), cos_sin)
        dots.append(float((q[0] * k[1]).sum()))
    assert abs(dots[0] - dots[1]) < 1e-4


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh", "gelu"])
def test_gated_act_reference(kind):
    x = torch.randn(6, 40, generator=_gen(9)) * 3
    assert_close(ops.gated_act(x, kind), gated64(x, kind), TOL, kind)


@pytest.mark.parametrize("with_type", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
def test_embed_layer_norm_reference(with_type, with_extra):
    g = _gen(10)
    lens = [4, 6]
    ids = torch.randint(0, 30, (10,), generator=g)
    tt = torch.randint(0, 2, (10,), generator=g)
    pos = positions(lens)
    word, pe, te = torch.randn(30, 24, generator=g), torch.randn(16, 24, generator=g), torch.randn(2, 24, generator=g)
    extra, w, b = torch.randn(24, generator=g), torch.randn(24, generator=g), torch.randn(24, generator=g)
    out = ops.embed_layer_norm(ids, pos, tt, word, pe, te if with_type else None, w, b, 1e-12,
                               extra if with_extra else None)
    s = word.double()[ids] + pe.double()[pos]
    if with_type:
        s = s + te.double()[tt]
    if with_extra:
        s = s + extra.double()
    assert_close(out, layer_norm64(s, w, b, 1e-12), TOL, "embed_layer_norm")


@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
@pytest.mark.parametrize("norm_kind", [None, "layer", "rms"])
@pytest.mark.parametrize("residual", [False, True])
def test_pooled_norm_reference(pooling, norm_kind, residual):
    g = _gen(11)
    h = torch.randn(sum(LENS), 24, generator=g)
    r = torch.randn(sum(LENS), 24, generator=g) if residual else None
    w, b = torch.randn(24, generator=g), torch.randn(24, generator=g)
    out = ops.pooled_norm(h, cu_seqlens(LENS), pooling, norm_kind, w, b, 1e-6, 0.5, r)
    assert out.dtype == torch.float32 and out.shape == (len(LENS), 24)
    s = h.double() + (r.double() if residual else 0)
    if norm_kind == "layer":
        s = layer_norm64(s, w, b, 1e-6)
    elif norm_kind == "rms":
        s = rms_norm64(s, w, 1e-6, 0.5)
    assert_close(out, gather64(s, LENS, pooling), TOL, f"{pooling}/{norm_kind}")


def test_pooled_norm_reference_cls_equals_norm_then_gather():
    # Norming only the pooled rows is the same as norming every token, then gathering.
    g = _gen(12)
    h = torch.randn(sum(LENS), 24, generator=g, dtype=torch.float64)
    w = torch.randn(24, generator=g, dtype=torch.float64)
    full = ops.add_rms_norm(h, None, w, 1e-6)[0]
    for pooling in ("cls", "last"):
        assert_close(ops.pooled_norm(h, cu_seqlens(LENS), pooling, "rms", w, None, 1e-6),
                     ops.gather_pooled(full, cu_seqlens(LENS), pooling), (1e-6, 1e-6), pooling)


def test_pooled_norm_reference_unknown_norm():
    with pytest.raises(ValueError, match="norm_kind"):
        ops.pooled_norm(torch.randn(3, 4), cu_seqlens([3]), "cls", "batch", torch.ones(4), None, 1e-6)
