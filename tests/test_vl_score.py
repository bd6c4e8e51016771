"""Scoring pairs that hold images (pyengine.score_items) and jina-reranker-m0
(JinaVLForRanking, pyengine.models.qwen_vl), against transformers' Qwen2-VL on the same
weights with the reranker's head written out here in float64: sigmoid(relu(h W1^T + b1)
W2^T + b2 - 2.65) of the last token of "**Document**:\\n{doc}\\n**Query**:\\n{query}" + [100],
as the checkpoint's own scoring code computes it."""
import base64
import io
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pyengine import LLM
from test_qwen_vl import IMG, PIL, images, last_hidden, save_vl

needs_pil = pytest.mark.skipif(PIL is None, reason="pillow is not installed")
SUFFIX = 100


def save_jina(path, names="remote", width=48):
    """A random Qwen2-VL saved as JinaVLForRanking: the backbone under the hub's names
    (model.layers.*, visual.*), no score.weight, and the two-layer head under the remote
    code's names (score.0 / score.2) or vLLM's (score.dense / score.out_proj), the latter
    with the hub checkpoint's flat config.json of transformers 4 (text settings at the
    top, rope_scaling of type mrope). Returns (transformers model, tokenizer, head)."""
    model, tok, _ = save_vl(path, "2", width=width, num_labels=2, seed=3)
    H = model.config.text_config.hidden_size
    g = torch.Generator().manual_seed(7)
    # Scaled so that the logits spread over a few units around the 2.65 bias: scores
    # between 0.05 and 0.95 rather than all at 0 or 1, where no tolerance could fail.
    head = {"w1": torch.randn(H, H, generator=g) / H ** 0.5, "b1": torch.randn(H, generator=g) * 0.3,
            "w2": torch.randn(1, H, generator=g) * 2 / H ** 0.5, "b2": 2.65 + torch.randn(1, generator=g) * 0.3}
    weights = load_file(os.path.join(path, "model.safetensors"))
    del weights["score.weight"]
    first, second = ("score.0", "score.2") if names == "remote" else ("score.dense", "score.out_proj")
    weights.update({f"{first}.weight": head["w1"], f"{first}.bias": head["b1"], f"{second}.weight": head["w2"],
                    f"{second}.bias": head["b2"]})
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    # config.json as the hub's: its own architecture name, and num_labels left at 2 (the
    # engine fixes it to the head's single label).
    model.config.architectures = ["JinaVLForRanking"]
    model.config.save_pretrained(path)
    if names != "remote":
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        text = cfg.pop("text_config")
        rope = text.pop("rope_parameters")
        text.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
        for k in ("model_type", "layer_types"):
            text.pop(k, None)
        cfg.update(text, num_labels=2, transformers_version="4.47.0",
                   auto_map={"AutoModel": "modeling.JinaVLForRanking"})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
    return model, tok, head


def jina_reference(model, tok, head, query, doc, bias=2.65):
    """(logit, score) in float64 for one pair; query / doc: a str, a uint8 image, or a
    list of them written one after another."""
    imgs = []

    def text(x):
        if isinstance(x, list):
            return "".join(text(y) for y in x)
        if isinstance(x, str):
            return x
        imgs.append(x)
        return IMG

    prompt = f"**Document**:\n{text(doc)}\n**Query**:\n{text(query)}"  # the document's images come first
    ids = tok(prompt)["input_ids"] + [SUFFIX]
    h = last_hidden(model, ids, imgs).double()
    hd = {k: v.double() for k, v in head.items()}
    logit = (torch.relu(h @ hd["w1"].t() + hd["b1"]) @ hd["w2"].t() + hd["b2"])[0]
    return float(logit), float(torch.sigmoid(logit - bias))


def data_url(arr):
    buf = io.BytesIO()
    PIL.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def url_part(arr):
    return {"type": "image_url", "image_url": {"url": data_url(arr)}}


