"""Videos on Qwen2-VL and Qwen2.5-VL classifiers (pyengine.multimodal): patches against a
direct loop over the frames, positions against transformers' rope index (and by hand
where transformers 5 starts the text after a video elsewhere), the whole model against
transformers' own on the same weights and pixels, batch invariance, and bad inputs."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyengine import LLM
from pyengine.inputs import parse_prompts
from pyengine.multimodal import ImageProcessor, Video, VideoSettings, rope_positions, smart_resize
from test_qwen_vl import IMG, save_vl

VID = "<|vision_start|><|video_pad|><|vision_end|>"
# Video pixel bounds of the tiny checkpoints: frames of 28x140 and 56x84 pixels stay as they are.
V_MIN, V_MAX = 56 * 56, 28 * 28 * 16


def frames(seed, n, h, w, patch=14):
    """n random RGB frames of h x w patches."""
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, h * patch, w * patch, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=["2.5", "2"], ids=["qwen2.5-vl", "qwen2-vl"])
def vlv(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("vlv")
    model, tok, score = save_vl(path, request.param)
    with open(path / "video_preprocessor_config.json", "w") as f:
        json.dump({"min_pixels": V_MIN, "max_pixels": V_MAX, "temporal_patch_size": 2, "patch_size": 14,
                   "merge_size": 2}, f)
    return str(path), model, tok, score


def _proc(interval=1.0):
    return ImageProcessor(0, min_pixels=V_MIN, max_pixels=V_MAX,
                          video=VideoSettings(min_pixels=V_MIN, max_pixels=V_MAX, interval=interval))


def _interval(model, fps=2.0):
    tps = getattr(model.config.vision_config, "tokens_per_second", None)
    return 1.0 if tps is None else tps * 2 / fps


@pytest.mark.parametrize("n", [
    4,  # two whole groups of two frames
    3,  # an odd count: the last frame repeated
    1,  # one frame: one group
])
def test_video_patches_match_a_loop_over_the_frames(n):
    v = frames(n, n, 4, 6)
    proc = _proc()
    patches, grid, times = proc.video(Video(v), "v")
    p, tp, m = 14, 2, 2
    T = -(-n // tp) * tp
    padded = np.concatenate([v, np.repeat(v[-1:], T - n, 0)]) if T > n else v
    assert grid == (T // tp, 4, 6) and patches.dtype == torch.uint8 and times is None
    rows = []
    for g in range(T // tp):
        for by in range(4 // m):
            for bx in range(6 // m):
                for my in range(m):
                    for mx in range(m):
                        y, x = (by * m + my) * p, (bx * m + mx) * p
                        # one patch: (C, frame in group, p, p)
                        rows.append(np.stack([padded[g * tp + k, y:y + p, x:x + p, c] for c in range(3)
                                              for k in range(tp)]).reshape(-1))
    want = torch.from_numpy(np.stack(rows))
    assert torch.equal(patches, want)
    # normalised per channel in float64, no temporal repeat
    got = proc.finish_video(patches).double()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64)
    ref = ((want.double().view(len(rows), 3, -1) / 255 - mean[:, None]) / std[:, None]).view(len(rows), -1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_video_frames_resize_within_the_video_bounds():
    # Every frame is resized alike, by the uint8 antialiased bicubic transformers' video
    # processor runs, to the grid smart_resize gives within the video's own bounds.
    g = np.random.default_rng(3)
    v = g.integers(0, 256, (2, 50, 130, 3), dtype=np.uint8)
    proc = _proc()
    patches, grid, _ = proc.video(Video(list(v)), "v")  # a list of frames works as the array does
    h, w = smart_resize(50, 130, 28, V_MIN, V_MAX)
    assert grid == (1, h // 14, w // 14)
    x = torch.from_numpy(v).permute(0, 3, 1, 2).contiguous()
    r = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    direct, _, _ = proc.video(Video(r.permute(0, 2, 3, 1).numpy()), "v")
    assert torch.equal(patches, direct)


def test_rope_positions_agree_with_transformers_where_it_follows_the_models(vlv):
    # A video whose temporal extent is under its spatial one: transformers 5 and the
    # models' own rule give the same positions.
    model = vlv[1]
    interval = _interval(model)
    pad_i, pad_v = model.config.image_token_id, model.config.video_token_id
    grids = [(1, 4, 6), (2, 2, 10)]  # an image, then a video of two groups of 1x5 tokens
    ids = [7, 8] + [pad_i] * 6 + [9] + [pad_v] * 10 + [10, 11]
    ours = rope_positions(ids, grids, pad_i, 2, [1.0, interval], pad_v)
    t = torch.tensor([ids])
    kinds = (t == pad_i).int() + 2 * (t == pad_v).int()
    kw = {"second_per_grid_ts": torch.tensor([2 / 2.0])} if model.gen == "2.5" else {}
    ref, _ = model.model.get_rope_index(t, mm_token_type_ids=kinds, image_grid_thw=torch.tensor(grids[:1]),
                                        video_grid_thw=torch.tensor(grids[1:]), **kw)
    assert torch.equal(ours, ref[:, 0]), (ours, ref[:, 0])


def test_text_after_a_long_video_starts_past_its_time_extent():
    # Four groups of 2x2 tokens, a step of 4 per group (Qwen2.5-VL at 2 fps with 4 tokens
    # per second): times 0, 4, 8, 12 after two text tokens; the text after starts at 2 +
    # 12 + 1 = 15 (transformers 5 would start it at 2 + 2 = 4, inside the video's times).
    v = 99
    ids = [1, 2] + [v] * 16 + [3, 4]
    pos = rope_positions(ids, [(4, 4, 4)], 98, 2, [4.0], v)
    t = np.repeat([0, 4, 8, 12], 4) + 2
    h = np.tile(np.repeat([0, 1], 2), 4) + 2
    w = np.tile([0, 1], 8) + 2
    want = np.concatenate([np.array([[0, 1]] * 3), np.stack([t, h, w]), np.array([[15, 16]] * 3)], axis=1)
    assert torch.equal(pos, torch.from_numpy(want)), pos
    # a fractional step is floored per group, not per step: 0, 1.5, 3, 4.5 -> 0, 1, 3, 4
    pos = rope_positions([v] * 16, [(4, 4, 4)], 98, 2, [1.5], v)
    assert pos[0, ::4].tolist() == [0, 1, 3, 4]


def _hf_logits(model, score, ids, items, interval, positions=None):
    """transformers' last-token logits (fp32 head) for token ids with every placeholder
    expanded, fed our processor's pixels; positions: (3, L) to pass instead of its own."""
    proc = _proc(interval)
    kw = {}
    imgs = [x for x in items if not isinstance(x, Video)]
    vids = [x for x in items if isinstance(x, Video)]
    if imgs:
        out = [proc(a, "img") for a in imgs]
        kw.update(pixel_values=proc.finish(torch.cat([p for p, _ in out])),
                  image_grid_thw=torch.tensor([g for _, g in out]))
    if vids:
        out = [proc.video(v, "vid")[:2] for v in vids]
        kw.update(pixel_values_videos=proc.finish_video(torch.cat([p for p, _ in out])),
                  video_grid_thw=torch.tensor([g for _, g in out]))
        if model.gen == "2.5":
            kw["second_per_grid_ts"] = torch.tensor([interval / model.config.vision_config.tokens_per_second] * len(vids))
    t = torch.tensor([ids])
    kw["mm_token_type_ids"] = (t == model.config.image_token_id).int() + 2 * (t == model.config.video_token_id).int()
    if positions is not None:
        kw["position_ids"] = positions[:, None]
    with torch.no_grad():
        h = model.model(input_ids=t, **kw).last_hidden_state[0, -1]
    return h.float() @ score.t()


