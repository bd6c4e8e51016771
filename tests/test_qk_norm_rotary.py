"""qk_norm_rotary (per-head RMSNorm of q and k, then rotary, in place) against the
two-step torch path it replaces, its own torch reference and a float64 computation.

q and k are always strided views of one fused qkv buffer whose v region starts as NaN:
the op writes through the views and must leave v bit for bit as it was. On CPU the
Triton kernel runs in the interpreter (fp32/fp16, small shapes); bf16 is tested on GPU.
"""
import inspect
import math

import pytest
import torch

from pyengine import ops
from kernel_refs import FP16, FP32, assert_close, positions, rms_norm64, rotary64

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from pyengine.kernels import qk_norm_rotary as mod  # noqa: E402

DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(FP16, id="fp16")]
MIXED = [1, 17, 65]  # a 1-token sequence, a partial block, a long one: positions up to 64
EPS = 1e-6


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cos_sin(max_pos, R, seed):
    ang = torch.rand(max_pos, R // 2, generator=_gen(seed)) * 2 * math.pi
    return torch.cat([ang.cos(), ang.sin()], 1)


def _case(lens, Hq, Hkv, D, R, dtype, seed=0, device="cpu"):
    """A fused (T, Hq + 2 Hkv, D) qkv buffer split into q, k, v views (v all NaN), the
    q/k norm weights (about 1, as trained q_norm/k_norm are), positions and a cos/sin table."""
    T = sum(lens)
    qkv = (torch.randn(T, Hq + 2 * Hkv, D, generator=_gen(seed)) * 2).to(dtype).to(device)
    qkv[:, Hq + Hkv:] = float("nan")
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=1)
    qw = (1 + 0.2 * torch.randn(D, generator=_gen(seed + 1))).to(dtype).to(device)
    kw = (1 + 0.2 * torch.randn(D, generator=_gen(seed + 2))).to(dtype).to(device)
    return qkv, q, k, v, qw, kw, positions(lens, device), _cos_sin(max(lens), R, seed + 3).to(device)


def _bits(t):
    """t's raw bits, so NaN == NaN compares as equal."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def _two_step(q, k, qw, kw, pos, cos_sin, eps, offset, neox):
    """The decoder's path before the fused op: add_rms_norm on (T * H, D) copies, then rotary."""
    T, Hq, D = q.shape
    qn = ops.add_rms_norm(q.reshape(T * Hq, D), None, qw, eps, offset)[0].view(T, Hq, D)
    kn = ops.add_rms_norm(k.reshape(-1, D), None, kw, eps, offset)[0].view(T, -1, D)
    return ops.rotary(qn, kn, pos, cos_sin, neox)


def _ref64(x, w, pos, cos_sin, eps, offset, neox):
    return rotary64(rms_norm64(x, w, eps, offset), pos, cos_sin, neox)


def test_registry_and_signature():
    chosen = ops.resolve_ops("triton", "cpu")
    assert "qk_norm_rotary" in ops.OP_NAMES
    assert chosen.chosen["qk_norm_rotary"] == "triton"
    assert chosen.qk_norm_rotary is mod.qk_norm_rotary
    assert inspect.signature(mod.qk_norm_rotary) == inspect.signature(ops.qk_norm_rotary)
    # The CUDA extension has no version: a "cuda" backend takes Triton's, torch takes its own.
    assert ops._load(ops._CUDA["qk_norm_rotary"]) is None
    assert ops.resolve_ops("torch", "cpu").qk_norm_rotary is ops.qk_norm_rotary


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["qwen3", "gemma"])
def test_reference_equals_two_step_path(neox, offset):
    """The torch reference is exactly the norm-then-rotary path it replaces, in place."""
    qkv, q, k, v, qw, kw, pos, cs = _case([3, 5], 4, 2, 32, 32, torch.float16, seed=1)
    v0 = v.clone()
    rq, rk = _two_step(q, k, qw, kw, pos, cs, EPS, offset, neox)
    q1, k1 = ops.qk_norm_rotary(q, k, qw, kw, pos, cs, EPS, offset, neox)
    assert q1 is q and k1 is k
    assert torch.equal(q, rq) and torch.equal(k, rk)
    assert torch.equal(_bits(v), _bits(v0))


