"""Mixture-of-experts decoders (Qwen3-MoE, Qwen2-MoE with its shared expert, Mixtral)
against transformers' own models on the torch backend: routing (top-k, renormalised or
not), sparse and dense layers side by side, both checkpoint layouts (per expert, and the
stacked tensors), converted causal LMs, batch invariance, and the Triton kernels."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from pyengine import LLM
from test_decoders import hf_logits, ids, probs, random_prompts
from test_engine import report
from tiny import save_tiny

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               max_position_embeddings=512, pad_token_id=0, num_labels=3)
LENS = [1, 2, 5, 16, 33, 100]

# name -> config factory
CONFIGS = {
    # 8 experts, top 2 renormalised; layer 1 dense (mlp_only_layers), q/k norm
    "qwen3-moe": lambda: AutoConfig.for_model("qwen3_moe", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                              norm_topk_prob=True, mlp_only_layers=[1], **_COMMON),
    # a sliding window of 7 on every layer (Qwen3-MoE ignores max_window_layers)
    "qwen3-moe-window": lambda: AutoConfig.for_model("qwen3_moe", num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=48, use_sliding_window=True,
                                                     sliding_window=7, max_window_layers=1, **_COMMON),
    # top 3 of 6 not renormalised, a shared expert with its sigmoid gate; every 2nd layer sparse
    "qwen2-moe": lambda: AutoConfig.for_model("qwen2_moe", num_attention_heads=4, num_key_value_heads=4,
                                              num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
                                              shared_expert_intermediate_size=72, norm_topk_prob=False,
                                              decoder_sparse_step=2, **_COMMON),
    # every layer sparse, experts of intermediate_size, a sliding window
    "mixtral": lambda: AutoConfig.for_model("mixtral", num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                            num_local_experts=4, num_experts_per_tok=2, sliding_window=9, **_COMMON),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def moe(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model, _ = save_tiny(path, CONFIGS[request.param](), tokenizer="decoder")
    return request.param, path, model


def test_classify_matches_transformers(moe):
    name, path, model = moe
    prompts = random_prompts(LENS, seed=1)
    ref = hf_logits(model, prompts)
    assert ref.std() > 0.1
    llm = LLM(str(path), dtype="float32", kernel_backend="torch")
    got = probs(llm.classify(ids(prompts), use_activation=False, use_tqdm=False))
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5), f"{name}\n{report(got, ref)}"
    # the activation on top: softmax over the 3 labels
    soft = probs(llm.classify(ids(prompts), use_tqdm=False))
    torch.testing.assert_close(soft, ref.softmax(-1), atol=1e-4, rtol=0)


def test_batch_invariance(moe):
    _, path, _ = moe
    llm = LLM(str(path), dtype="float32", kernel_backend="torch")
    prompts = ids(random_prompts(LENS * 2, seed=2))
    together = probs(llm.classify(prompts, use_tqdm=False))
    alone = torch.stack([probs(llm.classify([p], use_tqdm=False))[0] for p in prompts])
    assert torch.allclose(together, alone, atol=1e-5, rtol=0), report(together, alone)


def test_stacked_expert_layout_loads_the_same(moe, tmp_path):
    # transformers 5's in-memory layout: experts.gate_up_proj (E, 2I, H), experts.down_proj (E, H, I)
    name, path, _ = moe
    w = load_file(os.path.join(path, "model.safetensors"))
    out, groups = {}, {}
    for k, t in w.items():
        parts = k.split(".")
        if "experts" in parts and parts[-1] == "weight" and parts[parts.index("experts") + 1].isdigit():
            at = parts.index("experts")
            groups.setdefault(".".join(parts[:at + 1]), {})[(int(parts[at + 1]), parts[at + 2])] = t
        else:
            out[k] = t
    assert groups, "the checkpoint has per-expert weights"
    for pre, ts in groups.items():
        E = 1 + max(e for e, _ in ts)
        g, u, d = (("w1", "w3", "w2") if name == "mixtral" else ("gate_proj", "up_proj", "down_proj"))
        out[pre + ".gate_up_proj"] = torch.stack([torch.cat([ts[(e, g)], ts[(e, u)]]) for e in range(E)])
        out[pre + ".down_proj"] = torch.stack([ts[(e, d)] for e in range(E)])
    for f in os.listdir(path):
        if f != "model.safetensors":
            os.symlink(os.path.join(path, f), tmp_path / f)
    save_file(out, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    prompts = ids(random_prompts(LENS, seed=3))
    a, b = (probs(LLM(str(p), dtype="float32", kernel_backend="torch").classify(prompts, use_tqdm=False))
            for p in (path, tmp_path))
    assert torch.equal(a, b)


def test_a_missing_expert_is_named(moe, tmp_path):
    name, path, _ = moe
    w = load_file(os.path.join(path, "model.safetensors"))
    gone = next(k for k in w if ".experts.1." in k and ("up_proj" in k or ".w3." in k))
    del w[gone]
    for f in os.listdir(path):
        if f != "model.safetensors":
            os.symlink(os.path.join(path, f), tmp_path / f)
    save_file(w, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"checkpoint lacks weights for .*experts_up\[\(1, slice\("):
        LLM(str(tmp_path), dtype="float32", kernel_backend="torch")


def test_qwen2_moe_without_qkv_bias(tmp_path):
    """Qwen2-MoE reads its q/k/v bias from config.qkv_bias (Qwen2 always has one)."""
    cfg = CONFIGS["qwen2-moe"]()
    cfg.qkv_bias = False
    model, _ = save_tiny(tmp_path, cfg, tokenizer="decoder")
    assert model.model.layers[0].self_attn.q_proj.bias is None
    prompts = random_prompts([1, 7, 40], seed=9)
    ref = hf_logits(model, prompts)
    got = probs(LLM(str(tmp_path), dtype="float32", kernel_backend="torch").classify(
        ids(prompts), use_activation=False, use_tqdm=False))
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5), report(got, ref)


def test_converted_causal_lm_with_a_token_head(tmp_path):
    # Qwen3-MoE as a yes/no reranker: the head is W_lm[yes] - W_lm[no] (from_2_way_softmax).
    from transformers import AutoModelForCausalLM

    from tiny import randomize, write_bpe_tokenizer
    tok = write_bpe_tokenizer(tmp_path, "decoder")
    cfg = CONFIGS["qwen3-moe"]()
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    lm = randomize(AutoModelForCausalLM.from_config(cfg), 0.3, 0).eval()
    lm.config.architectures = ["Qwen3MoeForCausalLM"]
    lm.save_pretrained(tmp_path)
    yes, no = tok.convert_tokens_to_ids(["yes", "no"]) if "yes" in tok.get_vocab() else (7, 8)
    toks = tok.convert_ids_to_tokens([no, yes])
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch",
              hf_overrides={"classifier_from_token": toks, "method": "from_2_way_softmax"})
    prompts = random_prompts([3, 17, 40], seed=4, vocab=len(tok))
    got = probs(llm.classify(ids(prompts), use_tqdm=False))[:, 0]
    with torch.no_grad():
        last = torch.stack([lm(torch.tensor([p])).logits[0, -1] for p in prompts])
    ref = last[:, [no, yes]].softmax(-1)[:, 1]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_triton_kernels_in_the_interpreter(tmp_path):
    # The experts' gated activation and the attention on the Triton kernels (head_dim 16).
    save_tiny(tmp_path, CONFIGS["qwen2-moe"](), tokenizer="decoder")
    prompts = ids(random_prompts([1, 4, 9], seed=6))
    ref = probs(LLM(str(tmp_path), kernel_backend="torch").classify(prompts, use_tqdm=False))
    got = probs(LLM(str(tmp_path), kernel_backend="triton").classify(prompts, use_tqdm=False))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_lora_on_attention_matches_a_merged_reference_and_on_experts_is_refused(tmp_path):
    from pyengine import LoRARequest
    from test_lora import write_adapter
    model, _ = save_tiny(tmp_path, CONFIGS["qwen3-moe"](), tokenizer="decoder")
    attn = write_adapter(tmp_path, tmp_path / "attn", ("q_proj", "v_proj", "o_proj"), seed=1)
    prompts = random_prompts(LENS, seed=8)
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch", enable_lora=True, max_lora_rank=8)
    got = probs(llm.classify(ids(prompts), lora_request=LoRARequest("a", 1, str(attn)), use_activation=False,
                             use_tqdm=False))
    base = hf_logits(model, prompts)
    # the reference: transformers' model with each pair merged, W + (alpha / r) B A
    pairs = load_file(str(attn / "adapter_model.safetensors"))
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for k in pairs:
            if k.endswith("lora_A.weight"):
                name = k[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
                weights[name] += 2.0 * pairs[k.replace("lora_A", "lora_B")] @ pairs[k]
    ref = hf_logits(model, prompts)
    assert (ref - base).abs().max() > 0.05, "the adapter barely changes the model: a weak test"
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    # an adapter on an expert's weights names what adapters may change
    bad = tmp_path / "experts"
    bad.mkdir()
    key = "base_model.model.model.layers.0.mlp.experts.0.up_proj"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 64), f"{key}.lora_B.weight": torch.randn(48, 4)},
              str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    with pytest.raises(ValueError, match=r"qkv_w, o_w of each layer and the head"):
        llm.classify(ids(prompts[:1]), lora_request=LoRARequest("e", 2, str(bad)), use_tqdm=False)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_on_gpu(tmp_path, name):
    """bf16 (CUDA, default kernels) within 2e-2 of transformers' fp32 probabilities."""
    model, _ = save_tiny(tmp_path, CONFIGS[name](), tokenizer="decoder", std=_COMMON["hidden_size"] ** -0.5)
    prompts = random_prompts(LENS * 3, seed=7)
    got = probs(LLM(str(tmp_path), dtype="bfloat16", device="cuda").classify(ids(prompts), use_tqdm=False))
    ref = hf_logits(model, prompts).softmax(-1)
    assert (got - ref).abs().max() < 2e-2


def test_benchmark_preset_resolves_to_the_moe_model():
    from pyengine.bench.presets import architecture_missing, preset_config
    from pyengine.models import resolve_architecture
    cfg = preset_config("qwen3-30b-a3b", layers=2)
    assert architecture_missing(cfg) is None
    assert resolve_architecture(cfg) == "Qwen3MoeForSequenceClassification"
