"""NVIDIA's Llama-Nemotron VL rerankers (pyengine.models.nemotron_vl, pyengine.image_tiles).

The checkpoint's own modelling code is remote code, so the reference is assembled here
from transformers' own parts on the same weights, in float64: SigLIP's vision model
(``last_hidden_state``, or ``hidden_states[select_layer]``), the 2 x 2 regrouping written
as the chain of views and transposes the checkpoint's code uses, mlp1 as an
``nn.Sequential``, transformers' Llama with an all-visible mask, the mean of every token,
then ``score`` over the temperature. Tiles are checked on their own against PIL's resize
and crop, with the grids worked out by hand."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

from pyengine import LLM
from pyengine.image_tiles import TileProcessor, best_grid, grid_options
from tiny import randomize, write_bpe_tokenizer

try:
    import PIL.Image as PIL
except ImportError:
    PIL = None
needs_pil = pytest.mark.skipif(PIL is None, reason="pillow is not installed")

TILE, PATCH = 32, 8  # 4 x 4 patches a tile, 2 x 2 tokens after the regrouping
PER_TILE = 4
TEMPERATURE = 0.5


def save_nemotron(path, select_layer=-1, names="long", width=48, vision_width=32, max_tiles=4, seed=0):
    """A random reranker saved as the hub's checkpoints are: config.json with model_type
    llama_nemotron_vl_rerank and its llm_config / vision_config, weights under model.* and
    score.weight, the tokenizer with <img>, </img>, <IMG_CONTEXT>. Returns the float64
    reference parts (dict) and the tokenizer."""
    tok = write_bpe_tokenizer(path, "decoder")
    tok.add_special_tokens({"additional_special_tokens": ["<img>", "</img>", "<IMG_CONTEXT>"]})
    tok.save_pretrained(path)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    heads = 4 if width == 48 else 2
    llm_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=width // heads,
                          max_position_embeddings=512, pad_token_id=0)
    vis_heads = 2
    vis_cfg = SiglipVisionConfig(hidden_size=vision_width, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=vis_heads, image_size=TILE, patch_size=PATCH)
    torch.manual_seed(seed)
    vision = randomize(SiglipVisionModel(vis_cfg), 0.3, seed).eval()
    lm = randomize(LlamaModel(llm_cfg), 0.3, seed + 1).eval()
    M = vision_width * 4
    mlp1 = nn.Sequential(nn.LayerNorm(M), nn.Linear(M, width), nn.GELU(), nn.Linear(width, width))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in mlp1.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        mlp1[0].weight += 1.0  # a LayerNorm scale around 1
    score = torch.randn(1, width, generator=g) / width ** 0.5
    weights = {"score.weight": score}
    for k, v in vision.state_dict().items():
        # long: transformers 4's SiglipVisionModel names (model.vision_model.vision_model.*);
        # short: transformers 5's (model.vision_model.*). Both keep the unused head.*.
        weights[("model.vision_model.vision_model." if names == "long" else "model.vision_model.") + k] = v.clone()
    weights.update({"model.language_model." + k: v.clone() for k, v in lm.state_dict().items()})
    weights.update({"model.mlp1." + k: v.clone() for k, v in mlp1.state_dict().items()})
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    llm_raw = llm_cfg.to_dict()
    llm_raw.update(architectures=["LlamaBidirectionalModel"], model_type="llama_bidirec", pooling="avg")
    cfg = {"architectures": ["LlamaNemotronVLForSequenceClassification"], "model_type": "llama_nemotron_vl_rerank",
           "auto_map": {"AutoConfig": "configuration_llama_nemotron_vl.LlamaNemotronVLForSequenceClassificationConfig"},
           "llm_config": llm_raw, "vision_config": vis_cfg.to_dict(), "force_image_size": TILE,
           "downsample_ratio": 0.5, "select_layer": select_layer, "img_context_token_id": ctx, "pooling": "avg",
           "temperature": TEMPERATURE, "num_labels": 1, "dynamic_image_size": True, "use_thumbnail": True,
           "min_dynamic_patch": 1, "max_dynamic_patch": 6, "max_input_tiles": 2}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump({"max_input_tiles": max_tiles, "min_input_tiles": 1, "dynamic_image_size": True}, f)
    parts = {"vision": vision.double(), "lm": lm.double(), "mlp1": mlp1.double(), "score": score.double(),
             "select_layer": select_layer, "ctx": ctx}
    return parts, tok


def _shuffle(x):
    """(n, side * side, C) -> (n, side * side / 4, 4C) as the checkpoint's pixel shuffle."""
    n, L, C = x.shape
    s = int(L ** 0.5)
    x = x.reshape(n, s, s, C).reshape(n, s, s // 2, C * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, s // 2, s // 2, C * 4).permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, C * 4)


def reference(parts, ids, tiles):
    """The reranker's logit for one prompt (expanded ids, its tiles), in float64."""
    ids = torch.tensor(ids)
    with torch.no_grad():
        emb = parts["lm"].embed_tokens(ids).clone()
        if tiles is not None:
            pixels = (tiles.double() / 255 - 0.5) / 0.5  # SigLIP's normalisation
            out = parts["vision"](pixel_values=pixels, output_hidden_states=True)
            sel = parts["select_layer"]
            feats = out.last_hidden_state if sel == -1 else out.hidden_states[sel]
            emb[ids == parts["ctx"]] = parts["mlp1"](_shuffle(feats)).reshape(-1, emb.shape[-1])
        L = len(ids)
        mask = torch.zeros(1, 1, L, L, dtype=torch.float64)  # additive: every token sees every token
        h = parts["lm"](inputs_embeds=emb[None], attention_mask=mask).last_hidden_state[0]
        return (h.mean(0) @ parts["score"].t()) / TEMPERATURE


def images(seed):
    """Sizes (h, w) whose grids, at 32-pixel tiles and 1 to 4 tiles, are (cols, rows):
    40x80 -> (2, 1) + thumbnail; 90x30 -> (1, 3) + thumbnail; 20x20 -> (1, 1); and an
    RGBA 70x70 -> (2, 2) + thumbnail (see test_grids)."""
    g = np.random.default_rng(seed)
    out = [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 80), (90, 30), (20, 20))]
    return out + [g.integers(0, 256, (70, 70, 4), dtype=np.uint8)]


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    path = tmp_path_factory.mktemp("nemotron-vl")
    parts, tok = save_nemotron(path)
    return str(path), parts, tok