@pytest.fixture(scope="module")
def jina(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("jina"))
    model, tok, head = save_jina(path)
    return path, model, tok, head, LLM(path, dtype="float32", kernel_backend="torch")


@needs_pil
def test_jina_scores_match_the_reference(jina):
    """1:N with text, data-URL and PIL documents; N:N with image queries, given as
    {"content": [...]} on both sides (an image query and an image document: the
    document's image comes first in the prompt, as the template places it)."""
    path, model, tok, head, llm = jina
    a, b, c = images(21)
    docs = ["a plain text document", url_part(a), {"type": "image_pil", "image_pil": PIL.fromarray(b)},
            {"type": "text", "text": "another one"}]
    outs = llm.score("which page shows the chart?", docs, use_tqdm=False)
    want = [jina_reference(model, tok, head, "which page shows the chart?", d)[1]
            for d in ("a plain text document", a, b, "another one")]
    got = [o.outputs.score for o in outs]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert all(o.prompt_token_ids[-1] == SUFFIX for o in outs)
    # Image 1 is 4x6 patches: 6 merged tokens in place of its one placeholder.
    assert outs[1].prompt_token_ids.count(model.config.image_token_id) == 6

    outs = llm.score({"content": [url_part(c), {"type": "text", "text": "a text query"}]},
                     {"content": [url_part(a), url_part(b)]}, use_tqdm=False)
    want = [jina_reference(model, tok, head, c, a)[1], jina_reference(model, tok, head, "a text query", b)[1]]
    np.testing.assert_allclose([o.outputs.score for o in outs], want, atol=1e-4, rtol=0)

    # In a list, {"content": [...]} is one document of several parts: text and images in turn.
    mixed = {"content": [{"type": "text", "text": "page one: "}, url_part(a), {"type": "text", "text": " and "},
                         url_part(b)]}
    outs = llm.score([{"content": [url_part(c), {"type": "text", "text": " what is shown?"}]}],
                     [mixed], use_tqdm=False)
    want = jina_reference(model, tok, head, [c, " what is shown?"], ["page one: ", a, " and ", b])[1]
    assert len(outs) == 1 and outs[0].outputs.score == pytest.approx(want, abs=1e-4)
    assert outs[0].prompt_token_ids.count(model.config.image_token_id) == 6 + 8 + 4


@needs_pil
def test_jina_logit_bias_and_raw_logits(jina, tmp_path):
    """use_activation=False gives the head's raw logit; pooler_config's logit_bias
    replaces the checkpoint's 2.65; the vLLM-named head with a flat transformers-4
    config.json loads the same."""
    path, model, tok, head, llm = jina
    a = images(5)[0]
    logit, _ = jina_reference(model, tok, head, "q", a)
    raw = llm.score("q", url_part(a), use_activation=False, use_tqdm=False)[0].outputs.score
    assert raw == pytest.approx(logit, abs=1e-4)
    zero = LLM(path, dtype="float32", kernel_backend="torch", pooler_config={"logit_bias": 0.0})
    assert zero.score("q", url_part(a), use_tqdm=False)[0].outputs.score == pytest.approx(
        jina_reference(model, tok, head, "q", a, bias=0.0)[1], abs=1e-5)

    other = str(tmp_path / "vllm_names")
    m2, tok2, head2 = save_jina(other, names="vllm")
    got = LLM(other, dtype="float32", kernel_backend="torch").score("q", "some text", use_tqdm=False)
    assert got[0].outputs.score == pytest.approx(jina_reference(m2, tok2, head2, "q", "some text")[1], abs=1e-4)