@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("D,R,neox", [
    (64, 64, True),    # full rotary, neox halves
    (128, 128, True),  # Qwen3's head_dim
    (64, 64, False),   # interleaved pairs
    (80, 40, True),    # partial rotary on a non-power-of-2 head: a normed-only tail
], ids=["64", "128", "64-interleaved", "80-partial"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["qwen3", "gemma"])
def test_triton_matches_references(tol, D, R, neox, offset):
    dtype = tol[0]
    Hq, Hkv = 4, 1  # GQA 4:1
    qkv, q, k, v, qw, kw, pos, cs = _case(MIXED, Hq, Hkv, D, R, dtype, seed=D + R)
    if offset:
        qw, kw = qw - 1, kw - 1  # weights stored as w - 1, multiplied by (1 + w)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    rq, rk = ops.qk_norm_rotary(q.clone(), k.clone(), qw, kw, pos, cs, EPS, offset, neox)
    q1, k1 = mod.qk_norm_rotary(q, k, qw, kw, pos, cs, EPS, offset, neox)
    assert q1 is q and k1 is k
    what = f"D={D} R={R} neox={neox} offset={offset} {dtype}"
    assert_close(q, rq, tol, what + " q vs reference")
    assert_close(k, rk, tol, what + " k vs reference")
    if dtype == torch.float16:
        # The normed value is rounded to fp16 before the rotation, as in the reference:
        # then nearly every element matches to the bit (about 2/3 do without that rounding).
        for got, ref, name in ((q, rq, "q"), (k, rk, "k")):
            same = (got == ref).float().mean().item()
            assert same > 0.99, f"{what}: only {same:.1%} of {name} equal the reference to the bit"
    # float64 has no rounding between the norm and the rotation: one extra ulp of slack.
    tol64 = tol if dtype == torch.float32 else (2 * tol[1], 2 * tol[2])
    assert_close(q, _ref64(q0, qw, pos, cs, EPS, offset, neox), tol64, what + " q vs float64")
    assert_close(k, _ref64(k0, kw, pos, cs, EPS, offset, neox), tol64, what + " k vs float64")
    assert torch.equal(_bits(v), _bits(v0)), "v (beside q and k in the buffer) must be untouched"


def test_triton_many_heads_loop_and_int32_positions():
    # More heads than one loop step holds (32 heads of D=128 -> two steps of 16) and a
    # head count that is not a power of 2 for k; int32 positions.
    lens = [2, 3]
    qkv, q, k, v, qw, kw, pos, cs = _case(lens, 32, 3, 128, 128, torch.float32, seed=9)
    assert mod._MAX_PAIRS // 64 < 32
    pos = pos.to(torch.int32)
    v0 = v.clone()
    rq, rk = ops.qk_norm_rotary(q.clone(), k.clone(), qw, kw, pos.long(), cs, EPS, 0.0, True)
    mod.qk_norm_rotary(q, k, qw, kw, pos, cs, EPS, 0.0, True)
    assert_close(q, rq, FP32, "q")
    assert_close(k, rk, FP32, "k")
    assert torch.equal(_bits(v), _bits(v0))


def test_triton_empty_batch():
    q, k = torch.empty(0, 2, 16), torch.empty(0, 1, 16)
    out = mod.qk_norm_rotary(q, k, torch.ones(16), torch.ones(16), torch.zeros(0, dtype=torch.int64),
                             _cos_sin(4, 16, 0), EPS)
    assert out[0] is q and out[1] is k


@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(3, 2, 8), torch.randn(3, 1, 6), torch.ones(8), torch.ones(8), torch.arange(3),
              _cos_sin(4, 8, 0), EPS), r"k must be \(T=3, Hkv, D=8\)"),
    (lambda: (torch.randn(3, 2, 8), torch.randn(3, 1, 8).half(), torch.ones(8), torch.ones(8), torch.arange(3),
              _cos_sin(4, 8, 0), EPS), "q and k must share a dtype"),
    (lambda: (torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.ones(8), torch.ones(7), torch.arange(3),
              _cos_sin(4, 8, 0), EPS), r"k_weight must be \(8,\)"),
    (lambda: (torch.randn(3, 8, 2).transpose(1, 2), torch.randn(3, 1, 8), torch.ones(8), torch.ones(8),
              torch.arange(3), _cos_sin(4, 8, 0), EPS), "q must be contiguous in its last dim"),
    (lambda: (torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.ones(8), torch.ones(8), torch.arange(4),
              _cos_sin(4, 8, 0), EPS), r"positions must be \(3,\)"),
    (lambda: (torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.ones(8), torch.ones(8), torch.arange(3),
              torch.randn(4, 10), EPS), "R must be even and in"),
])
def test_validation_messages(args, match):
    with pytest.raises(ValueError, match="qk_norm_rotary: .*" + match):
        mod.qk_norm_rotary(*args())