# ---------------------------------------------------------------------------- tiles
@pytest.mark.parametrize("size, lo, hi, want", [
    # (w, h): a wide image takes a 2 x 1 grid, a tall one 1 x 3 (no 1 x 2: 3 is closer to 90/30)
    ((80, 40), 1, 4, (2, 1)), ((30, 90), 1, 4, (1, 3)),
    # small and square: one tile; (2, 2) scores 0.6 for a square with 4 tiles' pixels or more
    ((20, 20), 1, 4, (1, 1)), ((70, 70), 1, 4, (2, 2)), ((40, 40), 1, 4, (1, 1)),
    # at most 2 tiles: (1, 1) and (1, 2) tie at 1024/4900 for a square of 4 tiles' pixels; the first wins
    ((70, 70), 1, 2, (1, 1)),
    # at least 2 tiles: a square must take a 2-tile grid, the first of (1, 2) and (2, 1) in the set's order
    ((20, 20), 2, 2, grid_options(2, 2)[0]),
    # aspect 5: the grids of 4 tiles win over 3 (0.6 x 4/5 against 0.6 x 3/5)
    ((160, 32), 1, 4, (4, 1)),
])
def test_grids(size, lo, hi, want):
    assert best_grid(*size, TILE, grid_options(lo, hi)) == want


