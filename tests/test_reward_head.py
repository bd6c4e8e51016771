"""Qwen2ForRewardModel (Qwen2.5-Math-RM: remote code) against transformers' Qwen2 backbone
on the same weights followed by its two-layer head written out in float64."""
import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from model_checks import engine_logits, token_prompts
from tiny import randomize, write_bpe_tokenizer


def test_last_token_reward_matches_the_backbone_and_head(tmp_path):
    cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    model = randomize(Qwen2ForCausalLM(cfg), 0.3, 1).eval()
    model.save_pretrained(tmp_path)
    write_bpe_tokenizer(tmp_path, "decoder")
    g = torch.Generator().manual_seed(2)
    head = {"score.0.weight": torch.randn(64, 64, generator=g) / 8, "score.0.bias": torch.randn(64, generator=g) / 4,
            "score.2.weight": torch.randn(1, 64, generator=g) / 4, "score.2.bias": torch.randn(1, generator=g)}
    weights = load_file(os.path.join(tmp_path, "model.safetensors"))
    del weights["lm_head.weight"]  # the reward model has no LM head
    save_file({**weights, **head}, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["Qwen2ForRewardModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))

    ps = token_prompts(3, [1, 6, 30, 77], high=300)
    with torch.no_grad():
        h = torch.stack([model.model(torch.tensor([p])).last_hidden_state[0, -1] for p in ps]).double()
    hd = {k: v.double() for k, v in head.items()}
    ref = torch.relu(h @ hd["score.0.weight"].t() + hd["score.0.bias"]) @ hd["score.2.weight"].t() + hd["score.2.bias"]
    assert ref.std() > 0.1
    got = engine_logits(tmp_path, ps)
    assert got.shape == (4, 1)  # one label, whatever config.json's num_labels says
    assert torch.allclose(got.double(), ref, atol=1e-4, rtol=0), (got, ref)
