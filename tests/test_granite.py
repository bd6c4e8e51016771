"""Granite causal LMs as classifiers (pyengine.models.granite): a head built from the LM
rows of chosen tokens, against transformers' GraniteForCausalLM logits (its multipliers
and logits_scaling set away from 1, so each one shows)."""
import torch
from transformers import GraniteConfig, GraniteForCausalLM

from model_checks import token_prompts
from pyengine import LLM
from tiny import randomize, write_bpe_tokenizer

LENS = [1, 4, 17, 60]


def save_granite(path, seed=0):
    cfg = GraniteConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                        embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.4,
                        logits_scaling=2.5, tie_word_embeddings=False, architectures=["GraniteForCausalLM"])
    torch.manual_seed(seed)
    model = randomize(GraniteForCausalLM(cfg), 0.3, seed).eval()
    model.save_pretrained(path)
    return model, write_bpe_tokenizer(path, "decoder")


def lm_logits(model, ps, ids):
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0, -1, ids].float() for p in ps])


def test_yes_no_head_matches_the_lm(tmp_path):
    """from_2_way_softmax: sigmoid of the (yes - no) row equals the softmax of
    transformers' two (scaled) LM logits; no_post_processing: the scaled logits
    themselves."""
    model, tok = save_granite(tmp_path)
    ids = tok.convert_tokens_to_ids(["no", "yes", "cat"])
    ps = token_prompts(1, LENS, high=300)
    ref = lm_logits(model, ps, ids)
    assert ref.std() > 0.1
    two = LLM(str(tmp_path), dtype="float32", kernel_backend="torch",
              hf_overrides={"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"})
    got = torch.tensor([o.outputs.probs[0] for o in two.classify([{"prompt_token_ids": p} for p in ps],
                                                                  use_tqdm=False)])
    assert torch.allclose(got, ref[:, :2].softmax(-1)[:, 1], atol=1e-5, rtol=0), (got, ref)
    raw = LLM(str(tmp_path), dtype="float32", kernel_backend="torch",
              hf_overrides={"classifier_from_token": ["no", "yes", "cat"], "method": "no_post_processing"})
    got = torch.tensor([o.outputs.probs for o in raw.classify([{"prompt_token_ids": p} for p in ps],
                                                               use_activation=False, use_tqdm=False)])
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got, ref)
