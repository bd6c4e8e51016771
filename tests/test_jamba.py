"""Jamba (attention + Mamba + MoE) against transformers' torch path, and the packed
Mamba ops against float64 per-sequence references: no state crosses a sequence
boundary."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from pyengine import LLM, ops
from tiny import save_tiny

LENS = [1, 2, 5, 17, 64, 150]


def jamba_config(num_labels):
    # layers: mamba+MLP, attention+MoE, mamba+MLP, attention+MoE
    return AutoConfig.for_model("jamba", vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                                expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                                attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                                pad_token_id=0, num_labels=num_labels, max_position_embeddings=512)


def random_prompts(lens, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 320, (n,), generator=g).tolist() for n in lens]


def ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def hf_logits(model, prompts):
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits.float()[0] for p in prompts])


@pytest.fixture(scope="module")
def jamba(tmp_path_factory):
    path = tmp_path_factory.mktemp("jamba")
    model, _ = save_tiny(path, jamba_config(num_labels=2), tokenizer="decoder")
    assert model.config.layers_block_type == ["mamba", "attention", "mamba", "attention"]
    return path, model


def test_jamba_matches_transformers_and_is_batch_invariant(jamba):
    path, model = jamba
    prompts = random_prompts(LENS, seed=1)
    llm = LLM(str(path), kernel_backend="torch")
    got = torch.tensor([o.outputs.probs for o in llm.classify(ids(prompts), use_tqdm=False)])
    ref = hf_logits(model, prompts).softmax(-1)
    assert (ref.max(-1).values > 0.7).any()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    alone = torch.tensor([llm.classify(ids([p]), use_tqdm=False)[0].outputs.probs for p in prompts])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_jamba_refuses_lora(jamba):
    # Its mamba mixers have no LoRA path: enabling LoRA fails when the engine is built.
    path, _ = jamba
    with pytest.raises(ValueError, match="JambaForSequenceClassification does not support LoRA adapters"):
        LLM(str(path), kernel_backend="torch", enable_lora=True)


def test_jamba_reward_from_model_instance(tmp_path):
    """A reward head (num_labels 1), loaded from the in-memory model, whose experts are
    stacked (E, 2I, H) tensors rather than the per-expert names of the saved files."""
    model, _ = save_tiny(tmp_path, jamba_config(num_labels=1), tokenizer="decoder", seed=3)
    assert any(k.endswith("experts.gate_up_proj") for k in model.state_dict())
    prompts = random_prompts([3, 40, 90], seed=2)
    llm = LLM(model, tokenizer=str(tmp_path), kernel_backend="torch")
    raw = torch.tensor([o.outputs.data.tolist() for o in llm.encode(ids(prompts), use_activation=False,
                                                                       use_tqdm=False)])
    torch.testing.assert_close(raw, hf_logits(model, prompts), atol=1e-4, rtol=0)


def _scan_reference(x, dt, A, B, C, D, z, dt_bias):
    """One sequence, float64, the recurrence written out step by step."""
    d = F.softplus(dt + dt_bias)
    h = torch.zeros(x.shape[1], A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(x.shape[0]):
        h = torch.exp(d[t, :, None] * A) * h + (d[t] * x[t])[:, None] * B[t][None, :]
        ys.append(h @ C[t] + D * x[t])
    return torch.stack(ys) * F.silu(z)


def test_packed_mamba_ops_reset_at_sequence_boundaries():
    g = torch.Generator().manual_seed(0)
    lens, Ci, N, K = [7, 1, 30, 4], 6, 5, 4
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])
    x, dt, z = (torch.randn(T, Ci, generator=g) for _ in range(3))
    B, C = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    A = -torch.rand(Ci, N, generator=g) - 0.1
    D, dt_bias = torch.randn(Ci, generator=g), torch.randn(Ci, generator=g)
    w, b = torch.randn(Ci, K, generator=g), torch.randn(Ci, generator=g)

    conv = ops.causal_conv1d(x, w, b, pos, "silu")
    scan = ops.selective_scan(x, dt, A, B, C, D, z, dt_bias, cu, max(lens))
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seq = x[s:e].double().T[None]  # (1, Ci, L): zero padding on the left only
        ref = F.conv1d(F.pad(seq, (K - 1, 0)), w.double()[:, None], b.double(), groups=Ci)[0].T
        torch.testing.assert_close(conv[s:e].double(), F.silu(ref), atol=1e-5, rtol=0)
        ref = _scan_reference(*(t.double() for t in (x[s:e], dt[s:e], A, B[s:e], C[s:e], D, z[s:e], dt_bias)))
        torch.testing.assert_close(scan[s:e].double(), ref, atol=1e-4, rtol=1e-5)
    # The lengths are on the host: a max_seqlen short of the longest changes nothing.
    assert torch.equal(ops.selective_scan(x, dt, A, B, C, D, z, dt_bias, cu, 2), scan)
    with pytest.raises(ValueError, match="selective_scan: cu_seqlens ends at 38, not T=42"):
        ops.selective_scan(x, dt, A, B, C, D, z, dt_bias, cu[:-1], max(lens))