def test_grid_options():
    # every grid of 1 to 4 tiles, fewest tiles first
    opts = grid_options(1, 4)
    assert sorted(opts) == sorted([(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2)])
    assert [c * r for c, r in opts] == sorted(c * r for c, r in opts)
    assert grid_options(3, 3) in ([(1, 3), (3, 1)], [(3, 1), (1, 3)])


def _pil_tiles(arr, grid):
    """PIL's bicubic resize to the grid, crops row by row, the thumbnail: (n, 3, S, S) uint8."""
    img = PIL.fromarray(arr)
    if img.mode == "RGBA":  # over white, as the engine composites
        bg = PIL.new("RGBA", img.size, (255, 255, 255, 255))
        img = PIL.alpha_composite(bg, img).convert("RGB")
    c, r = grid
    big = img.resize((c * TILE, r * TILE), PIL.BICUBIC)
    tiles = [big.crop((x * TILE, y * TILE, (x + 1) * TILE, (y + 1) * TILE)) for y in range(r) for x in range(c)]
    if c * r > 1:
        tiles.append(img.resize((TILE, TILE), PIL.BICUBIC))
    return torch.tensor(np.stack([np.asarray(x) for x in tiles])).permute(0, 3, 1, 2)


@needs_pil
def test_tiles_match_pil():
    """Each image's tiles are PIL's resize, crops and thumbnail, exactly, on the grids
    of test_grids (thumbnails change the aspect ratio: one axis may shrink while the
    other grows)."""
    proc = TileProcessor(9, 7, 8, TILE, PER_TILE, 1, 4)
    grids = [(2, 1), (1, 3), (1, 1), (2, 2)]
    for arr, grid in zip(images(0), grids):
        got = proc.tiles(arr, "img")
        want = _pil_tiles(arr, grid)
        assert got.dtype == torch.uint8
        assert got.shape == want.shape == (grid[0] * grid[1] + (grid != (1, 1)), 3, TILE, TILE)
        err = (got.int() - want.int()).abs().max().item()
        assert err == 0, f"{arr.shape}: max |d| {err} levels"
    # PIL images in: the same tiles as their arrays
    arr = images(0)[0]
    torch.testing.assert_close(proc.tiles(PIL.fromarray(arr), "img"), proc.tiles(arr, "img"), atol=0, rtol=0)


@needs_pil
def test_tiles_without_pillow(monkeypatch):
    """Where pillow is missing, torch resizes: within one level of PIL when both axes
    shrink or both grow (the 2 x 1 grid of an 80 x 40 image and its thumbnail)."""
    import builtins

    real = builtins.__import__

    def no_pil(name, *a, **kw):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError(name)
        return real(name, *a, **kw)

    arr = images(0)[0]
    want = _pil_tiles(arr, (2, 1))
    monkeypatch.setattr(builtins, "__import__", no_pil)
    got = TileProcessor(9, 7, 8, TILE, PER_TILE, 1, 4).tiles(arr, "img")
    err = (got.int() - want.int()).abs().max().item()
    assert 0 < err <= 1, f"max |d| {err} levels"


# ---------------------------------------------------------------------------- model
def _prompts(seed):
    """Text prompts with <image> where an image goes, and their images."""
    ims = images(seed)
    return [("a photo of <image> and some words", [ims[0]]),
            ("only text here", []),
            ("<image> first, then <image> second", [ims[1], ims[3]]),
            ("short <image>", [ims[2]])]


def _dicts(prompts):
    return [{"prompt": t, "multi_modal_data": {"image": im}} if im else t for t, im in prompts]


def _check_layout(ids, tok, tiles_per_image):
    """<img> + <IMG_CONTEXT> x tiles * 4 + </img> for each image, in order."""
    start, end, ctx = tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == ctx:
            j = i
            while j < len(ids) and ids[j] == ctx:
                j += 1
            assert ids[i - 1] == start and ids[j] == end, "an image's tokens must sit inside <img> ... </img>"
            runs.append(j - i)
            i = j
        else:
            i += 1
    assert runs == [n * PER_TILE for n in tiles_per_image]


