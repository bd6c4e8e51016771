"""Bidirectional rerankers on the shared decoder code: mGTE's GteNew (remote code, so
checked against a float64 reference written here) and LlamaBidirectional (checked
against transformers' Llama run with a non-causal mask)."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig

from pyengine import LLM
from tiny import save_tiny, write_bpe_tokenizer

ATOL = 1e-4
LENS = [1, 2, 5, 17, 64, 130, 300]


def random_prompts(lens, seed, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


# ---------------------------------------------------------------------------------- mGTE
GTE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
           hidden_act="gelu", max_position_embeddings=512, type_vocab_size=1, layer_norm_eps=1e-12,
           position_embedding_type="rope", rope_theta=20000.0, pad_token_id=1, num_labels=1,
           logn_attention_scale=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GTE_VARIANTS = {
    # the published reranker's settings: packed qkv, LayerNorm, fixed NTK rope scaling
    "ntk-layernorm": dict(layer_norm_type="layer_norm", pack_qkv=True, rope_scaling={"type": "ntk", "factor": 2.0}),
    # separate q/k/v, RMSNorm in the layers, mixed NTK
    "mixed-ntk-rmsnorm": dict(layer_norm_type="rms_norm", pack_qkv=False,
                              rope_scaling={"type": "ntk", "factor": 4.0, "mixed_b": 0.8}),
}


def gte_weights(cfg, seed):
    """Random weights named as mGTE's remote modeling code names them (float64)."""
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def r(*shape, std=0.3):
        return std * torch.randn(*shape, generator=g, dtype=torch.float64)

    def ln():
        return 1 + 0.1 * torch.randn(H, generator=g, dtype=torch.float64)

    w = {"new.embeddings.word_embeddings.weight": r(V, H), "new.embeddings.token_type_embeddings.weight": r(1, H),
         "new.embeddings.LayerNorm.weight": ln(), "new.embeddings.LayerNorm.bias": r(H),
         "new.pooler.dense.weight": r(H, H), "new.pooler.dense.bias": r(H),
         "classifier.weight": r(1, H), "classifier.bias": r(1)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"new.encoder.layer.{i}."
        if cfg["pack_qkv"]:
            w[p + "attention.qkv_proj.weight"], w[p + "attention.qkv_proj.bias"] = r(3 * H, H), r(3 * H)
        else:
            for n in "qkv":
                w[p + f"attention.{n}_proj.weight"], w[p + f"attention.{n}_proj.bias"] = r(H, H), r(H)
        w[p + "attention.o_proj.weight"], w[p + "attention.o_proj.bias"] = r(H, H), r(H)
        w[p + "mlp.up_gate_proj.weight"] = r(2 * I, H)
        w[p + "mlp.down_proj.weight"], w[p + "mlp.down_proj.bias"] = r(H, I), r(H)
        w[p + "attn_ln.weight"], w[p + "mlp_ln.weight"] = ln(), ln()
        if cfg["layer_norm_type"] == "layer_norm":
            w[p + "attn_ln.bias"], w[p + "mlp_ln.bias"] = r(H), r(H)
    return w


def gte_reference(cfg, w, ids_):
    """mGTE's forward for one sequence in float64, from its documented structure:
    embeddings + LayerNorm; post-norm layers of rotary self-attention (NTK-scaled
    frequencies) and a GeGLU MLP whose fused projection is [up | gate]; [CLS] pooler
    dense + tanh; classifier. Returns the logit (num_labels,)."""
    H, I, nh = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    hd, eps, S = H // nh, cfg["layer_norm_eps"], len(ids_)
    rms = cfg["layer_norm_type"] == "rms_norm"

    def norm(x, name):
        if rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name + ".weight"]
        return F.layer_norm(x, (H,), w[name + ".weight"], w[name + ".bias"], eps)

    base, sc = cfg["rope_theta"], cfg["rope_scaling"]
    f, mixed_b = sc["factor"], sc.get("mixed_b")
    j = torch.arange(0, hd, 2, dtype=torch.float64) / hd
    if mixed_b is None:
        inv = 1.0 / (base * f) ** j / f ** (2 / hd)
    else:
        lam = torch.exp(math.log(f) / (hd / 2) ** mixed_b * torch.arange(1, hd // 2 + 1, dtype=torch.float64)
                        ** mixed_b)
        inv = 1.0 / base ** j / lam
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rot(x):  # (S, nh, hd)
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    x = w["new.embeddings.word_embeddings.weight"][ids_] + w["new.embeddings.token_type_embeddings.weight"][0]
    x = F.layer_norm(x, (H,), w["new.embeddings.LayerNorm.weight"], w["new.embeddings.LayerNorm.bias"], eps)
    for i in range(cfg["num_hidden_layers"]):
        p = f"new.encoder.layer.{i}."
        if cfg["pack_qkv"]:
            q, k, v = (x @ w[p + "attention.qkv_proj.weight"].T + w[p + "attention.qkv_proj.bias"]).split(H, -1)
        else:
            q, k, v = (x @ w[p + f"attention.{n}_proj.weight"].T + w[p + f"attention.{n}_proj.bias"] for n in "qkv")
        q, k, v = (t.view(S, nh, hd) for t in (q, k, v))
        q, k = rot(q), rot(k)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(S, H)
        x = norm(x + o @ w[p + "attention.o_proj.weight"].T + w[p + "attention.o_proj.bias"], p + "attn_ln")
        up, gate = (x @ w[p + "mlp.up_gate_proj.weight"].T).split(I, -1)
        m = (F.gelu(gate) * up) @ w[p + "mlp.down_proj.weight"].T + w[p + "mlp.down_proj.bias"]
        x = norm(x + m, p + "mlp_ln")
    pooled = torch.tanh(x[0] @ w["new.pooler.dense.weight"].T + w["new.pooler.dense.bias"])
    return pooled @ w["classifier.weight"].T + w["classifier.bias"]


@pytest.fixture(scope="module", params=list(GTE_VARIANTS))
def gte(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gte-" + request.param)
    cfg = dict(GTE, **GTE_VARIANTS[request.param])
    raw = dict(cfg, architectures=["NewForSequenceClassification"], model_type="new",
               auto_map={"AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig",
                         "AutoModelForSequenceClassification": "Alibaba-NLP/new-impl--modeling.NewForSequenceClassification"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    w = gte_weights(cfg, seed=len(request.param))
    save_file({k: v.float().contiguous() for k, v in w.items()}, os.path.join(path, "model.safetensors"))
    tok = write_bpe_tokenizer(path, "roberta")
    # The reference uses the fp32-rounded weights the engine loads.
    return path, cfg, {k: v.float().double() for k, v in w.items()}, tok


def test_gte_new_matches_float64_reference(gte):
    path, cfg, w, _ = gte
    prompts = random_prompts(LENS, seed=1)
    llm = LLM(str(path), kernel_backend="torch", hf_overrides={"architectures": ["GteNewForSequenceClassification"]})
    got = torch.tensor([o.outputs.probs for o in llm.classify(ids(prompts), use_tqdm=False)])
    ref = torch.stack([gte_reference(cfg, w, p) for p in prompts]).sigmoid().float()
    assert (ref - 0.5).abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # batch invariance: alone vs packed
    alone = torch.tensor([llm.classify(ids([p]), use_tqdm=False)[0].outputs.probs for p in prompts])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_gte_new_scores_text_pairs(gte):
    """The checkpoint's own architecture name works too; pairs use the tokenizer's pair
    encoding (<s> q </s></s> d </s>)."""
    path, cfg, w, tok = gte
    llm = LLM(str(path), kernel_backend="torch")
    assert llm.engine.arch == "NewForSequenceClassification"
    docs = ["the cat sat on a mat", "green is a fast dog", "why"]
    got = torch.tensor([o.outputs.score for o in llm.score("where is the cat", docs, use_tqdm=False)])
    ref = torch.stack([gte_reference(cfg, w, tok("where is the cat", d).input_ids)[0] for d in docs]).sigmoid()
    torch.testing.assert_close(got, ref.float(), atol=ATOL, rtol=0)


def test_gte_new_unsupported_options(gte):
    path, _, _, _ = gte
    with pytest.raises(ValueError, match="logn_attention_scale=True is not supported"):
        LLM(str(path), kernel_backend="torch", hf_overrides={"logn_attention_scale": True})
    with pytest.raises(ValueError, match="position_embedding_type='absolute' is not supported"):
        LLM(str(path), kernel_backend="torch", hf_overrides={"position_embedding_type": "absolute"})


# ---------------------------------------------------------------------- LlamaBidirectional
@pytest.fixture(scope="module")
def llama_bidirectional(tmp_path_factory):
    """A LlamaForSequenceClassification checkpoint relabelled as NVIDIA's remote-code
    LlamaBidirectional (model_type "llama_bidirec", pooling and temperature keys)."""
    path = tmp_path_factory.mktemp("llama-bidirec")
    cfg = AutoConfig.for_model("llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                               max_position_embeddings=512, pad_token_id=0, num_labels=1)
    model, _ = save_tiny(path, cfg, tokenizer="decoder")
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw.update(architectures=["LlamaBidirectionalForSequenceClassification"], model_type="llama_bidirec",
               pooling="avg", temperature=2.0,
               auto_map={"AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return path, model


def hf_bidirectional(model, prompt, pooling, temperature):
    """transformers' Llama with an all-visible 4-D mask, pooled as LlamaBidirectional."""
    x = torch.tensor([prompt])
    mask = torch.zeros(1, 1, len(prompt), len(prompt))  # additive: nothing masked
    with torch.no_grad():
        h = model.model(x, attention_mask=mask).last_hidden_state[0]
        causal = model.model(x).last_hidden_state[0]
        pooled = {"avg": h.mean(0), "cls": h[0], "last": h[-1]}[pooling]
        logit = model.score(pooled).float() / temperature
    if len(prompt) > 1:
        assert (h[0] - causal[0]).abs().max() > 1e-3  # the mask really is bidirectional
    return logit


@pytest.mark.parametrize("pooling", ["avg", "cls", "last"])
def test_llama_bidirectional_matches_transformers(llama_bidirectional, pooling):
    path, model = llama_bidirectional
    overrides = {} if pooling == "avg" else {"pooling": pooling}
    llm = LLM(str(path), kernel_backend="torch", hf_overrides=overrides)
    prompts = random_prompts(LENS, seed=2)
    got = torch.tensor([o.outputs.data.tolist() for o in llm.encode(ids(prompts), use_activation=False,
                                                                       use_tqdm=False)])
    ref = torch.stack([hf_bidirectional(model, p, pooling, 2.0) for p in prompts])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in llm.classify(ids(prompts), use_tqdm=False)]),
                               ref.sigmoid(), atol=ATOL, rtol=0)


def test_llama_bidirectional_bad_pooling(llama_bidirectional):
    path, _ = llama_bidirectional
    with pytest.raises(ValueError, match="config pooling='weighted' is not supported"):
        LLM(str(path), kernel_backend="torch", hf_overrides={"pooling": "weighted"})
