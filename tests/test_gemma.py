"""Gemma 2 and Gemma 3 classifiers (pyengine.models.gemma3) against transformers' own
models on the same weights and token ids: Gemma3TextForSequenceClassification, the
multimodal Gemma3ForSequenceClassification on text prompts, a Gemma3ForCausalLM read as a
yes/no classifier, and Gemma2ForSequenceClassification with soft-capped attention."""
import copy

import pytest
import torch
from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig

from pyengine import LLM
from model_checks import ATOL, assert_batch_invariant, assert_bf16_bar, assert_matches_transformers, engine_logits, \
    hf_logits, token_prompts
from test_engine import report
from tiny import save_tiny
# 1: one token; 5: inside the 8-token window; 20, 60: past it (and past a 32-key block)
LENS = [1, 5, 20, 60]


def text_config(num_labels=3, arch="Gemma3TextForSequenceClassification", hidden=64, heads=4, head_dim=16, **kw):
    """Layers 0, 2, 3 slide over 8 tokens, layer 1 is global; the global rotary base is
    linearly scaled (as Gemma 3 4B and up), the local one is not; queries scaled by
    query_pre_attn_scalar, not head_dim."""
    return Gemma3TextConfig(vocab_size=320, hidden_size=hidden, intermediate_size=96, num_hidden_layers=4,
                            num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=head_dim,
                            max_position_embeddings=512, sliding_window=8, query_pre_attn_scalar=24,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                         "sliding_attention"],
                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                "rope_theta": 1000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}},
                            num_labels=num_labels, pad_token_id=0, architectures=[arch], **kw)


def prompts(seed, lens=LENS):
    return token_prompts(seed, lens, high=300)


logits, ours = hf_logits, engine_logits


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    model, _ = save_tiny(path, text_config(), seed=2, tokenizer="decoder")
    return path, model


def test_logits_match_transformers(gemma3):
    assert_matches_transformers(*gemma3, prompts(1))


def test_batch_invariance(gemma3):
    assert_batch_invariant(gemma3[0], prompts(2))


def test_triton_kernels_in_the_interpreter(gemma3):
    """Windowed and global attention, q/k (1 + w) norms with rotary from two tables, the
    sandwich norms, on the Triton backend."""
    assert_matches_transformers(*gemma3, prompts(3, [1, 20, 40]), kernel_backend="triton")


def test_multimodal_wrapper_on_text_prompts(tmp_path):
    """Gemma3ForSequenceClassification (a vision tower beside the language model, its
    weights under model.language_model.*): text prompts as transformers gives them."""
    from transformers import SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    text = text_config(arch="Gemma3ForSequenceClassification").to_dict()
    cfg = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4, num_labels=2,
                       architectures=["Gemma3ForSequenceClassification"], image_token_index=310,
                       boi_token_index=311, eoi_token_index=312)
    torch.manual_seed(0)
    model, _ = save_tiny(tmp_path, cfg, seed=4, tokenizer="decoder")
    assert type(model).__name__ == "Gemma3ForSequenceClassification"
    ps = prompts(5)
    ref = logits(model, ps)
    got = ours(tmp_path, ps)
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)
    with pytest.raises(ValueError, match="takes text only"):
        LLM(str(tmp_path), dtype="float32", kernel_backend="torch").classify(
            [{"prompt": "x", "multi_modal_data": {"image": torch.zeros(28, 28, 3, dtype=torch.uint8)}}])


def test_causal_lm_as_a_yes_no_classifier(tmp_path):
    """Gemma3ForCausalLM with classifier_from_token ["no", "yes"]: the sigmoid of the
    W_yes - W_no row equals the softmax of transformers' two LM logits (tied embeddings)."""
    from transformers import Gemma3ForCausalLM

    from tiny import randomize, write_bpe_tokenizer

    cfg = text_config(arch="Gemma3ForCausalLM", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    randomize(model, 0.3, 6)
    model.save_pretrained(tmp_path)
    tok = write_bpe_tokenizer(tmp_path, "decoder")
    no, yes = tok.convert_tokens_to_ids(["no", "yes"])
    ps = prompts(6)
    with torch.no_grad():
        ref = torch.stack([model(torch.tensor([p])).logits[0, -1, [no, yes]].float().softmax(-1)[1] for p in ps])
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch",
              hf_overrides={"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"})
    got = torch.tensor([o.outputs.probs[0] for o in llm.classify([{"prompt_token_ids": p} for p in ps],
                                                                  use_tqdm=False)])
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got, ref)


@pytest.mark.parametrize("override, match", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    # a yes/no head is a linear map of the LM logits only without a final cap
    ({"architectures": ["Gemma3ForCausalLM"], "classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax",
      "final_logit_softcapping": 30.0}, "classifier_from_token with final_logit_softcapping=30.0"),
])
def test_unsupported_options_are_refused(gemma3, override, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(gemma3[0]), dtype="float32", kernel_backend="torch", hf_overrides=override)


