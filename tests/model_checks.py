"""Shared checks of a classifier architecture against transformers' own model: token-id
prompts, logits on both sides, the comparison with a verbose report, batch invariance."""
import torch

from pyengine import LLM
from test_engine import report

ATOL = 1e-4  # DESIGN's fp32 CPU bar


def token_prompts(seed, lens, low=5, high=150, prefix=()):
    """Random token-id prompts of the given lengths (after ``prefix``), ids in [low, high)."""
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(low, high, (n,), generator=g).tolist() for n in lens]


def hf_logits(model, ps):
    """transformers' logits, one prompt at a time (no padding), fp32."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0].float() for p in ps])


def engine_logits(path, ps, **kw):
    """pyengine's raw logits (use_activation=False) for token-id prompts; kw go to LLM
    (fp32 on the torch backend unless given)."""
    llm = LLM(str(path), **{"dtype": "float32", "kernel_backend": "torch", **kw})
    return torch.tensor([o.outputs.probs for o in llm.classify([{"prompt_token_ids": p} for p in ps],
                                                               use_activation=False, use_tqdm=False)])


def assert_matches_transformers(path, model, ps, atol=ATOL, **kw):
    ref = hf_logits(model, ps)
    assert ref.std() > 0.1  # logits spread out, so the comparison can fail
    got = engine_logits(path, ps, **kw)
    assert torch.allclose(got, ref, atol=atol, rtol=0), report(got, ref)


def assert_batch_invariant(path, ps, atol=1e-5, **kw):
    """Each prompt's result in one call equals its result alone (fp32: within 1e-5)."""
    llm = LLM(str(path), **{"dtype": "float32", "kernel_backend": "torch", **kw})
    dicts = [{"prompt_token_ids": p} for p in ps]
    together = torch.tensor([o.outputs.probs for o in llm.classify(dicts, use_tqdm=False)])
    alone = torch.tensor([llm.classify([p], use_tqdm=False)[0].outputs.probs for p in dicts])
    assert torch.allclose(together, alone, atol=atol, rtol=0), report(together, alone)


def assert_bf16_bar(got, ref, hf_bf16):
    """DESIGN's bf16 bar on a tiny random model: each prompt's probabilities got (B, L)
    within 2e-2 of the fp32 reference ref, or, on a prompt where transformers' own bf16 run
    hf_bf16 is further off than that (these random models amplify rounding far more than
    trained ones), within 1.5x its error there; the same argmax wherever ref's top two are
    further apart than the prompt's tolerance."""
    hf_err = (hf_bf16 - ref).abs().max(-1).values
    tol = torch.clamp(1.5 * hf_err, min=2e-2)
    err = (got - ref).abs().max(-1).values
    bad = (err > tol).nonzero().flatten().tolist()
    assert not bad, (f"prompts {bad}: error {err[bad].tolist()} over tolerance {tol[bad].tolist()} "
                     f"(transformers' bf16 error {hf_err[bad].tolist()})\n" + report(got, ref))
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > tol
    assert bool((got.argmax(-1) == ref.argmax(-1))[clear].all()), report(got, ref)
