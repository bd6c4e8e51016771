"""The mixture-of-experts matmul (ops.expert_matmul; Triton kernel in the interpreter on
CPU) against a float64 loop over the pairs: token rows and per-pair rows, with and
without weights, ragged expert loads (experts with no tokens, blocks past the last run),
the device-side sort, one specialisation across batch sizes, and bad inputs."""
import pytest
import torch

triton = pytest.importorskip("triton")

from pyengine import ops  # noqa: E402
from kernel_refs import FP16, FP32, assert_close  # noqa: E402
from pyengine.kernels import expert_matmul as em  # noqa: E402


def _case(T, k, E, N, K, dtype, seed, per_pair=False, skewed=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T * k if per_pair else T, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) * K ** -0.5).to(dtype)
    # k distinct experts per token; skewed: most tokens on expert 0, some experts idle
    scores = torch.rand(T, E, generator=g)
    if skewed:
        scores[:, 0] += 2.0
        scores[:, E // 2:] -= 5.0
    experts = scores.topk(k, dim=-1).indices
    weights = torch.rand(T, k, generator=g).to(dtype)
    return x, w, experts, weights


def _ref64(x, w, experts, weights, per_pair):
    """float64 (T * k, N): pair p = t * k + s is w[experts[t, s]] @ x[t] (x[p] with
    per_pair), times weights[t, s]; one matmul per expert over the pairs it takes."""
    T, k = experts.shape
    flat = experts.reshape(-1)
    src = x.double() if per_pair else x.double().repeat_interleave(k, dim=0)
    out = torch.empty(T * k, w.shape[1], dtype=torch.float64)
    for e in flat.unique().tolist():
        rows = (flat == e).nonzero().squeeze(1)
        out[rows] = src[rows] @ w[e].double().T
    if weights is not None:
        out *= weights.reshape(-1, 1).double()
    return out


@pytest.mark.parametrize("T, k, E, N, K, skewed", [
    (1, 1, 4, 40, 48, False),    # one token: one partial block, three experts idle
    (7, 2, 4, 40, 48, False),    # N and K not multiples of the blocks
    (33, 3, 8, 64, 32, True),    # most pairs on one expert over several blocks, half the experts idle
    (70, 2, 2, 24, 80, False),   # two experts, runs longer than a 64-row block
])
@pytest.mark.parametrize("per_pair, weighted", [(False, False), (True, True)], ids=["tokens", "pairs-weighted"])
@pytest.mark.parametrize("tol", [FP32, FP16], ids=["fp32", "fp16"])
def test_matches_float64(T, k, E, N, K, skewed, per_pair, weighted, tol):
    x, w, experts, weights = _case(T, k, E, N, K, tol[0], seed=T + E, per_pair=per_pair, skewed=skewed)
    weights = weights if weighted else None
    ref = _ref64(x, w, experts, weights, per_pair)
    for name, fn in (("triton", em.expert_matmul), ("torch", ops.expert_matmul)):
        got = fn(x, w, experts, weights, per_pair=per_pair)
        assert got.dtype == x.dtype and got.shape == (T * k, N)
        assert_close(got, ref, tol, f"{name} T={T} k={k} E={E}")


@pytest.mark.parametrize("T, k, E, block_m", [(1, 1, 4, 16), (33, 3, 8, 16), (200, 2, 6, 64)])
def test_align_sorts_every_pair_once_into_its_experts_blocks(T, k, E, block_m):
    _, _, experts, _ = _case(T, k, E, 8, 8, torch.float32, seed=T, skewed=True)
    pairs, block_expert = em.align(experts, E, block_m)
    P = T * k
    assert pairs.numel() % block_m == 0 and pairs.numel() >= P + E * (block_m - 1)
    assert block_expert.numel() == pairs.numel() // block_m
    real = pairs[pairs >= 0].long()
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    flat = experts.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        blk = pairs[b * block_m:(b + 1) * block_m].long()
        if e < 0:
            assert (blk < 0).all()  # past the last run: nothing to do
            continue
        assert (flat[blk[blk >= 0]] == e).all()
        assert (blk >= 0).any() and (blk[:(blk >= 0).sum()] >= 0).all()  # padding only at a run's end
    # within an expert, pairs keep their order (a stable sort)
    for e in range(E):
        mine = real[flat[real] == e]
        assert torch.equal(mine, mine.sort().values)


def test_batch_sizes_share_one_specialisation(monkeypatch):
    # Only model constants reach the kernel as ints or constexprs: T never does.
    from test_kernels_triton import _Recorder
    rec = _Recorder(em._expert_matmul_kernel)
    monkeypatch.setattr(em, "_expert_matmul_kernel", rec)
    for T in (1, 16, 31, 64):
        x, w, experts, weights = _case(T, 2, 4, 32, 48, torch.float32, seed=T)
        em.expert_matmul(x, w, experts, weights)
    assert len(set(rec.keys)) == 1, set(rec.keys)
    for name in rec.ints[0]:
        assert len({ints[name] for ints in rec.ints}) == 1, f"{name} varies with the batch"


@pytest.mark.parametrize("args, match", [
    (lambda x, w, e, g: (x, w[0], e), r"w must be \(E, N, K\)"),
    (lambda x, w, e, g: (x[:, :-1].contiguous(), w, e), r"x has 47 columns, the experts take K=48"),
    (lambda x, w, e, g: (x, w.half(), e), r"w must match x's dtype"),
    (lambda x, w, e, g: (x, w, e.float()), r"experts must be an int32/int64 tensor"),
    (lambda x, w, e, g: (x[:-1], w, e), r"x must have 5 rows \(tokens\), got 4"),
    (lambda x, w, e, g: (x, w, e, g[:, :1]), r"weights must be \(5, 2\)"),
])
def test_bad_inputs(args, match):
    x, w, experts, weights = _case(5, 2, 4, 32, 48, torch.float32, seed=0)
    with pytest.raises(ValueError, match="expert_matmul: " + match):
        em.expert_matmul(*args(x, w, experts, weights))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
def test_gpu_matches_float64_and_runs_in_a_cuda_graph(dtype, atol):
    """Realistic MoE shapes (Qwen3-30B-A3B's: 128 experts, top 8, H 2048, I 768 scaled
    down in T), and the same launch replayed from a CUDA graph."""
    x, w, experts, weights = _case(512, 8, 128, 768, 256, dtype, seed=3)
    x, w, experts, weights = x.cuda(), w.cuda(), experts.cuda(), weights.cuda()
    ref = _ref64(x.cpu(), w.cpu(), experts.cpu(), weights.cpu(), False)
    got = em.expert_matmul(x, w, experts, weights)
    assert_close(got, ref, (atol, 1e-2), "eager")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = em.expert_matmul(x, w, experts, weights)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, ref, (atol, 1e-2), "graph")