def test_jina_truncation_keeps_room_for_the_suffix(jina):
    """A truncated score prompt keeps truncate_prompt_tokens tokens in all, its last one
    the suffix; a limit that leaves no room is refused before any work."""
    path, model, tok, head, llm = jina
    long_doc = " ".join(["word"] * 60)
    full = llm.score("q", long_doc, use_tqdm=False)[0]
    cut = llm.score("q", long_doc, truncate_prompt_tokens=12, truncation_side="right", use_tqdm=False)[0]
    assert len(cut.prompt_token_ids) == 12 and cut.prompt_token_ids[-1] == SUFFIX
    assert cut.prompt_token_ids[:11] == full.prompt_token_ids[:11]
    with pytest.raises(ValueError, match="leaves no room"):
        llm.score("q", long_doc, truncate_prompt_tokens=1)


@needs_pil
def test_images_without_a_template_and_with_one(tmp_path):
    """A Qwen2-VL reranker without a score template: a text pair is tokenised as a pair,
    a pair with an image as query then document back to back. With a template, the
    images follow the order the template writes them in. Each equals LLM.classify on
    the same text and images."""
    path = str(tmp_path / "vl")
    save_vl(path, "2", num_labels=1, seed=4)
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    a, b, _ = images(8)
    got = llm.score("find the cat: ", [url_part(a), "plain words"], use_tqdm=False)
    want = llm.classify([{"prompt": "find the cat: " + IMG, "multi_modal_data": {"image": a}}], use_tqdm=False)
    assert got[0].outputs.score == pytest.approx(want[0].outputs.probs[0], abs=1e-6)
    tok = llm.get_tokenizer()
    assert got[1].prompt_token_ids == tok("find the cat: ", "plain words")["input_ids"]

    template = "D: {{ document }} | Q: {{ query }}"
    got = llm.score(url_part(a), [url_part(b)], score_template=template, use_tqdm=False)[0]
    want = llm.classify([{"prompt": f"D: {IMG} | Q: {IMG}", "multi_modal_data": {"image": [b, a]}}],
                        use_tqdm=False)[0]
    assert got.outputs.score == pytest.approx(want.outputs.probs[0], abs=1e-6)
    assert got.prompt_token_ids == want.prompt_token_ids

    # vLLM's score-template style: the pair as messages with roles query and document,
    # the instruction from a default chain over undefined variables
    template = ("<I>{{ instruction | default(messages | selectattr('role', 'eq', 'system') | map(attribute='content')"
                " | first | default('rank it', true), true) }}<Q>{{ messages | selectattr('role', 'eq', 'query') | "
                "map(attribute='content') | first }}<D>{{ messages | selectattr('role', 'eq', 'document') | "
                "map(attribute='content') | first }}")
    doc = {"content": [{"type": "text", "text": "see "}, url_part(b), {"type": "text", "text": " here"}]}
    got = llm.score("a dog", [doc], score_template=template, use_tqdm=False)[0]
    want = llm.classify([{"prompt": f"<I>rank it<Q>a dog<D>see {IMG} here", "multi_modal_data": {"image": b}}],
                        use_tqdm=False)[0]
    assert got.prompt_token_ids == want.prompt_token_ids
    assert got.outputs.score == pytest.approx(want.outputs.probs[0], abs=1e-6)