@pytest.mark.parametrize("select_layer, names", [
    (-1, "long"),   # the last layer and its post-norm; SigLIP's own weight names
    (-2, "short"),  # hidden_states[-2] (no post-norm); the transformer's names
])
def test_matches_reference(select_layer, names, tmp_path):
    """Text-only and image prompts in one batch (images of 1, 3 and 5 tiles, two in one
    prompt, one RGBA) against the float64 reference: logits within 1e-4, and their
    sigmoid as the probability."""
    parts, tok = save_nemotron(tmp_path, select_layer, names)
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch")
    proc = llm.engine.inputs.images
    prompts = _prompts(1)
    outs = llm.classify(_dicts(prompts), use_activation=False, use_tqdm=False)
    probs = llm.classify(_dicts(prompts), use_tqdm=False)
    tiles_of = {id(a): proc.tiles(a, "img") for _, ims in prompts for a in ims}
    for i, ((text, ims), out) in enumerate(zip(prompts, outs)):
        ids = out.prompt_token_ids
        _check_layout(ids, tok, [tiles_of[id(a)].shape[0] for a in ims])
        tiles = torch.cat([tiles_of[id(a)] for a in ims]) if ims else None
        ref = reference(parts, ids, tiles).float()
        torch.testing.assert_close(torch.tensor(out.outputs.probs), ref, atol=1e-4, rtol=0,
                                   msg=lambda m: f"prompt {i} ({text!r}): {m}")
        torch.testing.assert_close(torch.tensor(probs[i].outputs.probs), ref.sigmoid(), atol=1e-4, rtol=0)
    # the text-only prompt is the plain bidirectional reranker on its tokens
    assert outs[1].prompt_token_ids == tok("only text here")["input_ids"]


def test_batch_invariance_and_token_prompts(nemotron):
    """A prompt's logit does not depend on its batch (alone, or among the others, fp32:
    1e-5); a token prompt with one <IMG_CONTEXT> per image, or every one already
    expanded, gives the text prompt's tokens and logit."""
    path, parts, tok = nemotron
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    prompts = _prompts(2)
    together = llm.classify(_dicts(prompts), use_activation=False, use_tqdm=False)
    for i, p in enumerate(_dicts(prompts)):
        alone = llm.classify([p], use_activation=False, use_tqdm=False)[0]
        torch.testing.assert_close(torch.tensor(alone.outputs.probs), torch.tensor(together[i].outputs.probs),
                                   atol=1e-5, rtol=0)
    text, ims = prompts[2]
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    one_each = tok(text.replace("<image>", "<IMG_CONTEXT>"))["input_ids"]
    assert one_each.count(ctx) == 2
    expanded = together[2].prompt_token_ids
    for ids in (one_each, expanded):
        got = llm.classify([{"prompt_token_ids": ids, "multi_modal_data": {"image": ims}}], use_activation=False,
                           use_tqdm=False)[0]
        assert got.prompt_token_ids == expanded
        torch.testing.assert_close(torch.tensor(got.outputs.probs), torch.tensor(together[2].outputs.probs),
                                   atol=1e-5, rtol=0)


def _url(arr):
    import base64
    import io
    buf = io.BytesIO()
    PIL.fromarray(arr).save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue())
                                               .decode()}}


