"""Image and video features given in place of pixels (vLLM's embedding inputs:
``{"image": {"image_embeds": (tokens, width), "image_grid_thw": (items, 3)}}``, and
``video_`` alike) on Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the features come from
transformers' own vision tower (Qwen3-VL's rows hold the merger's output, then each
deepstack level's), and the results are checked against the same prompts given as pixels
and against transformers' model; mixed with pixels in a prompt and a batch; bad inputs."""
import json

import pytest
import torch

from pyengine import LLM
from pyengine.multimodal import Video
from test_qwen_vl import IMG, _prompts, images, reference, save_vl
from test_qwen_vl_video import VID, frames


@pytest.fixture(scope="module", params=["2.5", "2", "3"], ids=["qwen2.5-vl", "qwen2-vl", "qwen3-vl"])
def vle(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("vle")
    model, tok, score = save_vl(path, request.param)
    with open(path / "video_preprocessor_config.json", "w") as f:
        # 4 frames of 4x6 patches stay as they are under both generations' rules
        json.dump({"min_pixels": 56 * 56, "max_pixels": 32 * 32 * 64, "size": {"shortest_edge": 32 * 32 * 4,
                   "longest_edge": 32 * 32 * 64}}, f)
    llm = LLM(str(path), dtype="float32", kernel_backend="torch")
    return llm, model, tok, score


def _features(model, pixels, grids, video=False):
    """transformers' tower output for pixels -> (tokens, width) rows: Qwen3-VL's merger
    output, then its deepstack levels, side by side."""
    with torch.no_grad():
        get = model.model.get_video_features if video else model.model.get_image_features
        out = get(pixels, torch.tensor(grids), return_dict=True)
    rows = torch.cat(out.pooler_output)
    deep = getattr(out, "deepstack_features", None) or []
    # A level is one tensor, or (some transformers versions) a tuple of one per image.
    return torch.cat([rows] + [torch.cat(d) if isinstance(d, (list, tuple)) else d for d in deep], dim=1)


def _image_case(llm, model, seed):
    proc = llm.engine.inputs.images
    imgs = images(seed, proc.patch)[:2]
    done = [proc(a, "img") for a in imgs]
    pix = proc.finish(torch.cat([p for p, _ in done]))
    grids = [g for _, g in done]
    return imgs, grids, _features(model, pix, grids)


def test_image_features_score_as_their_pixels(vle):
    llm, model, tok, score = vle
    imgs, grids, rows = _image_case(llm, model, 0)
    text = f"look {IMG} and {IMG} now"
    by_rows = {"prompt": text, "multi_modal_data": {"image": {"image_embeds": rows, "image_grid_thw": grids}}}
    by_pixels = {"prompt": text, "multi_modal_data": {"image": imgs}}
    a, b = llm.classify([by_rows, by_pixels], use_activation=False, use_tqdm=False)
    assert a.prompt_token_ids == b.prompt_token_ids
    torch.testing.assert_close(torch.tensor(a.outputs.probs), torch.tensor(b.outputs.probs), atol=1e-5, rtol=1e-5)
    ref = reference(model, tok, score, text, imgs)
    torch.testing.assert_close(torch.tensor(a.outputs.probs), ref, atol=1e-4, rtol=1e-4)
    # alone: a batch whose every item is given, the vision tower not run at all
    alone = llm.classify([by_rows], use_activation=False, use_tqdm=False)[0]
    torch.testing.assert_close(torch.tensor(alone.outputs.probs), torch.tensor(a.outputs.probs), atol=1e-5, rtol=0)


def test_features_and_pixels_mix_in_a_prompt_and_a_batch(vle):
    # Per-item layout (items, tokens, width) works too; one prompt holds features for its
    # image and pixels for its video, beside prompts of pixels only and text only.
    llm, model, _, _ = vle
    imgs, grids, rows = _image_case(llm, model, 1)
    v = frames(2, 4, 4, 6, patch=llm.engine.inputs.images.patch)
    n = grids[0][0] * grids[0][1] * grids[0][2] // 4
    one = {"image_embeds": rows[None, :n], "image_grid_thw": [grids[0]]}
    prompts = [{"prompt": f"a {IMG} b {VID}", "multi_modal_data": {"image": one, "video": v}},
               {"prompt": f"a {IMG} b {VID}", "multi_modal_data": {"image": imgs[0], "video": v}},
               {"prompt": f"{IMG}", "multi_modal_data": {"image": imgs[1]}},
               "text only"]
    got = llm.classify(prompts, use_activation=False, use_tqdm=False)
    # raw logits of a few units: transformers' tower and ours agree to float rounding
    torch.testing.assert_close(torch.tensor(got[0].outputs.probs), torch.tensor(got[1].outputs.probs), atol=1e-5,
                               rtol=1e-5)
    for i, p in enumerate(prompts):  # and each alone
        alone = llm.classify([p], use_activation=False, use_tqdm=False)[0]
        torch.testing.assert_close(torch.tensor(alone.outputs.probs), torch.tensor(got[i].outputs.probs),
                                   atol=1e-5, rtol=0, msg=lambda m: f"prompt {i}: {m}")


def test_video_features_score_as_their_frames(vle):
    # Qwen3-VL writes each patch group's timestamp as for frames sampled at fps (2).
    llm, model, _, _ = vle
    proc = llm.engine.inputs.images
    v = frames(3, 4, 4, 6, patch=proc.patch)
    _, mm = proc.prompt([5, proc.video_token_id], [Video(v)], "p")
    t = len(mm.grids) if model.gen == "3" else mm.grids[0][0]
    grid = (t,) + tuple(mm.grids[0][1:])
    rows = _features(model, proc.finish_video(mm.video_values), [grid], video=True)
    text = f"what {VID} happens"
    a, b = llm.classify([{"prompt": text, "multi_modal_data": {"video": {"video_embeds": rows,
                                                                        "video_grid_thw": [grid]}}},
                         {"prompt": text, "multi_modal_data": {"video": v}}], use_activation=False, use_tqdm=False)
    assert a.prompt_token_ids == b.prompt_token_ids
    torch.testing.assert_close(torch.tensor(a.outputs.probs), torch.tensor(b.outputs.probs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("data, match", [
    (lambda r, g: {"image": {"image_embeds": r[:-1], "image_grid_thw": g}},
     r"\['image'\]: image_embeds is \(\d+, \d+\); its grids \[\[1, 4, 6\], \[1, 8, 4\]\] need \(14, \d+\)"),
    (lambda r, g: {"image": {"image_embeds": r[:, :-1], "image_grid_thw": g}}, r"need \(14, \d+\)"),
    (lambda r, g: {"image": {"image_embeds": r, "grid_thw": g}},
     r"embedding inputs are a dict of exactly \['image_embeds', 'image_grid_thw'\]"),
    (lambda r, g: {"image": {"image_embeds": r.long(), "image_grid_thw": g}}, r"must be a float tensor"),
    # features that would carry NaN through every layer into the scores
    (lambda r, g: {"image": {"image_embeds": r.index_fill(0, torch.tensor([9]), float("nan")), "image_grid_thw": g}},
     r"image_embeds holds NaN or infinity \(row 9 of its tokens\)"),
    (lambda r, g: {"image": {"image_embeds": r, "image_grid_thw": [[1.0, 4, 6]]}}, r"must be positive ints"),
    (lambda r, g: {"image": {"image_embeds": r, "image_grid_thw": [[1, 3, 6], [1, 8, 4]]}},
     r"grid \(1, 3, 6\) is not a multiple of the merge size 2"),
    (lambda r, g: {"image": {"image_embeds": r[None].expand(3, -1, -1), "image_grid_thw": g}},
     r"3 image_embeds items for 2 grids"),
    # (items, tokens, width) whose total fits but whose items do not: 7 + 7 for 6 and 8
    (lambda r, g: {"image": {"image_embeds": r.view(2, 7, -1), "image_grid_thw": g}},
     r"image_embeds has 7 tokens per item; its grids \[\[1, 4, 6\], \[1, 8, 4\]\] need \[6, 8\]"),
])
def test_bad_embedding_inputs(vle, data, match):
    llm, model, _, _ = vle
    if model.gen != "2":
        pytest.skip("input checks are the same for every generation")
    _, grids, rows = _image_case(llm, model, 4)
    with pytest.raises(ValueError, match=match):
        llm.classify([{"prompt": f"{IMG} {IMG}", "multi_modal_data": data(rows, grids)}], use_tqdm=False)


def test_models_that_take_pixels_only_refuse_features(tmp_path):
    from test_nemotron_vl import save_nemotron
    save_nemotron(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch")
    data = {"image": {"image_embeds": torch.randn(4, 48), "image_grid_thw": [[1, 4, 4]]}}
    with pytest.raises(ValueError, match=r"prompts\[0\] has image embeddings; this model takes pixels only"):
        llm.classify([{"prompt": "x <image>", "multi_modal_data": data}], use_tqdm=False)


def _feature_prompts(llm, model, gen):
    """test_qwen_vl's mixed prompts (texts its bf16 GPU test holds to the bar), each image
    given as transformers' tower features instead of pixels."""
    proc, out = llm.engine.inputs.images, []
    for text, imgs in _prompts(11, gen):
        if not imgs:
            out.append(text)
            continue
        done = [proc(a, "img") for a in imgs]
        grids = [g for _, g in done]
        rows = _features(model, proc.finish(torch.cat([p for p, _ in done])), grids)
        out.append({"prompt": text, "multi_modal_data": {"image": {"image_embeds": rows, "image_grid_thw": grids}}})
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("gen", ["2.5", "3"])
def test_bf16_features_on_gpu(gen, tmp_path):
    """Features given in fp32 on the host, the model in bf16 on the GPU (head_dim 64, the
    default kernels) against fp32 on CPU: DESIGN's bf16 bar."""
    model, _, _ = save_vl(tmp_path, gen, width=128, num_labels=3)
    ref_llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch")
    prompts = _feature_prompts(ref_llm, model, gen) * 2
    got = LLM(str(tmp_path), dtype="bfloat16", device="cuda").classify(prompts, use_tqdm=False)
    ref = ref_llm.classify(prompts, use_tqdm=False)
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in got]),
                               torch.tensor([o.outputs.probs for o in ref]), atol=2e-2, rtol=0)


def test_positions_past_the_rotary_table_are_refused(tmp_path):
    # A video's 3-D positions step with its time (tokens_per_second * temporal_patch / fps
    # per group in Qwen2.5-VL): 150 groups of one token reach position 600 in a 154-token
    # prompt, past the 512 rows of the rotary table. Refused before any work, naming the
    # prompt; the text prompt beside it is not lost to a failed batch.
    save_vl(tmp_path, "2.5")
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch")
    table = llm.engine.model.cos_sin.shape[0]
    width = llm.engine.hf_config.text_config.hidden_size
    long = {"prompt": f"x {VID}", "multi_modal_data": {"video": {"video_embeds": torch.randn(150, width),
                                                                "video_grid_thw": [150, 2, 2]}}}
    with pytest.raises(ValueError, match=rf"prompts\[1\] takes rotary positions up to \d+, past the model's {table}"):
        llm.classify(["an unrelated text prompt", long], use_tqdm=False)
    assert llm.classify("an unrelated text prompt", use_tqdm=False)[0].outputs.probs