def _processed(llm, prompt):
    """The TokenizedPrompt our engine runs for a prompt (placeholders expanded, positions laid out)."""
    return llm.engine.inputs.process(parse_prompts([prompt]))[0]


def _video_prompts(seed):
    a = frames(seed, 4, 2, 10)    # two groups of 1x5 tokens
    b = frames(seed + 1, 3, 4, 6)  # three frames, padded to two groups of 2x3 tokens
    img = frames(seed + 2, 1, 4, 4)[0]
    return [({"prompt": f"what happens {VID} in it", "multi_modal_data": {"video": a}}, [Video(a)]),
            ({"prompt": f"{IMG} then {VID} end", "multi_modal_data": {"image": img, "video": list(b)}},
             [img, Video(b)]),
            ({"prompt": f"{VID} and {VID}", "multi_modal_data": {"video": [b, a]}}, [Video(b), Video(a)]),
            ("plain text in the same batch", [])]


@pytest.mark.parametrize("fps", [2.0, 1.0])
def test_videos_match_transformers(vlv, fps):
    path, model, tok, score = vlv
    llm = LLM(path, dtype="float32", kernel_backend="torch", mm_processor_kwargs={"fps": fps})
    prompts = _video_prompts(int(fps))
    got = llm.classify([p for p, _ in prompts], use_activation=False, use_tqdm=False)
    interval = _interval(model, fps)
    for i, ((p, items), out) in enumerate(zip(prompts, got)):
        ids = out.prompt_token_ids
        tp = _processed(llm, p)
        assert ids == tp.token_ids
        # transformers with the positions the models were trained with (its own differ
        # after a video longer in time than in space); they are checked on their own above
        pos = tp.mm.rope_positions if tp.mm is not None else None
        ref = _hf_logits(model, score, ids, items, interval, pos)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), ref, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"prompt {i}: {m}")