@needs_pil
def test_score_puts_images_first(nemotron):
    """LLM.score with the reranker's own template: "question:{q} \\n \\n passage:{d}" with
    the pair's images in front, each as LLM.classify scores that prompt, and the sigmoid
    of the float64 reference. A template in vLLM's style, which moves one document image
    to the front itself, gives the same scores."""
    path, parts, tok = nemotron
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    a, b = images(3)[0], images(3)[2]
    docs = ["a plain passage", {"content": [_url(a)]}, {"content": [{"type": "text", "text": "a caption "}, _url(b)]}]
    got = [o.outputs.score for o in llm.score("what is shown?", docs, use_tqdm=False)]
    want_prompts = [
        "question:what is shown? \n \n passage:a plain passage",
        {"prompt": "<image> question:what is shown? \n \n passage:", "multi_modal_data": {"image": a}},
        {"prompt": "<image> question:what is shown? \n \n passage:a caption ", "multi_modal_data": {"image": b}},
    ]
    want = [o.outputs.probs[0] for o in llm.classify(want_prompts, use_tqdm=False)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-6, rtol=0)
    proc = llm.engine.inputs.images
    for i, p in enumerate(want_prompts):
        text, ims = (p, []) if isinstance(p, str) else (p["prompt"], [p["multi_modal_data"]["image"]])
        ids = llm.classify([p], use_tqdm=False)[0].prompt_token_ids
        tiles = torch.cat([proc.tiles(x, "img") for x in ims]) if ims else None
        assert abs(got[i] - reference(parts, ids, tiles).sigmoid().item()) < 1e-4
    vllm_style = ("{%- set q = (messages | selectattr('role', 'equalto', 'query') | first)['content'] -%}"
                  "{%- set d = (messages | selectattr('role', 'equalto', 'document') | first)['content'] -%}"
                  "{%- if '<image>' in d -%}<image> {% endif -%}"
                  "question:{{ q | replace('<image>', '') }} \n \n passage:{{ d | replace('<image>', '') }}")
    again = [o.outputs.score for o in llm.score("what is shown?", docs, score_template=vllm_style, use_tqdm=False)]
    torch.testing.assert_close(torch.tensor(again), torch.tensor(got), atol=1e-6, rtol=0)
    # a template that writes fewer placeholders than the pair has images is refused
    two = [{"content": [_url(a), _url(b)]}]  # one document with two images
    with pytest.raises(ValueError, match=r"pair 0: the score template wrote its image .* 0 times"):
        llm.score("q", two, score_template=vllm_style, use_tqdm=False)
    assert llm.score("q", two, use_tqdm=False)[0].outputs.score > 0  # the model's own template keeps both


@needs_pil
def test_server_rerank(nemotron):
    """/rerank with a text and an image document (a data URL) ranks them by LLM.score's scores."""
    pytest.importorskip("fastapi")
    from pyengine.config import EngineConfig
    from pyengine.engine import EngineCore
    from pyengine.serve import Server, serve_in_thread
    from test_serve import Client

    path = nemotron[0]
    docs = ["a passage of text", {"content": [_url(images(12)[1])]}]
    want = [o.outputs.score for o in LLM(path, dtype="float32", kernel_backend="torch").score(
        "the query", docs, use_tqdm=False)]
    server = Server(EngineCore(EngineConfig(model=path, dtype="float32", kernel_backend="torch")), ["nemotron"])
    url, stop = serve_in_thread(server.build_app())
    try:
        status, body = Client(url, server).post("/rerank", {"query": "the query", "documents": docs})
        assert status == 200, body
        assert [r["index"] for r in body["results"]] == sorted(range(2), key=lambda i: -want[i])
        for r in body["results"]:
            assert r["relevance_score"] == pytest.approx(want[r["index"]], abs=1e-6)
    finally:
        stop()