@needs_pil
def test_mm_processor_kwargs_set_the_pixel_bounds(jina):
    """LLM(mm_processor_kwargs={"max_pixels": ...}) resizes as transformers' processor
    does with that bound in place of the saved one."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path, model, tok, head, llm = jina
    b = images(2)[1]  # 8x4 patches of 14 px: 8 merged tokens at the saved bounds
    small = LLM(path, dtype="float32", kernel_backend="torch", mm_processor_kwargs={"max_pixels": 56 * 56})
    n = [x.prompt_token_ids.count(model.config.image_token_id)
         for x in (llm.score("q", url_part(b), use_tqdm=False)[0], small.score("q", url_part(b), use_tqdm=False)[0])]
    grid = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14)(
        PIL.fromarray(b), return_tensors="pt")["image_grid_thw"][0]
    assert n == [8, int(grid.prod()) // 4] and n[1] < 8
    with pytest.raises(ValueError, match="cannot be set"):
        LLM(path, dtype="float32", kernel_backend="torch", mm_processor_kwargs={"patch_size": 3})
    with pytest.raises(ValueError, match="size must be a dict of shortest_edge"):
        LLM(path, dtype="float32", kernel_backend="torch", mm_processor_kwargs={"size": {"height": 3}})
    with pytest.raises(ValueError, match="positive int"):
        LLM(path, dtype="float32", kernel_backend="torch", mm_processor_kwargs={"max_pixels": -1})
    # transformers 5's name for the bounds, as vLLM's jina-reranker-m0 example passes them
    alias = LLM(path, dtype="float32", kernel_backend="torch", mm_processor_kwargs={"size": {"longest_edge": 3136}})
    assert alias.score("q", url_part(b), use_tqdm=False)[0].prompt_token_ids.count(model.config.image_token_id) == n[1]


@pytest.mark.parametrize("d1, d2, exc, match", [
    # a URL to fetch: nothing is fetched
    ("q", {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, ValueError,
     "not fetched from URLs"),
    ("q", {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}, ValueError, "not valid base64"),
    ("q", {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, ValueError,
     "a video is taken as JPEG frames"),
    ("q", {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}}, ValueError,
     "with type 'audio_url'"),
    # vLLM's classify form is not a score item
    ("q", {"prompt": "", "multi_modal_data": {"image": np.zeros((28, 28, 3), np.uint8)}}, ValueError,
     "not as multi_modal_data"),
    ("q", {"content": "not a list"}, TypeError, "list of content parts"),
    ("q", [{"content": []}], TypeError, "non-empty list of content parts"),
    ("q", [{"content": ["bare text"]}], TypeError, r"data_2\[0\]\['content'\]\[0\] must be a content part"),
    ("q", [3], TypeError, "got int"),
    ("q", [["a", "b"]], TypeError, "got list"),
    ({"content": []}, "d", ValueError, "empty list"),
])
def test_bad_score_items(jina, d1, d2, exc, match):
    with pytest.raises(exc, match=match):
        jina[-1].score(d1, d2)


@needs_pil
def test_a_template_must_place_each_image_once(jina):
    llm, a = jina[-1], images(1)[0]
    with pytest.raises(ValueError, match="0 times"):
        llm.score("q", url_part(a), score_template="{{ query }} {{ document | length }}")
    with pytest.raises(ValueError, match="2 times"):
        llm.score("q", url_part(a), score_template="{{ query }} {{ document }} {{ document }}")


def test_images_on_a_text_model_are_refused(tmp_path):
    from tiny import save_tiny
    from transformers import Qwen2Config

    path = str(tmp_path / "text")
    save_tiny(path, Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                                architectures=["Qwen2ForSequenceClassification"]), tokenizer="decoder")
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    part = {"type": "image_pil", "image_pil": object()}
    with pytest.raises(ValueError, match=r"pair 1 has an image or video \(data_2\[1\]\), but this model takes text only"):
        llm.score("q", ["text", part])
    with pytest.raises(ValueError, match="takes no images"):
        LLM(path, dtype="float32", kernel_backend="torch", mm_processor_kwargs={"max_pixels": 3136})


@pytest.mark.gpu
def test_jina_bf16_on_gpu(tmp_path):
    """bf16 on the default kernels (head_dim 64) against the fp32 reference: DESIGN's
    bf16 bar on scores (2e-2), images given as uint8 arrays (the GPU image may lack
    pillow), the text-only pairs through the CUDA graphs."""
    model, tok, head = save_jina(str(tmp_path), width=128)
    a, b, c = images(40)
    docs = ["a text document", a, "another text", b, c, "short"]
    llm = LLM(str(tmp_path), dtype="bfloat16", device="cuda")
    parts = [d if isinstance(d, str) else {"type": "image_pil", "image_pil": d} for d in docs]
    got = [o.outputs.score for o in llm.score("which one?", parts, use_tqdm=False)]
    want = [jina_reference(model, tok, head, "which one?", d)[1] for d in docs]
    assert 0.02 < min(want) and max(want) < 0.98  # off the sigmoid's flat ends, where 2e-2 says nothing
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------- server
@needs_pil
def test_server_rerank_and_score_with_images(jina):
    """/rerank with documents as {"content": [parts]} and /score with mixed lists give
    LLM.score's scores; /rerank echoes each content part as vLLM does, {"text": None, "multi_modal": part}."""
    pytest.importorskip("fastapi")
    from pyengine.config import EngineConfig
    from pyengine.engine import EngineCore
    from pyengine.serve import Server, serve_in_thread
    from test_serve import Client

    path, llm = jina[0], jina[-1]
    a, b, _ = images(30)
    docs = [url_part(a), {"type": "text", "text": "some words"}, url_part(b)]
    want = [o.outputs.score for o in llm.score("the query", docs, use_tqdm=False)]
    server = Server(EngineCore(EngineConfig(model=path, dtype="float32", kernel_backend="torch")), ["jina"])
    url, stop = serve_in_thread(server.build_app())
    client = Client(url, server)
    try:
        status, body = client.post("/rerank", {"query": "the query", "documents": {"content": docs}, "top_n": 2})
        assert status == 200, body
        order = sorted(range(3), key=lambda i: -want[i])[:2]
        assert [r["index"] for r in body["results"]] == order
        for r in body["results"]:
            assert r["relevance_score"] == pytest.approx(want[r["index"]], abs=1e-6)
            part = docs[r["index"]]
            assert r["document"] == {"text": None, "multi_modal": part}
        status, body = client.post("/score", {"text_1": "the query", "text_2": docs})
        assert status == 200, body
        np.testing.assert_allclose([d["score"] for d in body["data"]], want, atol=1e-6, rtol=0)
        status, body = client.post("/score", {"text_1": "q", "text_2": [{"type": "image_url",
                                                                          "image_url": {"url": "file:///etc/x"}}]})
        assert status == 400 and "not fetched from URLs" in body["error"]["message"], body
        # one document as a plain string, as vLLM's current server takes it
        status, body = client.post("/rerank", {"query": "q", "documents": "one string"})
        assert status == 200 and [r["document"] for r in body["results"]] == [{"text": "one string", "multi_modal": None}], body
    finally:
        stop()