def assert_batch_invariant(llm, prompts):
    """Each prompt alone gives its result in one call with the others (fp32: 1e-5)."""
    together = [o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)]
    for i, p in enumerate(prompts):
        alone = llm.classify([p], use_tqdm=False)[0].outputs.probs
        torch.testing.assert_close(torch.tensor(alone), torch.tensor(together[i]), atol=1e-5, rtol=0,
                                   msg=lambda m: f"prompt {i}: {m}")


def test_video_results_do_not_depend_on_the_batch(vlv):
    llm = LLM(vlv[0], dtype="float32", kernel_backend="torch")
    assert_batch_invariant(llm, [p for p, _ in _video_prompts(5)])


def test_triton_kernels_in_the_interpreter(tmp_path):
    # The tower's attention runs per group of patches on the varlen kernel, with windows (2.5).
    model, tok, score = save_vl(tmp_path, "2.5", width=128)
    with open(tmp_path / "video_preprocessor_config.json", "w") as f:
        json.dump({"min_pixels": V_MIN, "max_pixels": V_MAX}, f)
    v = frames(11, 4, 4, 4)
    p = {"prompt": f"x {VID} y", "multi_modal_data": {"video": v}}
    got = LLM(str(tmp_path), dtype="float32", kernel_backend="triton").classify([p], use_activation=False,
                                                                                 use_tqdm=False)[0]
    ref = LLM(str(tmp_path), dtype="float32", kernel_backend="torch").classify([p], use_activation=False,
                                                                                use_tqdm=False)[0]
    torch.testing.assert_close(torch.tensor(got.outputs.probs), torch.tensor(ref.outputs.probs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt, exc, match", [
    (lambda v: {"prompt": f"x {VID} {VID}", "multi_modal_data": {"video": v}}, ValueError,
     r"prompts\[0\] has 2 video placeholder token\(s\) for 1 video\(s\)"),
    (lambda v: f"x {VID}", ValueError, r"has an image or video placeholder token but no image or video"),
    (lambda v: {"prompt": f"x {VID}", "multi_modal_data": {"video": v.astype(np.float32)}}, TypeError,
     r"prompts\[0\] video 0 frame 0 is a torch.float32 array"),
    (lambda v: {"prompt": f"x {VID}", "multi_modal_data": {"video": [v[0], v[1, :28]]}}, ValueError,
     r"video 0 frame 1 is \(28, 84\), frame 0 \(56, 84\); a video's frames must share one size"),
    (lambda v: {"prompt": f"x {VID}", "multi_modal_data": {"video": v[None]}}, ValueError,
     r"video 0 has shape \(1, 2, 56, 84, 3\); a video is \(T, H, W\[, 3 or 4\]\) frames"),
    (lambda v: {"prompt": f"x {VID}", "multi_modal_data": {"video": (v, {"fps": 2})}}, ValueError,
     r"video 0: \(frames, metadata\) is taken by Qwen3-VL only"),
    (lambda v: {"prompt": f"x {VID}", "multi_modal_data": {"video": []}}, ValueError, r"is an empty list"),
])
def test_bad_video_inputs(vlv, prompt, exc, match):
    if vlv[1].gen != "2.5":
        pytest.skip("input checks are the same for both generations")
    llm = LLM(vlv[0], dtype="float32", kernel_backend="torch")
    with pytest.raises(exc, match=match):
        llm.classify([prompt(frames(1, 2, 4, 6))], use_tqdm=False)


