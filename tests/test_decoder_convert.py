"""Causal LMs as classifiers (classifier_from_token, from_2_way_softmax,
no_post_processing, the Qwen3-Reranker shorthand) and score templates, against
transformers' own *ForCausalLM on the same weights."""
import os
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from pyengine import LLM
from tiny import randomize, save_tiny, write_bpe_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, head_dim=16, max_position_embeddings=512, pad_token_id=0)
NO, YES = 271, 297  # "no" and "yes" in tiny.write_bpe_tokenizer's decoder vocabulary


def save_causal(path, config, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model, 0.3, seed).eval()
    model.save_pretrained(path)
    return model, write_bpe_tokenizer(path, "decoder")


def weight_names(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


def last_logits(model, prompts):
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0, -1].float() for p in prompts])


def random_prompts(lens, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 320, (n,), generator=g).tolist() for n in lens]


def ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def probs(outs):
    return torch.tensor([o.outputs.probs for o in outs])


@pytest.fixture(scope="module")
def qwen3_causal(tmp_path_factory):
    """Tied embeddings: the checkpoint has no lm_head.weight."""
    path = tmp_path_factory.mktemp("qwen3-causal")
    model, tok = save_causal(path, AutoConfig.for_model("qwen3", tie_word_embeddings=True, **_COMMON))
    assert "lm_head.weight" not in weight_names(path)
    return path, model, tok