def test_gemma3_ignores_attention_soft_capping_as_transformers_does(tmp_path):
    """Gemma 3's config carries attn_logit_softcapping, but transformers' Gemma 3 attention
    never applies it; a small cap (1.0) would move every logit if it were applied."""
    model, _ = save_tiny(tmp_path, text_config(attn_logit_softcapping=1.0), seed=4, tokenizer="decoder")
    assert_matches_transformers(tmp_path, model, prompts(7))


# ---------------------------------------------------------------------------- Gemma 2
def gemma2_config(hidden=64, heads=4, head_dim=16, softcap=3.0):
    """Gemma 2 with its attention scores soft-capped (3.0: most scores bend; Gemma 2
    itself uses 50), the last layer sliding so the pooled-rows attention runs a window."""
    return Gemma2Config(vocab_size=320, hidden_size=hidden, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=head_dim,
                        max_position_embeddings=512, sliding_window=8, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
                        attn_logit_softcapping=softcap, num_labels=3, pad_token_id=0,
                        architectures=["Gemma2ForSequenceClassification"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemma2_soft_capped_attention_matches_transformers(backend, tmp_path):
    model, _ = save_tiny(tmp_path, gemma2_config(), seed=11, tokenizer="decoder")
    ps = prompts(12, [1, 5, 20, 40] if backend == "triton" else LENS)
    ref = logits(model, ps)
    got = ours(tmp_path, ps, kernel_backend=backend)
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)
    # the cap matters: without it the same weights give other logits
    uncapped = ours(tmp_path, ps, kernel_backend=backend, hf_overrides={"attn_logit_softcapping": None})
    assert (uncapped - ref).abs().max() > 1e-2
    if backend == "torch":
        with pytest.raises(ValueError, match="attn_logit_softcapping must be a positive number, got -1.0"):
            ours(tmp_path, ps, hf_overrides={"attn_logit_softcapping": -1.0})


@pytest.mark.gpu
def test_gemma2_bf16_on_gpu(tmp_path):
    """Gemma 2's shape on the GPU (head_dim 256, scores capped at 50) in bf16 against
    transformers in fp32."""
    # Norm weights about 0 (Gemma scales by 1 + weight). Even so transformers' own bf16 run
    # of this model is 0.06 off its fp32 run: the bar allows for that.
    model, _ = save_tiny(tmp_path, gemma2_config(hidden=512, heads=4, head_dim=256, softcap=50.0), seed=13,
                         tokenizer="decoder", norm_center=0.0)
    ps = prompts(14, [1, 7, 64, 200, 333, 31] * 4)
    got = ours(tmp_path, ps, kernel_backend="auto", dtype="bfloat16", device="cuda").softmax(-1)
    ref = logits(model.float(), ps).softmax(-1)
    assert_bf16_bar(got, ref, logits(copy.deepcopy(model).to(torch.bfloat16), ps).float().softmax(-1))


@pytest.mark.gpu
def test_bf16_on_gpu(tmp_path):
    """bf16 on the default kernels (head_dim 64) against transformers in fp32: within
    2e-2 on probabilities, the same argmax."""
    # Weights of N(0, 0.1), norm weights about 0 (Gemma scales by 1 + weight): with 1 + 1
    # and N(0, 0.3) transformers' own bf16 run is 0.08 off its fp32 run.
    model, _ = save_tiny(tmp_path, text_config(hidden=256, heads=4, head_dim=64), seed=7, tokenizer="decoder",
                         std=0.1, norm_center=0.0)
    ps = prompts(8, [1, 7, 64, 200, 333, 31] * 4)
    got = ours(tmp_path, ps, kernel_backend="auto", dtype="bfloat16", device="cuda").softmax(-1)
    ref = logits(model.float(), ps).softmax(-1)
    assert torch.allclose(got, ref, atol=2e-2, rtol=0), report(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99


@pytest.mark.parametrize("arch, keys", [
    # Gemma 2 reads hidden_activation, and "gelu" there is the exact GELU (not Gemma 1's tanh)
    ("gemma2", {"hidden_activation": "gelu"}),
    # Gemma 3's text model, the same
    ("gemma3_text", {"hidden_activation": "gelu"}),
    # Gemma 1 reads hidden_act alone: a stray hidden_activation key changes nothing
    ("gemma", {"hidden_act": "silu", "hidden_activation": "gelu_pytorch_tanh"}),
])
def test_mlp_activation_read_from_the_families_own_key(tmp_path, arch, keys):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(arch, vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                               num_labels=3, pad_token_id=0, architectures=[f"{arch.title().replace('_', '')}"
                                                                            "ForSequenceClassification"])
    for k, v in keys.items():  # set after __init__, as a config.json carrying them is read
        setattr(cfg, k, v)
    model, _ = save_tiny(tmp_path, cfg, seed=15, tokenizer="decoder")
    assert_matches_transformers(tmp_path, model, prompts(16))