def test_a_three_dimensional_colour_array_is_one_frame(vlv):
    """A (H, W, 3) video is one frame, as transformers' make_batched_videos reads it (not
    56 grey frames 3 pixels wide); (T, H, W) with another last size stays T grey frames."""
    if vlv[1].gen != "2.5":
        pytest.skip("the reading of frames is the same for both generations")
    llm = LLM(vlv[0], dtype="float32", kernel_backend="torch")
    v = frames(3, 1, 4, 6)
    one, batched, grey = llm.classify([{"prompt": f"x {VID}", "multi_modal_data": {"video": x}}
                                       for x in (v[0], v, v[..., 0])], use_tqdm=False)
    assert one.prompt_token_ids == batched.prompt_token_ids
    assert one.outputs.probs == batched.outputs.probs
    assert _processed(llm, {"prompt": f"x {VID}", "multi_modal_data": {"video": v[..., 0]}}).mm.grids == [(1, 4, 6)]


def test_models_without_video_refuse_it(tmp_path):
    # Nemotron VL cuts images into tiles and has no video placeholder.
    from test_nemotron_vl import save_nemotron
    save_nemotron(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch")
    with pytest.raises(ValueError, match=r"prompts\[0\] has a video; this model takes images only"):
        llm.classify([{"prompt": "x <image>", "multi_modal_data": {"video": frames(1, 2, 4, 4, 16)}}],
                     use_tqdm=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"fps": 0}, "fps .* must be a positive number"),
    ({"fps": "2"}, "fps .* must be a positive number"),
])
def test_bad_fps(vlv, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(vlv[0], dtype="float32", kernel_backend="torch", mm_processor_kwargs=kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("gen", ["2.5", "2"])
def test_bf16_video_on_gpu(gen, tmp_path):
    """bf16 on the default kernels (head_dim 64) against fp32 on CPU: DESIGN's bf16 bar."""
    save_vl(tmp_path, gen, width=128)
    with open(tmp_path / "video_preprocessor_config.json", "w") as f:
        json.dump({"min_pixels": V_MIN, "max_pixels": V_MAX}, f)
    prompts = [p for p, _ in _video_prompts(7)] * 2
    got = LLM(str(tmp_path), dtype="bfloat16", device="cuda").classify(prompts, use_tqdm=False)
    ref = LLM(str(tmp_path), dtype="float32", kernel_backend="torch").classify(prompts, use_tqdm=False)
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in got]),
                               torch.tensor([o.outputs.probs for o in ref]), atol=2e-2, rtol=0)


def test_preparing_many_media_prompts_shows_a_progress_bar(vlv, capsys):
    # Past MEDIA_BAR prompts with images or videos, their preparation (frames read,
    # resized, patched) shows a bar that counts every prompt once; the results are the same.
    llm = LLM(vlv[0], dtype="float32", kernel_backend="torch")
    prompts = [p for p, _ in _video_prompts(3)]
    quiet = [o.outputs.probs for o in llm.classify(prompts, use_tqdm=True)]
    assert "Preparing inputs" not in capsys.readouterr().err
    llm.engine.inputs.MEDIA_BAR = 2
    shown = [o.outputs.probs for o in llm.classify(prompts, use_tqdm=True)]
    err = capsys.readouterr().err
    assert "Preparing inputs" in err and "4/4" in err, err
    assert shown == quiet
    llm.classify(prompts, use_tqdm=False)
    assert "Preparing inputs" not in capsys.readouterr().err


VCHAT = ("{% for m in messages %}{{ m.role }}: {% if m.content is string %}{{ m.content }}{% else %}"
         "{% for p in m.content %}{% if p.type == 'video' %}" + VID + "{% elif p.type == 'image' %}" + IMG +
         "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %} | {% endfor %}")