def test_ragged_shapes_do_not_change_specialisation(monkeypatch):
    """The launch arguments that reach the compiled kernel's cache key (constexprs, ints
    and their 1 / divisible-by-16 / 32-bit specialisation) are the same for every T."""
    kernel = mod._qk_norm_rotary_kernel
    params = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters.values())
    names = [p.name for p in params]
    constexpr = {p.name for p in params if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}
    assert constexpr == {"HEAD_DIM", "HALF", "NEOX", "BLOCK_HALF", "BLOCK_TAIL", "BLOCK_HQ", "BLOCK_HK"}
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                bound = dict(zip(names, args), **kwargs)
                seen.append(tuple(
                    (n, bound[n]) if n in constexpr or isinstance(bound[n], (bool, float))
                    else (n, bound[n].dtype) if isinstance(bound[n], torch.Tensor)
                    else (n, bound[n], bound[n] == 1, bound[n] % 16 == 0) for n in names))
                return kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(mod, "_qk_norm_rotary_kernel", Recorder())
    for lens in ([1], [1, 17, 13], [16, 16], [9, 2, 5, 1, 7]):
        _, q, k, _, qw, kw, pos, cs = _case(lens, 4, 2, 16, 16, torch.float32, seed=sum(lens))
        cs = _cos_sin(80, 16, 0)  # one model's table, whatever the batch
        mod.qk_norm_rotary(q, k, qw, kw, pos, cs, EPS)
    assert len(seen) == 4 and len(set(seen)) == 1, seen


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D", [(16, 8, 128), (32, 8, 128), (14, 2, 64)],
                         ids=["qwen3-0.6b", "qwen3-8b", "gqa7-64"])
def test_gpu_bf16(Hq, Hkv, D):
    lens = [int(n) for n in torch.randint(1, 300, (48,), generator=_gen(5))]
    qkv, q, k, v, qw, kw, pos, cs = _case(lens, Hq, Hkv, D, D, torch.bfloat16, seed=7, device="cuda")
    v0 = v.clone()
    rq, rk = _two_step(q, k, qw, kw, pos, cs, EPS, 0.0, True)
    mod.qk_norm_rotary(q, k, qw, kw, pos, cs, EPS)
    tol = (torch.bfloat16, 2e-2, 2e-2)
    assert_close(q, rq, tol, "q vs two-step path")
    assert_close(k, rk, tol, "k vs two-step path")
    assert torch.equal(_bits(v), _bits(v0))
    # Most elements agree to the bit with the two-step path (both round the normed value
    # to bf16 before rotating); the rest differ by the fp32 summation order.
    assert (q == rq).float().mean() > 0.9