def test_qwen3_reranker_shorthand(qwen3_causal):
    path, model, tok = qwen3_causal
    assert tok.convert_ids_to_tokens([NO, YES]) == ["no", "yes"]
    llm = LLM(str(path), kernel_backend="torch", hf_overrides={"is_original_qwen3_reranker": True})
    assert llm.engine.arch == "Qwen3ForSequenceClassification" and llm.engine.num_labels == 1
    prompts = random_prompts([1, 9, 70, 260], seed=1)
    got = probs(llm.classify(ids(prompts), use_tqdm=False))[:, 0]
    ref = last_logits(model, prompts)[:, [NO, YES]].softmax(-1)[:, 1]
    assert (ref - 0.5).abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_from_2_way_softmax_untied_causal_lm_auto_converted(tmp_path):
    """LlamaForCausalLM has no seq-cls head in the registry: convert="auto" converts it."""
    model, _ = save_causal(tmp_path, AutoConfig.for_model("llama", tie_word_embeddings=False, **_COMMON), seed=2)
    assert "lm_head.weight" in weight_names(tmp_path)
    llm = LLM(str(tmp_path), kernel_backend="torch",
              hf_overrides={"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"})
    assert llm.engine.arch == "LlamaForCausalLM"
    prompts = random_prompts([3, 33, 150], seed=3)
    got = probs(llm.classify(ids(prompts), use_tqdm=False))[:, 0]
    ref = last_logits(model, prompts)[:, [NO, YES]].softmax(-1)[:, 1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_from_2_way_softmax_is_a_sigmoid_whatever_the_problem_type(tmp_path):
    # The one logit is the log-odds of "yes": a problem_type in the language model's
    # config (here regression, which would mean identity) does not change its activation.
    model, _ = save_causal(tmp_path, AutoConfig.for_model("qwen3", problem_type="regression", **_COMMON), seed=5)
    llm = LLM(str(tmp_path), kernel_backend="torch",
              hf_overrides={"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"})
    prompts = random_prompts([4, 21], seed=6)
    got = probs(llm.classify(ids(prompts), use_tqdm=False))[:, 0]
    ref = last_logits(model, prompts)[:, [NO, YES]].softmax(-1)[:, 1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokens", [["yes"], [5, 17, 250]])
def test_no_post_processing(tmp_path, tokens):
    """Head rows W_lm[tokens]: one token is a sigmoid score, several a softmax over them."""
    model, tok = save_causal(tmp_path, AutoConfig.for_model("gemma", **_COMMON), seed=4)
    llm = LLM(str(tmp_path), kernel_backend="torch", convert="classify",
              hf_overrides={"classifier_from_token": tokens, "method": "no_post_processing"})
    assert llm.engine.num_labels == len(tokens)
    prompts = random_prompts([2, 40, 120], seed=5)
    got = probs(llm.classify(ids(prompts), use_tqdm=False))
    cols = [t if isinstance(t, int) else tok.convert_tokens_to_ids(t) for t in tokens]
    logits = last_logits(model, prompts)[:, cols]
    ref = logits.sigmoid() if len(tokens) == 1 else logits.softmax(-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def render(template_text, q, d):
    """An independent rendering: plain Jinja, the file's trailing newline kept."""
    return jinja2.Environment(keep_trailing_newline=True).from_string(template_text).render(query=q, document=d)


def test_score_template_rerank_end_to_end(qwen3_causal):
    path, model, tok = qwen3_causal
    llm = LLM(str(path), kernel_backend="torch", hf_overrides={"is_original_qwen3_reranker": True})
    text = (EXAMPLES / "qwen3_reranker.jinja").read_text()
    assert text.endswith("</think>\n\n")
    query = "what is the cat on"
    docs = ["the cat sat on a mat", "blue is not red", "a dog was there", "the cat is on the mat, yes"]
    ref = last_logits(model, [tok(render(text, query, d)).input_ids for d in docs])
    ref = ref[:, [NO, YES]].softmax(-1)[:, 1]
    for template in (str(EXAMPLES / "qwen3_reranker.jinja"), EXAMPLES / "qwen3_reranker.jinja", text):
        got = torch.tensor([o.outputs.score for o in llm.score(query, docs, score_template=template,
                                                                 use_tqdm=False)])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # N:N pairs, and the rendered prompt is what the outputs report
    outs = llm.score([query, "why"], docs[:2], score_template=text, use_tqdm=False)
    assert outs[1].prompt_token_ids == tok(render(text, "why", docs[1])).input_ids


def test_vllm_style_messages_template(qwen3_causal):
    """A template that reads the pair as vLLM's score templates do, from ``messages`` with
    roles query and document, passed under vLLM's name ``chat_template``: the same
    prompts and scores as the variables version."""
    path, _, _ = qwen3_causal
    llm = LLM(str(path), kernel_backend="torch", hf_overrides={"is_original_qwen3_reranker": True})
    text = (EXAMPLES / "qwen3_reranker.jinja").read_text()
    pick = '{{{{ (messages | selectattr("role", "eq", "{}") | first).content }}}}'
    vllm_style = text.replace("{{ query }}", pick.format("query")).replace("{{ document }}", pick.format("document"))
    assert "{{ query }}" not in vllm_style
    docs = ["the cat sat on a mat", "blue is not red"]
    want = llm.score("what is the cat on", docs, score_template=text, use_tqdm=False)
    got = llm.score("what is the cat on", docs, chat_template=vllm_style, use_tqdm=False)
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in want]
    assert [o.outputs.score for o in got] == [o.outputs.score for o in want]
    with pytest.raises(ValueError, match="not both"):
        llm.score("q", ["d"], score_template=text, chat_template=text, use_tqdm=False)


def test_decoder_pairs_without_template(tmp_path):
    cfg = AutoConfig.for_model("qwen3", num_labels=1, **_COMMON)
    model, tok = save_tiny(tmp_path, cfg, tokenizer="decoder")
    llm = LLM(str(tmp_path), kernel_backend="torch")
    docs = ["the cat sat", "no it is red"]
    got = torch.tensor([o.outputs.score for o in llm.score("what is it", docs, use_tqdm=False)])
    with torch.no_grad():
        ref = torch.stack([model(**tok("what is it", text_pair=d, return_tensors="pt")).logits[0, 0].float()
                           for d in docs]).sigmoid()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides,convert,match", [
    ({}, "none", "has no classification head; pass convert='classify'"),
    ({}, "auto", r"no classifier head \(score.weight\)"),
    ({"classifier_from_token": ["no", "yes"]}, "auto", "needs method in"),
    ({"method": "from_2_way_softmax"}, "auto", "needs classifier_from_token"),
    ({"classifier_from_token": ["no", "yes", "the"], "method": "from_2_way_softmax"}, "auto", "exactly two tokens"),
    ({"classifier_from_token": ["no", "zebra"], "method": "from_2_way_softmax"}, "auto", "'zebra' is not a single"),
    ({"classifier_from_token": [3, 999], "method": "from_2_way_softmax"}, "auto", "id 999 is outside"),
    ({"classifier_from_token": "yes", "method": "no_post_processing"}, "auto", "must be a non-empty list"),
])
def test_conversion_errors(qwen3_causal, overrides, convert, match):
    path, _, _ = qwen3_causal
    with pytest.raises(ValueError, match=match):
        LLM(str(path), kernel_backend="torch", convert=convert, hf_overrides=overrides)


def test_token_head_needs_lm_head_when_untied(tmp_path):
    model, _ = save_causal(tmp_path, AutoConfig.for_model("llama", tie_word_embeddings=False, **_COMMON))
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(ValueError, match="no lm_head.weight and tie_word_embeddings is false"):
        LLM(str(tmp_path), kernel_backend="torch",
            hf_overrides={"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"})


@pytest.mark.parametrize("template,err,match", [
    ("{{ query }} only", ValueError, "both variables 'query' and 'document'"),
    ("{{ query }} {% if document %}", ValueError, "Jinja syntax error at line 1"),
    ("{{ query }} {{ document }} {{ missing }}", ValueError, "failed on pair 0"),
    ("/no/such/template.jinja", FileNotFoundError, "neither Jinja source"),
])
def test_bad_score_template(qwen3_causal, template, err, match):
    path, _, _ = qwen3_causal
    llm = LLM(str(path), kernel_backend="torch", hf_overrides={"is_original_qwen3_reranker": True})
    with pytest.raises(err, match=match):
        llm.score("q", ["d"], score_template=template, use_tqdm=False)
