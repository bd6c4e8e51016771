"""Qwen2-VL and Qwen2.5-VL classifiers with images (pyengine.models.qwen_vl,
pyengine.multimodal), against transformers' own model on the same weights, with pixel
values and placeholder counts from transformers' PIL image processor (where pillow is
missing, as on the GPU image, from ours, which is checked against it on the CPU)."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)

from pyengine import LLM
from pyengine.multimodal import ImageProcessor, rope_positions
from model_checks import assert_bf16_bar
from test_cuda_graph import RecordedGraphs
from tiny import randomize, write_bpe_tokenizer

try:
    import PIL.Image as PIL
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
except ImportError:
    PIL = None
needs_pil = pytest.mark.skipif(PIL is None, reason="pillow is not installed")

SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
# generation -> (config, transformers model, architecture prefix, patch size)
GENS = {"2": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, "Qwen2VL", 14),
        "2.5": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VL", 14),
        "3": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, "Qwen3VL", 16),
        "3-moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, "Qwen3VLMoe", 16)}
MIN_PIX = 56 * 56


def max_pix(patch):
    return (2 * patch) ** 2 * 16


def stats(gen):
    """Qwen3-VL's processor normalises with 0.5/0.5; the others with CLIP's statistics."""
    return ([0.5] * 3, [0.5] * 3) if gen.startswith("3") else ([0.48145466, 0.4578275, 0.40821073],
                                                      [0.26862954, 0.26130258, 0.27577711])


def _config(gen, vocab, ids, width):
    """width 48: head_dim 12 (torch ops); width 128: head_dim 64 (the Triton kernels')."""
    C, _, _, patch = GENS[gen]
    heads = 4 if width == 48 else 2
    half = width // heads // 2
    vw = width // 2 if width == 48 else width
    vis = dict(depth=3, num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
    if gen == "2":
        vis.update(embed_dim=vw, mlp_ratio=2, hidden_size=width)
    else:
        vis.update(hidden_size=vw, intermediate_size=64, out_hidden_size=width)
    if gen == "2.5":  # windows of 2x2 tokens in blocks 0 and 2, block 1 attends to the whole image
        vis.update(window_size=56, fullatt_block_indexes=[1])
    if gen.startswith("3"):  # a 3x3 learned position grid resampled to each image; deepstack after blocks 0, 1
        vis.update(num_position_embeddings=9, deepstack_visual_indexes=[0, 1])
    text = dict(vocab_size=vocab, hidden_size=width, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=width // heads,
                max_position_embeddings=512, rope_parameters={
                    "rope_type": "default", "rope_theta": 10000.0,
                    "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]})
    if gen == "3-moe":  # 4 experts of 40, top 2 (pyengine.models.moe)
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40)
    return C(text_config=text, vision_config=vis, image_token_id=ids[1], video_token_id=ids[3],
             vision_start_token_id=ids[0], vision_end_token_id=ids[2])


def save_vl(path, gen, width=48, num_labels=2, seed=0, std=0.3, score_std=1.0):
    """A random VL model (weights N(0, std), the score head's N(0, score_std)) saved as
    *ForSequenceClassification (score.weight added) with a tokenizer and preprocessor
    config. Returns (transformers model, tokenizer, score)."""
    tok = write_bpe_tokenizer(path, "decoder")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.save_pretrained(path)
    cfg = _config(gen, len(tok), tok.convert_tokens_to_ids(SPECIALS), width)
    torch.manual_seed(seed)
    _, M, prefix, patch = GENS[gen]
    model = randomize(M(cfg), std, seed).eval()
    model.config.architectures = [f"{prefix}ForSequenceClassification"]
    model.config.num_labels = num_labels
    model.gen = gen
    model.save_pretrained(path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    score = score_std * torch.randn(num_labels, width, generator=torch.Generator().manual_seed(seed + 1))
    weights["score.weight"] = score
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    mean, std = stats(gen)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": MIN_PIX, "max_pixels": max_pix(patch), "patch_size": patch, "merge_size": 2,
                   "temporal_patch_size": 2, "image_mean": mean, "image_std": std}, f)
    return model, tok, score


def _hf_processor(gen="2"):
    patch = GENS[gen][3]
    mean, std = stats(gen)
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIX, max_pixels=max_pix(patch), patch_size=patch,
                                    image_mean=mean, image_std=std)


def _ours(gen="2"):
    patch = GENS[gen][3]
    mean, std = stats(gen)
    return ImageProcessor(0, patch_size=patch, min_pixels=MIN_PIX, max_pixels=max_pix(patch), mean=mean, std=std)


def _pixels(imgs, gen):
    """(pixel_values, image_grid_thw) from transformers' processor, or ours without pillow."""
    if PIL is not None:
        enc = _hf_processor(gen)([PIL.fromarray(a) for a in imgs], return_tensors="pt")
        return enc["pixel_values"], enc["image_grid_thw"]
    proc = _ours(gen)
    out = [proc(a, "img") for a in imgs]
    return proc.finish(torch.cat([p for p, _ in out])), torch.tensor([g for _, g in out])


def images(seed, patch=14):
    """4x6, 8x4 and 4x4 patches (2x3, 4x2, 2x2 tokens): no resize."""
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (h * patch, w * patch, 3), dtype=np.uint8) for h, w in ((4, 6), (8, 4), (4, 4))]