# ---------------------------------------------------------------------------- settings and errors
def test_tiling_settings(nemotron):
    """processor_config.json's max_input_tiles (4 here) over the config's 6; vLLM's
    mm_processor_kwargs over both; dynamic_image_size=False: one tile, no thumbnail."""
    path, _, _ = nemotron
    wide = images(4)[0]  # 2 x 1 + thumbnail at 4 tiles
    assert LLM(path, kernel_backend="torch").engine.inputs.images.max_tiles == 4
    for kw, n in (({}, 3), ({"max_dynamic_patch": 1}, 1), ({"dynamic_image_size": False}, 1)):
        llm = LLM(path, kernel_backend="torch", mm_processor_kwargs=kw)
        out = llm.classify([{"prompt": "x <image>", "multi_modal_data": {"image": wide}}], use_tqdm=False)[0]
        assert out.prompt_token_ids.count(llm.engine.model.image_token_id) == n * PER_TILE, kw
    with pytest.raises(ValueError, match=r"mm_processor_kwargs: \['min_pixels'\] cannot be set; supported: "
                                         r"\['min_dynamic_patch', 'max_dynamic_patch', 'dynamic_image_size'\]"):
        LLM(path, kernel_backend="torch", mm_processor_kwargs={"min_pixels": 4})
    with pytest.raises(ValueError, match="max_dynamic_patch must be a positive int, got 0"):
        LLM(path, kernel_backend="torch", mm_processor_kwargs={"max_dynamic_patch": 0})


@pytest.mark.parametrize("prompt, match", [
    # two placeholders, one image
    (lambda im: {"prompt": "<image> and <image>", "multi_modal_data": {"image": im}},
     r"prompts\[0\] has 2 image placeholder\(s\) for 1 image\(s\)"),
    # an image and no placeholder
    (lambda im: {"prompt": "no placeholder", "multi_modal_data": {"image": im}},
     r"prompts\[0\] has 0 image placeholder\(s\) for 1 image\(s\)"),
    # a context token in a prompt without images
    (lambda im: "text <IMG_CONTEXT>", r"prompts\[0\] has an image or video placeholder token but no image or video"),
    (lambda im: {"prompt": "<image>", "multi_modal_data": {"image": im[:, :, 0].astype(np.float32)}},
     r"prompts\[0\] image 0 is a torch.float32 array"),
])
def test_bad_inputs(nemotron, prompt, match):
    llm = LLM(nemotron[0], kernel_backend="torch")
    with pytest.raises((ValueError, TypeError), match=match):
        llm.classify([prompt(images(5)[0])], use_tqdm=False)


@needs_pil
def test_images_read_on_threads(nemotron, tmp_path):
    """Many prompts' images are read on a thread pool: one lazily opened PIL file shared by
    several prompts gives the same tokens and logits as its array, and of two bad prompts
    the first in order is the one reported."""
    llm = LLM(nemotron[0], dtype="float32", kernel_backend="torch")
    arr = images(13)[0]
    PIL.fromarray(arr).save(tmp_path / "a.png")
    lazy = PIL.open(tmp_path / "a.png")  # not decoded until first used
    ps = [{"prompt": f"prompt {i} <image>", "multi_modal_data": {"image": lazy}} for i in range(6)]
    want = [{"prompt": f"prompt {i} <image>", "multi_modal_data": {"image": arr}} for i in range(6)]
    got = llm.classify(ps, use_activation=False, use_tqdm=False)
    ref = llm.classify(want, use_activation=False, use_tqdm=False)
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in ref]
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in got]),
                               torch.tensor([o.outputs.probs for o in ref]), atol=1e-6, rtol=0)
    bad = list(want)
    bad[4] = {"prompt": "x <image>", "multi_modal_data": {"image": arr[:, :, :2]}}
    bad[2] = {"prompt": "x <image> <image>", "multi_modal_data": {"image": arr}}
    with pytest.raises(ValueError, match=r"prompts\[2\] has 2 image placeholder"):
        llm.classify(bad, use_tqdm=False)