# ---------------------------------------------------------------------------- corpora
@needs_pil
def test_batch_job_with_a_pair_image_column(jina, tmp_path, capsys):
    """python -m pyengine.batch --pair-image-column: each row's text scored against its
    image document (paths relative to the input file) equals LLM.score; the flag is
    refused with --pair-column, and on a model that is not a reranker."""
    from pyengine.batch_job import main
    from pyengine.integrations.ray import PyEngineClassifier

    path, llm = jina[0], jina[-1]
    imgs = images(17)
    (tmp_path / "pages").mkdir()
    rows = []
    for i in range(7):
        PIL.fromarray(imgs[i % 3]).save(tmp_path / "pages" / f"{i}.png")
        rows.append({"query": f"query number {i}", "page": f"pages/{i}.png"})
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", path, "--input", str(src), "--output", str(out), "--text-column", "query",
            "--pair-image-column", "page", "--dtype", "float32", "--kernel-backend", "torch", "--shard-size", "3",
            "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    got = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    want = [llm.score(r["query"], {"type": "image_pil", "image_pil": imgs[i % 3]}, use_tqdm=False)[0].outputs.score
            for i, r in enumerate(rows)]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert main(argv + ["--pair-column", "query", "--overwrite"]) == 2
    assert "--pair-image-column goes with --text-column alone" in capsys.readouterr().err
    vl = tmp_path / "classifier"
    save_vl(str(vl), "2", num_labels=3)
    with pytest.raises(ValueError, match=r"pair_image_column needs a cross-encoder \(num_labels == 1\)"):
        PyEngineClassifier(str(vl), text_column="query", pair_image_column="page", kernel_backend="torch")