def test_server_classify_messages_with_videos(vlv):
    """/classify and /tokenize with a video_url part holding JPEG frames (vLLM's
    data:video/jpeg;base64,<frame>,<frame>,... form): the result of LLM.classify on the
    same decoded frames. Other video types, URLs and bad frames are 400s."""
    pytest.importorskip("fastapi")

    from pyengine.config import EngineConfig
    from pyengine.engine import EngineCore
    from pyengine.serve import Server, serve_in_thread
    from test_serve import Client

    path, model = vlv[:2]
    if model.gen != "2.5":
        pytest.skip("the same server path for both generations")
    url, decoded = _jpeg_video(frames(21, 3, 4, 6))  # decoded: what the server sees

    core = EngineCore(EngineConfig(model=path, dtype="float32", kernel_backend="torch"))
    server = Server(core, ["vlv"], chat_template=VCHAT)
    base, stop = serve_in_thread(server.build_app())
    client = Client(base, server)
    try:
        msgs = [{"role": "user", "content": [{"type": "text", "text": "what happens "},
                                             {"type": "video_url", "video_url": {"url": url}}]}]
        status, body = client.post("/classify", {"messages": msgs})
        assert status == 200, body
        want = LLM(path, dtype="float32", kernel_backend="torch").classify(
            [{"prompt": f"user: what happens {VID} | ", "multi_modal_data": {"video": decoded}}], use_tqdm=False)[0]
        torch.testing.assert_close(torch.tensor(body["data"][0]["probs"]), torch.tensor(want.outputs.probs),
                                   atol=1e-5, rtol=0)
        assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
        status, body = client.post("/tokenize", {"messages": msgs, "add_generation_prompt": False})
        assert status == 200 and body["tokens"] == want.prompt_token_ids, body
        for u, match in (("data:video/mp4;base64,AAAA", "a video is taken as JPEG frames"),
                         ("https://x/clip.mp4", "not fetched from URLs"),
                         (url.split(",")[0] + "," + url.split(",")[1] + ",AAAA", "frame 1: cannot decode the image")):
            bad = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": u}}]}]
            status, body = client.post("/classify", {"messages": bad})
            assert status == 400 and match in body["error"]["message"], (u, body)
    finally:
        stop()


def _jpeg_video(v):
    """(data:video/jpeg URL of v's frames, the frames as a JPEG decoder gives them back)."""
    PIL = pytest.importorskip("PIL.Image")
    import base64
    import io
    jpegs = []
    for f in v:
        buf = io.BytesIO()
        PIL.fromarray(f).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    url = "data:video/jpeg;base64," + ",".join(base64.b64encode(j).decode() for j in jpegs)
    return url, [np.array(PIL.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]


@pytest.mark.parametrize("gen", ["2.5", "3"])
def test_score_takes_video_parts(gen, tmp_path):
    # A cross-encoder (one label) scoring a text query against documents with videos: each
    # pair is query then document back to back, the video as its placeholder, scored as
    # classify() scores the same text and frames (sigmoid).
    model, _, _ = save_vl(tmp_path, gen, num_labels=1)
    size = {"size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}} if gen == "3" else {}
    with open(tmp_path / "video_preprocessor_config.json", "w") as f:
        json.dump({"min_pixels": V_MIN, "max_pixels": V_MAX, **size}, f)
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch")
    patch = 16 if gen == "3" else 14
    url, decoded = _jpeg_video(frames(31, 4, 4, 6, patch=patch))
    part = {"type": "video_url", "video_url": {"url": url}}
    docs = [{"content": [{"type": "text", "text": "clip: "}, part]}, "just text"]
    got = llm.score("what happens", docs, use_tqdm=False)
    want = llm.classify([{"prompt": f"what happensclip: {VID}", "multi_modal_data": {"video": decoded}},
                         "what happensjust text"], use_tqdm=False)
    for g, w in zip(got, want):
        assert g.prompt_token_ids == w.prompt_token_ids
        assert g.outputs.score == pytest.approx(w.outputs.probs[0], abs=1e-6)


def test_score_refuses_videos_on_image_only_models(tmp_path):
    from test_nemotron_vl import save_nemotron
    save_nemotron(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", kernel_backend="torch")
    url, _ = _jpeg_video(frames(2, 2, 4, 4, 16))
    with pytest.raises(ValueError, match=r"data_2\[0\] is a video; this model takes images only"):
        llm.score("q", {"type": "video_url", "video_url": {"url": url}}, use_tqdm=False)