def test_bad_checkpoints(tmp_path):
    save_nemotron(tmp_path)
    cfg_path = os.path.join(tmp_path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for change, match in (({"force_image_size": 64}, r"force_image_size=64 differs from the vision tower's "
                                                     r"image_size=32"),
                          ({"select_layer": 7}, r"select_layer=7 is outside \[-4, 3\]"),
                          ({"downsample_ratio": 0.3}, r"downsample_ratio=0.3 must be 1/k"),
                          ({"vision_config": dict(cfg["vision_config"], model_type="clip_vision_model")},
                           r"vision model 'clip_vision_model' is not supported")):
        with open(cfg_path, "w") as f:
            json.dump(dict(cfg, **change), f)
        with pytest.raises(ValueError, match=match):
            LLM(str(tmp_path), kernel_backend="torch")


def test_triton_kernels_in_the_interpreter(tmp_path):
    """head_dim 64 in both towers on the Triton kernels (varlen attention over the
    packed tiles, LayerNorm, the decoder's kernels) against the float64 reference."""
    parts, tok = save_nemotron(tmp_path, width=128, vision_width=128, max_tiles=2)
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="triton")
    im = images(6)[0]
    out = llm.classify([{"prompt": "see <image>", "multi_modal_data": {"image": im}}], use_activation=False,
                       use_tqdm=False)[0]
    tiles = llm.engine.inputs.images.tiles(im, "img")
    ref = reference(parts, out.prompt_token_ids, tiles).float()
    torch.testing.assert_close(torch.tensor(out.outputs.probs), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n, L, H, D", [
    (3, 16, 2, 72),   # SigLIP's head dim, views of a fused qkv (the GPU's dense path)
    (1, 5, 4, 64),    # one tile, a length off the powers of two
])
def test_dense_tile_attention_matches_varlen(n, L, H, D):
    """tile_attention's dense path (SDPA over (n, H, L, L), the one a GPU takes) against
    the per-tile varlen path and a float64 per-tile softmax, on strided q / k / v."""
    from pyengine.models.nemotron_vl import tile_attention
    from pyengine.ops import resolve_ops

    qkv = torch.randn(n * L, 3, H, D, generator=torch.Generator().manual_seed(n + D), dtype=torch.float32)
    q, k, v = qkv.unbind(1)
    cu = torch.arange(0, (n + 1) * L, L, dtype=torch.int32)
    ops = resolve_ops("torch", "cpu")
    dense = tile_attention(ops, q, k, v, cu, L, D ** -0.5, dense=True)
    packed = tile_attention(ops, q, k, v, cu, L, D ** -0.5, dense=False)
    ref = torch.empty(n * L, H, D, dtype=torch.float64)
    for t in range(n):
        r = slice(t * L, (t + 1) * L)
        s = torch.einsum("qhd,khd->hqk", q[r].double(), k[r].double()) * D ** -0.5
        ref[r] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[r].double())
    torch.testing.assert_close(dense.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.double(), ref, atol=1e-5, rtol=1e-5)