def reference(model, tok, score, text, imgs):
    """Last-token logits (fp32 head) from transformers, with the prompt's placeholders
    expanded and its pixels made by transformers' own processor."""
    return last_hidden(model, tok(text)["input_ids"], imgs).float() @ score.t()


def last_hidden(model, ids, imgs):
    """transformers' final hidden state (after the norm) of the last of ``ids`` (one
    placeholder per image), with the images' pixels from transformers' processor."""
    kw = {}
    if imgs:
        pixels, grids = _pixels(imgs, model.gen)
        it = iter(int(g.prod()) // 4 for g in grids)
        pad = model.config.image_token_id
        ids = [t for i in ids for t in ([i] * next(it) if i == pad else [i])]
        kw = dict(pixel_values=pixels, image_grid_thw=grids)
    ids = torch.tensor([ids])
    if imgs:
        kw["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        return model.model(input_ids=ids, **kw).last_hidden_state[0, -1]


@pytest.fixture(scope="module", params=["2.5", "2", "3", "3-moe"], ids=["qwen2.5-vl", "qwen2-vl", "qwen3-vl",
                                                                         "qwen3-vl-moe"])
def vl(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("vl")
    return (str(path), *save_vl(path, request.param))


def _prompts(seed, gen):
    a, b, c = images(seed, GENS[gen][3])
    return [(f"hello world {IMG} what is it", [a]),  # one image inside text
            ("plain text prompt", []),               # text only, in the same batch
            (f"a {IMG} b {IMG} c", [b, c]),          # two images: positions continue after each
            (f"{IMG}", [c])]                         # only the image: the last token is vision_end


def _dicts(prompts):
    return [{"prompt": t, "multi_modal_data": {"image": im}} if im else t for t, im in prompts]


def test_matches_transformers(vl):
    path, model, tok, score = vl
    prompts = _prompts(1, model.gen)
    got = LLM(path, dtype="float32", kernel_backend="torch").classify(_dicts(prompts), use_activation=False,
                                                                      use_tqdm=False)
    for i, (text, imgs) in enumerate(prompts):
        ref = reference(model, tok, score, text, imgs)
        torch.testing.assert_close(torch.tensor(got[i].outputs.probs), ref, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"prompt {i} ({len(imgs)} images): {m}")


def test_batch_invariance_and_probabilities(vl):
    """A prompt's result does not depend on the prompts it shares a batch with (two
    images of other prompts in the vision tower's packed run, text-only neighbours)."""
    path = vl[0]
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    prompts = _dicts(_prompts(2, vl[1].gen))
    together = torch.tensor([o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)])
    alone = torch.tensor([llm.classify([p], use_tqdm=False)[0].outputs.probs for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.sum(-1), torch.ones(len(prompts)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(10, 150, 3), (150, 10, 3), (5, 300, 3)])  # a side that rounds to 0
@needs_pil
def test_thin_images_get_the_processors_grid(shape):
    # transformers sends an image whose side rounds to 0 patches to its min_pixels branch
    # (both sides scaled up); the patches are then the same in number and near in value.
    a = np.random.default_rng(8).integers(0, 256, shape, dtype=np.uint8)
    ref = _hf_processor()(PIL.fromarray(a), return_tensors="pt")
    proc = _ours()
    raw, grid = proc(a, "img")
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    assert proc.finish(raw).shape == ref["pixel_values"].shape


@needs_pil
def test_transparent_colour_is_composited_over_white():
    # A palette PNG with a transparent entry (no alpha band): transparent pixels become
    # white, as transformers' RGB conversion makes them.
    import io

    a = np.random.default_rng(9).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.fromarray(a).quantize(16).save(buf, "PNG", transparency=0)
    img = PIL.open(io.BytesIO(buf.getvalue()))
    img.load()
    assert "A" not in img.getbands() and img.info.get("transparency") is not None
    ref = _hf_processor()(img, return_tensors="pt")["pixel_values"]
    proc = _ours()
    level = 1 / 255 / 0.26130258 + 1e-5
    torch.testing.assert_close(proc.finish(proc(img, "img")[0]), ref, atol=level, rtol=0)


@needs_pil
def test_unreadable_images_and_grids_name_their_prompt(vl):
    import io

    path = vl[0]
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    buf = io.BytesIO()
    PIL.new("RGB", (84, 56)).save(buf, "PNG")
    cut = PIL.open(io.BytesIO(buf.getvalue()[:len(buf.getvalue()) // 2]))
    for item, match in ((cut, r"prompts\[2\] image 0: cannot read the image"),
                        (np.zeros((2, 500, 3), np.uint8), r"prompts\[2\] image 0 is 2x500: its aspect ratio is over 200")):
        with pytest.raises(ValueError, match=match):
            llm.classify(["a", "b", {"prompt": f"x {IMG}", "multi_modal_data": {"image": item}}], use_tqdm=False)


def test_nested_hf_overrides_update_the_sub_config(vl):
    # As vLLM applies them: a dict for text_config updates it key by key, not replaces it.
    path = vl[0]
    llm = LLM(path, hf_overrides={"text_config": {"max_position_embeddings": 40}})
    text = llm.engine.hf_config.text_config
    assert text.max_position_embeddings == 40 and text.hidden_size == 48
    assert llm.engine.max_model_len == 40


def test_token_prompts_expanded_or_not(vl):
    """Token prompts with one placeholder per image, or with every placeholder token
    already (as transformers' processor writes them), give the text prompt's result."""
    path, model, tok = vl[:3]
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    text, imgs = _prompts(3, model.gen)[2]
    by_text = llm.classify([{"prompt": text, "multi_modal_data": {"image": imgs}}], use_tqdm=False)[0]
    ids = tok(text)["input_ids"]
    by_ids = llm.classify([{"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}], use_tqdm=False)[0]
    expanded = by_text.prompt_token_ids
    assert len(expanded) == len(ids) - 2 + 8 + 4  # 4x2 and 2x2 tokens in place of two placeholders
    by_expanded = llm.classify([{"prompt_token_ids": expanded, "multi_modal_data": {"image": imgs}}],
                               use_tqdm=False)[0]
    for o in (by_ids, by_expanded):
        assert o.prompt_token_ids == expanded
        torch.testing.assert_close(torch.tensor(o.outputs.probs), torch.tensor(by_text.outputs.probs),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("gen", ["2.5", "3"])
def test_token_head_of_a_causal_checkpoint(gen, tmp_path):
    """A VL model saved as ForConditionalGeneration, converted with
    classifier_from_token ["no", "yes"] (a VL reranker such as Qwen3-VL-Reranker):
    sigmoid(W_yes - W_no) against the softmax of transformers' two LM logits."""
    model, tok, _ = save_vl(tmp_path, gen)
    model.config.architectures = [f"{GENS[gen][2]}ForConditionalGeneration"]
    model.save_pretrained(tmp_path)  # the LM head only, no score.weight
    # Qwen3-VL-Reranker's shorthand (vLLM's overrides for it) keeps the VL architecture
    overrides = ({"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"} if gen != "3" else
                 {"architectures": ["Qwen3VLForSequenceClassification"], "is_original_qwen3_reranker": True})
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch", hf_overrides=overrides)
    no, yes = tok.convert_tokens_to_ids(["no", "yes"])
    prompts = _prompts(4, gen)
    got = llm.classify(_dicts(prompts), use_tqdm=False)
    lm = model.lm_head.weight.float()
    for i, (text, imgs) in enumerate(prompts):
        logits = reference(model, tok, lm[[no, yes]], text, imgs)
        torch.testing.assert_close(torch.tensor(got[i].outputs.probs[0]), logits.softmax(-1)[1],
                                   atol=1e-5, rtol=0)


def test_rope_positions_match_transformers(vl):
    model = vl[1]
    imgs = images(5, GENS[model.gen][3])
    grids = [_ours(model.gen)(a, "img")[1] for a in imgs]
    pad = model.config.image_token_id
    ids = [7, 8] + [pad] * 6 + [9] + [pad] * 8 + [10, 11, 12] + [pad] * 4 + [13]
    ours = rope_positions(ids, grids, pad, 2)
    t = torch.tensor([ids])
    ref, _ = model.model.get_rope_index(t, mm_token_type_ids=(t == pad).int(), image_grid_thw=torch.tensor(grids))
    assert torch.equal(ours, ref[:, 0]), (ours, ref[:, 0])


@pytest.mark.parametrize("shape", [
    (56, 84, 3),    # multiples of 28: no resize, equal to the processor's
    (60, 90, 3),    # a small resize down
    (20, 30, 3),    # up to min_pixels
    (300, 200, 3),  # down to max_pixels
    (57, 57),       # grayscale
    (56, 56, 4),    # RGBA: composited over white
])
@needs_pil
def test_preprocessing_matches_the_pil_processor(shape):
    """Pixel values within one level of 255 of transformers' PIL processor (PIL's
    fixed-point bicubic), the same grid; PIL images and arrays give the same patches."""
    a = np.random.default_rng(6).integers(0, 256, shape, dtype=np.uint8)
    img = PIL.fromarray(a)
    ref = _hf_processor()(img, return_tensors="pt")
    proc = _ours()
    raw, grid = proc(a, "img")
    assert raw.dtype == torch.uint8  # normalised on the device (finish)
    patches = proc.finish(raw)
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    level = 1 / 255 / 0.26130258 + 1e-5  # one level over the smallest std
    exact = len(shape) == 3 and shape[2] == 3 and shape[0] % 28 == 0 and shape[1] % 28 == 0
    torch.testing.assert_close(patches, ref["pixel_values"], atol=1e-5 if exact else level, rtol=0)
    assert torch.equal(proc(img, "img")[0], raw)
    assert torch.equal(proc(torch.from_numpy(a), "img")[0], raw)


@needs_pil
def test_settings_from_a_saved_processor(vl, tmp_path):
    """preprocessor_config.json as transformers saves it (size: shortest/longest edge)."""
    model = vl[1]
    if model.gen != "2.5":
        pytest.skip("the same reader for every generation")
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 5, max_pixels=28 * 28 * 7, image_mean=[0.5] * 3).save_pretrained(
        tmp_path)
    proc = ImageProcessor.from_checkpoint(tmp_path, model.config, model.config.vision_config)
    assert (proc.min_pixels, proc.max_pixels) == (28 * 28 * 5, 28 * 28 * 7)
    assert torch.equal(proc.mean.flatten(), torch.full((3,), 0.5))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    with pytest.raises(ValueError, match="patch_size=16 but the vision tower's is 14"):
        ImageProcessor.from_checkpoint(bad, model.config, model.config.vision_config)


def test_text_batches_replay_graphs_and_image_batches_run_eagerly(vl):
    """With the engine's graph runner in place (recorded captures on CPU): text-only
    batches go through it, batches with images run eagerly, all as the eager engine."""
    path = vl[0]
    prompts = _dicts(_prompts(7, vl[1].gen)) + ["more text here", "and some more", "short"]
    kw = dict(dtype="float32", kernel_backend="torch", max_num_seqs=2, max_num_batched_tokens=64)
    ref = [o.outputs.probs for o in LLM(path, **kw).classify(prompts, use_tqdm=False)]
    llm = LLM(path, **kw)
    eng = llm.engine
    eng.graphs = RecordedGraphs(eng.model, 64, 2, eng.max_model_len, "cpu")
    got = [o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=0)
    assert eng.graphs.graphs, "no text-only batch went through the runner"


@pytest.mark.parametrize("gen", ["2.5", "3"])
def test_triton_kernels_in_the_interpreter(gen, tmp_path):
    """head_dim 64 on the Triton kernels (the vision tower's windowed and full varlen
    attention, rotary by table, gated MLP; Qwen3-VL's q/k norm with rotary by table)
    against transformers."""
    model, tok, score = save_vl(tmp_path, gen, width=128)
    prompts = _prompts(8, gen)[:3]
    got = LLM(str(tmp_path), dtype="float32", kernel_backend="triton").classify(
        _dicts(prompts), use_activation=False, use_tqdm=False)
    for i, (text, imgs) in enumerate(prompts):
        torch.testing.assert_close(torch.tensor(got[i].outputs.probs), reference(model, tok, score, text, imgs),
                                   atol=1e-4, rtol=1e-4, msg=lambda m: f"prompt {i}: {m}")


@pytest.mark.parametrize("prompt, exc, match", [
    # two images, one placeholder
    (lambda im: {"prompt": f"x {IMG}", "multi_modal_data": {"image": [im, im]}}, ValueError,
     r"prompts\[0\] has 1 image placeholder token\(s\) for 2 image\(s\)"),
    # a placeholder in a text prompt without images
    (lambda im: f"x {IMG}", ValueError, r"prompts\[0\] has an image or video placeholder token but no image or video"),
    (lambda im: {"prompt": f"x {IMG}", "multi_modal_data": {"image": im.astype(np.float32)}}, TypeError,
     r"prompts\[0\] image 0 is a torch.float32 array"),
    (lambda im: {"prompt": f"x {IMG}", "multi_modal_data": {"image": im[:, :, :2]}}, ValueError,
     r"image 0 has shape \(56, 84, 2\)"),
    (lambda im: {"prompt": f"x {IMG}", "multi_modal_data": {"image": "cat.png"}}, TypeError,
     r"must be a PIL image or a uint8 array, got str"),
    (lambda im: {"prompt": f"x {IMG}", "multi_modal_data": {"image": []}}, ValueError, r"is an empty list"),
    (lambda im: {"prompt": f"x {IMG}", "multi_modal_data": {"image": im}, "mm_processor_kwargs": {}},
     ValueError, r"'mm_processor_kwargs': per-prompt processor settings are not supported"),
    (lambda im: {"prompt": "x <|video_pad|>", "multi_modal_data": {"image": im}}, ValueError,
     r"has a video placeholder token but no video"),
    (lambda im: {"prompt": f"x {IMG}", "multi_modal_data": {"image": im}, "token_type_ids": [0]}, ValueError,
     r"token_type_ids do not go with images"),
])
def test_bad_image_inputs(vl, prompt, exc, match):
    if vl[1].gen != "2.5":
        pytest.skip("input checks are the same for every generation")
    llm = LLM(vl[0], dtype="float32", kernel_backend="torch")
    with pytest.raises(exc, match=match):
        llm.classify([prompt(images(9)[0])], use_tqdm=False)


def test_prompts_with_images_are_not_truncated(vl):
    llm = LLM(vl[0], dtype="float32", kernel_backend="torch")
    p = {"prompt": f"some words {IMG}", "multi_modal_data": {"image": images(10, GENS[vl[1].gen][3])[0]}}
    assert llm.classify([p], truncate_prompt_tokens=-1, use_tqdm=False)  # fits: nothing to cut
    with pytest.raises(ValueError, match=r"prompts\[0\] has images and \d+ tokens, more than the truncation "
                                         r"limit 4; a prompt with images is not truncated"):
        llm.classify([p, "fine"], truncate_prompt_tokens=4, use_tqdm=False)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("gen", ["2.5", "2", "3"])
def test_bf16_on_gpu(gen, tmp_path):
    """bf16 on the default kernels (head_dim 64 on both towers) against transformers in
    fp32: DESIGN's bf16 bar (probabilities within 2e-2, the same argmax), then the
    text-only prompts again through the CUDA graphs."""
    model, tok, score = save_vl(tmp_path, gen, width=128, num_labels=3)
    prompts = _prompts(11, gen) * 3
    llm = LLM(str(tmp_path), dtype="bfloat16", device="cuda")
    got = torch.tensor([o.outputs.probs for o in llm.classify(_dicts(prompts), use_tqdm=False)])
    ref = torch.stack([reference(model, tok, score, t, im).softmax(-1) for t, im in prompts])
    # transformers' own bf16 run, for the prompts this random model makes ill-conditioned
    # (Qwen2-VL's: 0.38 off its fp32 run on one)
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.gen = gen
    hf16 = torch.stack([reference(half, tok, score, t, im).softmax(-1) for t, im in prompts])
    assert_bf16_bar(got, ref, hf16)
    text = [i for i, (_, im) in enumerate(prompts) if not im]
    again = torch.tensor([o.outputs.probs for o in llm.classify([prompts[i][0] for i in text], use_tqdm=False)])
    assert_bf16_bar(again, ref[text], hf16[text])


# ---------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("gen", ["2.5", "3"])
def test_lora_adapter_on_the_language_model(gen, tmp_path):
    """A PEFT adapter on the language model's attention and MLP (random A and B), saved
    from transformers' model: prompts with images that run with it match the merged
    transformers model, and those without it in the same batch the base model. An
    adapter on the vision tower is refused before any work."""
    peft = pytest.importorskip("peft")
    from pyengine import LoRARequest

    base = tmp_path / "base"
    model, tok, score = save_vl(base, gen)
    prompts = _prompts(14, gen)
    want_base = [reference(model, tok, score, t, im) for t, im in prompts]
    torch.manual_seed(0)
    lm = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                         target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    pm = peft.get_peft_model(model, lm)
    pm.save_pretrained(tmp_path / "lm")
    merged = pm.merge_and_unload()
    want = [reference(merged, tok, score, t, im) for t, im in prompts]
    llm = LLM(str(base), dtype="float32", kernel_backend="torch", enable_lora=True)
    req = LoRARequest("lm", 1, str(tmp_path / "lm"))
    got = llm.classify(_dicts(prompts) * 2, lora_request=[req] * len(prompts) + [None] * len(prompts),
                       use_activation=False, use_tqdm=False)
    for i, ref in enumerate(want + want_base):
        torch.testing.assert_close(torch.tensor(got[i].outputs.probs), ref, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"prompt {i} ({'adapter' if i < len(prompts) else 'base'}): {m}")
    assert (want[0] - want_base[0]).abs().max() > 1e-2  # the adapter changes the result

    vis, _, _ = save_vl(tmp_path / "again", gen)
    pv = peft.get_peft_model(vis, peft.LoraConfig(r=2, init_lora_weights=False, target_modules=r".*visual.*\.qkv"))
    pv.save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match=r"LoRA adapter 'vision': .*visual\.blocks\.0\.attn\.qkv adapts "
                                         r"vision\.blocks\.0\.qkv_w, which does not take LoRA here"):
        llm.classify(["text"], lora_request=LoRARequest("vision", 2, str(tmp_path / "vision")), use_tqdm=False)


# ---------------------------------------------------------------------------- server
CHAT = ("{% for m in messages %}{{ m.role }}: {% if m.content is string %}{{ m.content }}{% else %}"
        "{% for p in m.content %}{% if p.type == 'image' %}" + IMG + "{% else %}{{ p.text }}{% endif %}"
        "{% endfor %}{% endif %} | {% endfor %}")


@needs_pil
def test_server_classify_messages_with_images(vl):
    """/classify with chat messages holding image_url parts (base64 PNG data URLs): the
    template places each image's placeholder; the result is LLM.classify's on the same
    text and pixels. URLs to fetch, bad payloads and unknown parts are 400s."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from pyengine.config import EngineConfig
    from pyengine.engine import EngineCore
    from pyengine.serve import Server, serve_in_thread
    from test_serve import Client

    path, model = vl[:2]
    if model.gen != "2.5":
        pytest.skip("the same server path for every generation")
    a, b, _ = images(12)

    def data_url(arr):
        buf = io.BytesIO()
        PIL.fromarray(arr).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    core = EngineCore(EngineConfig(model=path, dtype="float32", kernel_backend="torch"))
    server = Server(core, ["vl"], chat_template=CHAT)
    url, stop = serve_in_thread(server.build_app())
    client = Client(url, server)

    def post(body):
        return client.post("/classify", body)

    try:
        msgs = [{"role": "user", "content": [{"type": "text", "text": "look "},
                                             {"type": "image_url", "image_url": {"url": data_url(a)}},
                                             {"type": "text", "text": " and "},
                                             {"type": "image_url", "image_url": data_url(b)}]},
                {"role": "assistant", "content": "fine"}]
        status, body = post({"model": "vl", "messages": msgs})
        assert status == 200, body
        text = f"user: look {IMG} and {IMG} | assistant: fine | "
        want = LLM(path, dtype="float32", kernel_backend="torch").classify(
            [{"prompt": text, "multi_modal_data": {"image": [a, b]}}], use_tqdm=False)[0]
        torch.testing.assert_close(torch.tensor(body["data"][0]["probs"]), torch.tensor(want.outputs.probs),
                                   atol=1e-5, rtol=0)
        assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
        # /tokenize renders and expands the same way: the ids /classify ran
        status, body = client.post("/tokenize", {"messages": msgs, "add_generation_prompt": False})
        assert status == 200 and body["tokens"] == want.prompt_token_ids, body
        for part, match in (({"type": "image_url", "image_url": {"url": "https://x/cat.png"}}, "not fetched from URLs"),
                            ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                             "cannot decode the image"),
                            ({"type": "image_url", "image_url": {"url": "data:image/png,raw"}}, "must be base64"),
                            ({"type": "audio_url"}, "must be a text part")):
            status, body = post({"messages": [{"role": "user", "content": [part, msgs[0]["content"][1]]}]})
            assert status == 400 and match in body["error"]["message"], (part, body)
    finally:
        stop()


# ---------------------------------------------------------------------------- corpora
@needs_pil
def test_batch_job_with_an_image_column(vl, tmp_path, capsys):
    """python -m pyengine.batch --image-column: paths relative to the input file, the
    outputs of LLM.classify on the same texts and images; a missing file fails the job
    before any work, and a text model refuses the column."""
    from pyengine.batch_job import main

    path, model = vl[:2]
    if model.gen != "2":
        pytest.skip("the same corpus path for every generation")
    imgs = images(13, GENS[model.gen][3])
    (tmp_path / "imgs").mkdir()
    rows = []
    for i, a in enumerate(imgs * 2):
        PIL.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"text": f"row {i} {IMG} end", "image": f"imgs/{i}.png", "id": i})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    argv = ["--model", path, "--input", str(src), "--output", str(out), "--image-column", "image", "--dtype",
            "float32", "--kernel-backend", "torch", "--shard-size", "4", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == list(range(len(rows)))
    want = LLM(path, dtype="float32", kernel_backend="torch").classify(
        [{"prompt": r["text"], "multi_modal_data": {"image": imgs[i % 3]}} for i, r in enumerate(rows)],
        use_tqdm=False)
    torch.testing.assert_close(torch.tensor([g["probs"] for g in got]), torch.tensor([w.outputs.probs for w in want]),
                               atol=1e-5, rtol=0)
    rows[4]["image"] = "imgs/missing.png"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(argv + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "(row 4), column 'image': file" in err and "imgs/missing.png' not found" in err, err
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")  # the same check on Parquet
    assert main(argv + ["--input", str(tmp_path / "in.parquet"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "in.parquet row 4, column 'image': file" in err and "imgs/missing.png' not found" in err, err
    assert main(argv + ["--pair-column", "text"]) == 2
    assert "--image-column goes with --text-column alone" in capsys.readouterr().err
    from transformers import BertConfig

    from pyengine.integrations.ray import PyEngineClassifier
    from tiny import save_tiny

    save_tiny(tmp_path / "bert", BertConfig(vocab_size=160, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64), tokenizer=None)
    with pytest.raises(ValueError, match="image_column needs a vision-language model; "
                                         "BertForSequenceClassification takes text only"):
        PyEngineClassifier(str(tmp_path / "bert"), image_column="image")


@pytest.mark.parametrize("bad, err, match", [
    # an image prompt whose array no processor takes
    ({"prompt": f"x {IMG}", "multi_modal_data": {"image": np.zeros((28, 28, 3), np.float32)}}, TypeError,
     r"prompts\[5\] image 0 is a torch.float32 array"),
    # two images for one placeholder
    ({"prompt": f"x {IMG}", "multi_modal_data": {"image": [np.zeros((28, 28, 3), np.uint8)] * 2}}, ValueError,
     r"prompts\[5\] has 1 image placeholder token\(s\) for 2 image\(s\)"),
    # a token prompt with an id past the vocabulary
    ({"prompt_token_ids": [3, 10 ** 6]}, ValueError, r"prompts\[5\] has token id 1000000 outside the vocabulary"),
    # an image prompt whose own token ids are out of the vocabulary
    ({"prompt_token_ids": [10 ** 6], "multi_modal_data": {"image": np.zeros((28, 28, 3), np.uint8)}}, ValueError,
     r"prompts\[5\] has token id 1000000 outside the vocabulary"),
])
def test_a_late_bad_prompt_is_reported_before_any_image_is_read(vl, monkeypatch, bad, err, match):
    """Checks that read no pixels run over every prompt first: the last prompt's mistake
    costs no image decoding or resizing of the prompts before it."""
    if vl[1].gen != "2.5":
        pytest.skip("the order of the checks is the same for every generation")
    llm = LLM(vl[0], dtype="float32", kernel_backend="torch")
    read = []
    monkeypatch.setattr(ImageProcessor, "_resized", lambda self, *a, **k: read.append(1) or 1 / 0)
    good = [{"prompt": f"p{i} {IMG}", "multi_modal_data": {"image": im}} for i, im in enumerate(images(3) * 2)]
    with pytest.raises(err, match=match):
        llm.classify(good[:5] + [bad], use_tqdm=False)
    assert read == []
