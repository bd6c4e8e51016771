"""The bf16 bar of the GPU tests (model_checks.assert_bf16_bar) fails where it should."""
import pytest
import torch

from model_checks import assert_bf16_bar


def _probs(seed, n=6, labels=3, scale=3.0):
    return (scale * torch.randn(n, labels, generator=torch.Generator().manual_seed(seed))).softmax(-1)


def test_bf16_bar():
    ref = _probs(0)
    hf = ref.clone()
    noise = 0.01 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    assert_bf16_bar(ref + noise.clamp(-0.019, 0.019), ref, hf)  # within 2e-2: passes
    with pytest.raises(AssertionError, match=r"prompts \[2\]"):
        bad = ref.clone()
        bad[2] += torch.tensor([0.03, -0.03, 0.0])
        assert_bf16_bar(bad, ref, hf)
    # transformers' own bf16 run 0.1 off on prompt 2: up to 0.15 allowed there, not elsewhere
    hf[2] += torch.tensor([0.1, -0.1, 0.0])
    bad = ref.clone()
    bad[2] += torch.tensor([0.12, -0.12, 0.0])
    assert_bf16_bar(bad, ref, hf)
    bad[4] += torch.tensor([0.03, -0.03, 0.0])
    with pytest.raises(AssertionError, match=r"prompts \[4\]"):
        assert_bf16_bar(bad, ref, hf)
    # argmax: a flip within the tolerance passes where the top two are closer than it
    # (prompt 0), and fails where transformers' error widens the tolerance past a clear
    # margin (prompt 1: tolerance 0.3, margin 0.4, flipped by moving 0.25)
    ref = torch.tensor([[0.51, 0.49, 0.0], [0.7, 0.3, 0.0]])
    hf = torch.tensor([[0.51, 0.49, 0.0], [0.9, 0.1, 0.0]])
    assert_bf16_bar(torch.tensor([[0.495, 0.505, 0.0], [0.7, 0.3, 0.0]]), ref, hf)
    with pytest.raises(AssertionError, match=r"^max \|diff\|"):  # the argmax check's report
        assert_bf16_bar(torch.tensor([[0.51, 0.49, 0.0], [0.45, 0.55, 0.0]]), ref, hf)
