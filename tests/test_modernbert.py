"""ModernBERT classifiers and cross-encoders (pyengine.models.modernbert) against
transformers' own ModernBertForSequenceClassification on the same weights and token ids."""
import pytest
import torch
from transformers import ModernBertConfig

from pyengine import LLM
from model_checks import ATOL, assert_batch_invariant, assert_matches_transformers, token_prompts
from test_engine import report
from tiny import save_tiny
# 1: a lone token; 3 and 9: inside one local window; 17, 40, 65: past it (windows of 4
# tokens a side here), 65 also past a 64-key block of the Triton kernel
LENS = [1, 3, 9, 17, 40, 65]


def config(pooling="cls", biases=False, num_labels=3, layers=5, hidden=64, heads=4):
    """5 layers with a global layer every 3rd: layers 0 and 3 global, 1, 2, 4 sliding,
    so the last (pooled-rows) layer runs a window."""
    return ModernBertConfig(vocab_size=160, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=512, local_attention=8,
                            global_attn_every_n_layers=3, num_labels=num_labels, classifier_pooling=pooling,
                            norm_bias=biases, attention_bias=biases, mlp_bias=biases, classifier_bias=biases,
                            global_rope_theta=1000.0, local_rope_theta=50.0, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, cls_token_id=1, sep_token_id=2)


def prompts(seed, lens=LENS):
    return token_prompts(seed, lens)


def reference(model, ps):
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0].float() for p in ps])


@pytest.fixture(scope="module", params=[("cls", False), ("mean", True)], ids=["cls", "mean-biases"])
def mb(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("modernbert")
    pooling, biases = request.param
    model, tok = save_tiny(path, config(pooling, biases), seed=3)
    return str(path), model, tok


def test_logits_match_transformers(mb):
    """Raw logits (use_activation=False) and probabilities, fp32, against transformers:
    [CLS] pooling without biases, and mean pooling with every optional bias on."""
    path, model, _ = mb
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    ps = prompts(1)
    ref = reference(model, ps)
    assert ref.std() > 0.1  # logits spread out, so the comparison can fail
    got = torch.tensor([o.outputs.probs for o in llm.classify([{"prompt_token_ids": p} for p in ps],
                                                              use_activation=False, use_tqdm=False)])
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)
    probs = torch.tensor([o.outputs.probs for o in llm.classify([{"prompt_token_ids": p} for p in ps],
                                                                use_tqdm=False)])
    assert torch.allclose(probs, ref.softmax(-1), atol=ATOL, rtol=0), report(probs, ref.softmax(-1))


def test_batch_invariance(mb):
    assert_batch_invariant(mb[0], prompts(2))


def test_triton_kernels_in_the_interpreter(tmp_path):
    """The Triton backend (attention with and without a window, rotary, norms, GeGLU,
    pooled rows) on a ModernBERT, against transformers."""
    model, _ = save_tiny(tmp_path, config("cls", True), seed=4)
    assert_matches_transformers(tmp_path, model, prompts(3, [1, 9, 40]), kernel_backend="triton")


def test_cross_encoder_scores_text_pairs(tmp_path):
    """A one-label ModernBERT reranker (as gte-reranker-modernbert-base): score() on text
    pairs tokenised as the tokenizer encodes a pair, sigmoid of transformers' logit."""
    model, tok = save_tiny(tmp_path, config("cls", False, num_labels=1), seed=5)
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch")
    q, docs = "the cat sat", ["on the mat", "a dog ran far away", "the cat sat on the mat"]
    got = torch.tensor([o.outputs.score for o in llm.score(q, docs, use_tqdm=False)])
    ids = [tok(q, d)["input_ids"] for d in docs]
    ref = reference(model, ids)[:, 0].sigmoid()
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)


def test_lora_adapter_matches_peft(tmp_path):
    """A PEFT adapter on Wqkv, Wo (attention and MLP) and Wi, with the classifier saved
    whole, against PeftModel over transformers' model."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from pyengine import LoRARequest

    base = tmp_path / "base"
    save_tiny(base, config("cls", False), seed=6)
    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(base)
    pm = peft.get_peft_model(m, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                                 init_lora_weights=False, target_modules=["Wqkv", "Wo", "Wi"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape))
    pm.save_pretrained(tmp_path / "adapter")
    ps = prompts(7)
    ref = reference(pm.eval(), ps)
    llm = LLM(str(base), dtype="float32", kernel_backend="torch", enable_lora=True)
    got = llm.classify([{"prompt_token_ids": p} for p in ps], use_activation=False, use_tqdm=False,
                       lora_request=LoRARequest("a", 1, str(tmp_path / "adapter")))
    got = torch.tensor([o.outputs.probs for o in got])
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), report(got, ref)


def test_a_checkpoint_with_biases_its_config_lacks_is_refused(tmp_path):
    import json

    save_tiny(tmp_path, config("cls", True), seed=8)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["norm_bias"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"the checkpoint has \S*norm\.bias, which this config does not"):
        LLM(str(tmp_path), dtype="float32", kernel_backend="torch")


@pytest.mark.gpu
def test_bf16_on_gpu(tmp_path):
    """bf16 on the default kernels (head_dim 64) against transformers in fp32: within
    2e-2 on probabilities, the same argmax."""
    # Weights of N(0, 0.05): at the CPU tests' 0.3 this width-256 model is so ill-conditioned
    # that transformers' own bf16 run is 0.5 off its fp32 run on probabilities.
    model, _ = save_tiny(tmp_path, config("cls", True, hidden=256, heads=4), seed=9, std=0.05)
    ps = prompts(10, [1, 7, 64, 200, 333, 31] * 4)
    got = torch.tensor([o.outputs.probs for o in LLM(str(tmp_path), dtype="bfloat16", device="cuda").classify(
        [{"prompt_token_ids": p} for p in ps], use_tqdm=False)])
    ref = reference(model.float(), ps).softmax(-1)
    assert torch.allclose(got, ref, atol=2e-2, rtol=0), report(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99
