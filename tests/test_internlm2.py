"""InternLM2 reward models and causal LMs (remote code, read without it): a transformers
Llama written out in InternLM2's format (config model_type "internlm2", its weight names,
wqkv packed per kv head, the reward head as v_head) must score as transformers' Llama
does on the same weights."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from pyengine import LLM
from test_decoders import hf_logits, ids, probs, random_prompts
from tiny import save_tiny

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               max_position_embeddings=512, pad_token_id=0, num_labels=1)
_NAMES = {"self_attn.o_proj.weight": "attention.wo.weight", "self_attn.o_proj.bias": "attention.wo.bias",
          "mlp.gate_proj.weight": "feed_forward.w1.weight",
          "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
          "input_layernorm.weight": "attention_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight"}


def _internlm2(src, dst, arch, nh, nkv, hd):
    """src's Llama checkpoint rewritten as InternLM2 in dst."""
    w = load_file(os.path.join(src, "model.safetensors"))
    out, g = {}, nh // nkv
    for name, t in w.items():
        if name == "model.embed_tokens.weight":
            out["model.tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out[name] = t
        elif name == "score.weight":
            out["v_head.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        elif name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            pre, kind = name.rsplit("self_attn.", 1)[0], name.rsplit(".", 1)[1]
            rest = t.shape[1:]
            q = t.view(nkv, g, hd, *rest)
            k = w[f"{pre}self_attn.k_proj.{kind}"].view(nkv, 1, hd, *rest)
            v = w[f"{pre}self_attn.v_proj.{kind}"].view(nkv, 1, hd, *rest)
            out[f"{pre}attention.wqkv.{kind}"] = torch.cat([q, k, v], 1).reshape(-1, *rest)
        elif name.split(".", 3)[-1] in _NAMES:  # model.layers.{i}.{key}
            _, _, i, key = name.split(".", 3)
            out[f"model.layers.{i}.{_NAMES[key]}"] = t
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(model_type="internlm2", architectures=[arch], bias=bool(cfg.get("attention_bias")),
               auto_map={"AutoModel": "modeling_internlm2.InternLM2ForRewardModel"},
               rope_scaling={"type": "dynamic", "factor": 2.0})
    for k in ("head_dim", "attention_bias", "mlp_bias"):
        cfg.pop(k, None)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special_tokens")) or f == "vocab.json" or f == "merges.txt":
            os.symlink(os.path.join(src, f), os.path.join(dst, f))


@pytest.mark.parametrize("nh, nkv, bias", [
    (4, 2, False),  # groups of 2
    (4, 1, False),  # one kv head for all
    (2, 2, True),   # MHA, with wqkv and wo biases ("bias": true)
])
def test_reward_model_matches_llama(tmp_path, nh, nkv, bias):
    src, dst = tmp_path / "llama", tmp_path / "internlm2"
    dst.mkdir()
    cfg = AutoConfig.for_model("llama", num_attention_heads=nh, num_key_value_heads=nkv, attention_bias=bias,
                               **_COMMON)
    model, _ = save_tiny(src, cfg, tokenizer="decoder")
    _internlm2(src, dst, "InternLM2ForRewardModel", nh, nkv, 64 // nh)
    prompts = random_prompts([1, 5, 40, 130], seed=nh + nkv)
    llm = LLM(str(dst), kernel_backend="torch")
    assert llm.engine.arch == "InternLM2ForRewardModel"
    raw = probs(llm.classify(ids(prompts), use_activation=False, use_tqdm=False))
    ref = hf_logits(model, prompts)
    assert ref.std() > 0.1
    torch.testing.assert_close(raw, ref, atol=1e-4, rtol=1e-5)
    # the default activation of a one-label head: sigmoid
    torch.testing.assert_close(probs(llm.classify(ids(prompts), use_tqdm=False)), ref.sigmoid(), atol=1e-5, rtol=0)


def test_causal_lm_with_a_token_head(tmp_path):
    from transformers import AutoModelForCausalLM

    from tiny import randomize
    src, dst = tmp_path / "llama", tmp_path / "internlm2"
    dst.mkdir()
    save_tiny(src, AutoConfig.for_model("llama", num_attention_heads=4, num_key_value_heads=2, **_COMMON),
              tokenizer="decoder")
    lm = randomize(AutoModelForCausalLM.from_pretrained(src), 0.3, 1).eval()
    lm.config.tie_word_embeddings = False
    lm.save_pretrained(src)
    _internlm2(src, dst, "InternLM2ForCausalLM", 4, 2, 16)
    llm = LLM(str(dst), kernel_backend="torch", hf_overrides={"classifier_from_token": [7, 9],
                                                              "method": "from_2_way_softmax"})
    prompts = random_prompts([3, 30], seed=3)
    got = probs(llm.classify(ids(prompts), use_tqdm=False))[:, 0]
    with torch.no_grad():
        last = torch.stack([lm(torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(got, last[:, [7, 9]].softmax(-1)[:, 1], atol=1e-5, rtol=0)