def test_lora_on_the_language_model(tmp_path):
    """A PEFT adapter (written here as PEFT saves one) on the language model's q and v
    projections: prompts with images that run with it match the float64 reference with
    W + (alpha / r) B A merged, and the others in the same batch the base model. An
    adapter on a vision-tower layer is refused before any work."""
    from safetensors.torch import save_file as save
    from pyengine import LoRARequest

    parts, tok = save_nemotron(tmp_path / "base")
    g = torch.Generator().manual_seed(11)
    r, alpha = 4, 8
    tensors, merged = {}, {}
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            lin = getattr(parts["lm"].layers[i].self_attn, proj)
            a = torch.randn(r, lin.in_features, generator=g) * 0.2
            b = torch.randn(lin.out_features, r, generator=g) * 0.2
            key = f"base_model.model.model.language_model.layers.{i}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            merged[(i, proj)] = (b.double() @ a.double()) * alpha / r

    def write(path, extra=None):
        os.makedirs(path)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
                       "bias": "none"}, f)
        save(dict(tensors, **(extra or {})), os.path.join(path, "adapter_model.safetensors"))

    write(tmp_path / "adapter")
    llm = LLM(str(tmp_path / "base"), dtype="float32", kernel_backend="torch", enable_lora=True, max_lora_rank=8)
    req = LoRARequest("a", 1, str(tmp_path / "adapter"))
    prompts = _dicts(_prompts(8))
    outs = llm.classify(prompts, use_activation=False, use_tqdm=False, lora_request=[req, None, req, None])
    proc = llm.engine.inputs.images
    base = {k: getattr(parts["lm"].layers[k[0]].self_attn, k[1]).weight.clone() for k in merged}
    for i, ((text, ims), out) in enumerate(zip(_prompts(8), outs)):
        tiles = torch.cat([proc.tiles(x, "img") for x in ims]) if ims else None
        with torch.no_grad():
            for (layer, proj), d in merged.items():
                getattr(parts["lm"].layers[layer].self_attn, proj).weight.copy_(base[(layer, proj)] + (d if i in (0, 2)
                                                                                                       else 0))
            ref = reference(parts, out.prompt_token_ids, tiles).float()
        torch.testing.assert_close(torch.tensor(out.outputs.probs), ref, atol=1e-4, rtol=0,
                                   msg=lambda m: f"prompt {i}: {m}")
    with torch.no_grad():  # the fixture's parts are this test's own, but leave them as saved
        for k, w in base.items():
            getattr(parts["lm"].layers[k[0]].self_attn, k[1]).weight.copy_(w)
    bad = {"base_model.model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(r, 32),
           "base_model.model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, r)}
    write(tmp_path / "vision-adapter", bad)
    with pytest.raises(ValueError, match=r"adapts vision\.blocks\.0\.qkv_w, which does not take LoRA here"):
        llm.classify(prompts[:1], lora_request=LoRARequest("v", 2, str(tmp_path / "vision-adapter")), use_tqdm=False)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_bf16_on_gpu(tmp_path):
    """bf16 on the default kernels (head_dim 64 in both towers) against the float64
    reference: DESIGN's bf16 bar on the probabilities; text-only prompts again through
    the CUDA graphs."""
    parts, tok = save_nemotron(tmp_path, width=128, vision_width=128)
    llm = LLM(str(tmp_path), dtype="bfloat16", device="cuda")
    prompts = _prompts(7) * 3
    got = llm.classify(_dicts(prompts), use_tqdm=False)
    cpu = LLM(str(tmp_path), dtype="float32", kernel_backend="torch").engine.inputs.images
    for i, ((text, ims), out) in enumerate(zip(prompts, got)):
        tiles = torch.cat([cpu.tiles(a, "img") for a in ims]) if ims else None
        ref = reference(parts, out.prompt_token_ids, tiles).sigmoid().float()
        torch.testing.assert_close(torch.tensor(out.outputs.probs), ref, atol=2e-2, rtol=0,
                                   msg=lambda m: f"prompt {i}: {m}")
    text = [t for t, im in prompts if not im]
    again = [o.outputs.probs for o in llm.classify(text, use_tqdm=False)]
    first = [o.outputs.probs for (t, im), o in zip(prompts, got) if not im]
    torch.testing.assert_close(torch.tensor(again), torch.tensor(first), atol=2e-2, rtol=0)


def test_a_late_bad_prompt_is_reported_before_any_image_is_tiled(nemotron, monkeypatch):
    llm = LLM(nemotron[0], dtype="float32", kernel_backend="torch")
    tiled = []
    monkeypatch.setattr(TileProcessor, "tiles", lambda self, *a: tiled.append(1) or 1 / 0)
    good = _dicts(_prompts(7))
    for bad, err, match in [({"prompt": "<image> and <image>", "multi_modal_data": {"image": images(1)[0]}},
                             ValueError, r"prompts\[4\] has 2 image placeholder\(s\) for 1 image\(s\)"),
                            ({"prompt": "<image>", "multi_modal_data": {"image": images(1)[0][..., :2]}},
                             ValueError, r"prompts\[4\] image 0 has shape \(40, 80, 2\)")]:
        with pytest.raises(err, match=match):
            llm.classify(good + [bad], use_tqdm=False)
    assert tiled == []
