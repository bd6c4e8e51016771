"""Videos on Qwen3-VL classifiers (pyengine.multimodal): each patch group's tokens after
a "<t seconds>" text, as transformers' Qwen3-VL processor lays them out. The pieces are
checked against transformers' own functions (its video smart_resize, frame sampler,
timestamps, placeholder text and patchify; its full video processor needs torchvision),
the whole model against transformers' on the same weights and pixels, and bad inputs."""
import json
from types import SimpleNamespace

import pytest
import torch
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize
from transformers.video_utils import VideoMetadata

from pyengine import LLM
from pyengine.multimodal import ImageProcessor, Video, VideoSettings
from test_qwen_vl import IMG, save_vl
from test_qwen_vl_video import VID, assert_batch_invariant, frames

# Video pixel budget of the tiny checkpoint (over all frames, rounded to pairs): 4 frames of
# 64x96 pixels (4x6 patches of 16) stay as they are.
V_MIN, V_MAX = 32 * 32 * 4, 32 * 32 * 64
HALF = [0.5] * 3


@pytest.fixture(scope="module")
def vl3(tmp_path_factory):
    path = tmp_path_factory.mktemp("vl3")
    model, tok, score = save_vl(path, "3")
    with open(path / "video_preprocessor_config.json", "w") as f:
        json.dump({"size": {"shortest_edge": V_MIN, "longest_edge": V_MAX}, "patch_size": 16,
                   "temporal_patch_size": 2, "merge_size": 2, "image_mean": HALF, "image_std": HALF, "fps": 2,
                   "min_frames": 4, "max_frames": 768}, f)
    return str(path), model, tok, score


def _settings(**kw):
    return VideoSettings(**{"min_pixels": V_MIN, "max_pixels": V_MAX, "mean": HALF, "std": HALF,
                            "timestamps": True, **kw})


def _proc(tok=None, **kw):
    return ImageProcessor(0, patch_size=16, min_pixels=56 * 56, max_pixels=32 * 32 * 16, mean=HALF, std=HALF,
                          video=_settings(**kw), tokenizer=tok)


@pytest.mark.parametrize("n, H, W", [
    (4, 64, 96),     # within the budget: kept
    (3, 50, 130),    # an odd count rounds to 4 frames' budget; rounded to multiples of 32
    (16, 300, 200),  # over the budget: shrunk
    (2, 20, 40),     # a side under 32: scaled up first
    (2, 33, 33),     # under the minimum: grown
    (9, 720, 1280),  # a real frame size
])
@pytest.mark.parametrize("cap", [False, True])
def test_frame_size_matches_transformers(n, H, W, cap):
    s = _settings(cap_pixels_per_frame=cap, max_video_tokens=8)
    got = s.frames_size(n, H, W, 32, 2)
    hi = V_MAX
    if cap:  # transformers' resize() turns the per-frame cap into the budget it passes on
        hf = Qwen3VLVideoProcessor(size={"shortest_edge": V_MIN, "longest_edge": V_MAX}, max_video_tokens=8)
        seen = {}

        def spy(self, image, size, **kw):
            seen["hw"] = (size.height, size.width)
            return image

        from transformers.image_processing_backends import TorchvisionBackend
        orig = TorchvisionBackend.resize
        TorchvisionBackend.resize = spy
        try:
            from transformers.image_utils import SizeDict
            hf.resize(torch.zeros(1, n, 3, H, W), SizeDict(shortest_edge=V_MIN, longest_edge=V_MAX), None,
                      factor=32, temporal_factor=2, cap_pixels_per_frame=True)
        finally:
            TorchvisionBackend.resize = orig
        assert got == seen["hw"]
        return
    assert got == hf_smart_resize(n, H, W, temporal_factor=2, factor=32, min_pixels=V_MIN, max_pixels=hi)


@pytest.mark.parametrize("n, fps", [
    (50, 24.0),   # a 2 s clip at 24 fps: 4 frames (the minimum)
    (300, 30.0),  # 10 s at 30 fps: 20 frames at 2 fps
    (3, 30.0),    # fewer frames than the minimum: all of them
    (10, 4.0),    # rounding of the even spacing
])
def test_frame_sampling_matches_transformers(n, fps):
    s = _settings(fps=2.0)
    keep, times = s.sample(n, {"fps": fps, "do_sample_frames": True}, 2, "v")
    hf = Qwen3VLVideoProcessor()
    want = hf.sample_frames(VideoMetadata(total_num_frames=n, fps=fps), fps=2).tolist()
    assert keep == want
    assert times == Qwen3VLProcessor._calculate_timestamps(None, list(want), fps, 2)


@pytest.mark.parametrize("meta, n, idx, rate", [
    (None, 5, range(5), 2.0),                                   # frames sampled at mm fps: i / fps
    ({"fps": 30.0, "frames_indices": [0, 15, 30, 45]}, 4, [0, 15, 30, 45], 30.0),  # placed in the source
    ({"fps": 25.0}, 3, range(3), 25.0),                         # no indices: consecutive frames
])
def test_timestamps_match_transformers(meta, n, idx, rate):
    keep, times = _settings(fps=2.0).sample(n, meta, 2, "v")
    assert keep is None
    assert times == Qwen3VLProcessor._calculate_timestamps(None, list(idx), rate, 2)


def test_patches_match_transformers_patchify():
    v = frames(0, 3, 4, 6, patch=16)  # three frames, padded with the last to two groups
    proc = _proc()
    patches, grid, times = proc.video(Video(v), "v")
    x = torch.from_numpy(v).permute(0, 3, 1, 2)[None].float()
    want, gt, gh, gw = Qwen3VLVideoProcessor.patchify(None, x, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert grid == (gt, gh, gw) == (2, 4, 6)
    assert torch.equal(patches.float(), want[0])
    assert times == [0.25, 1.0]  # frames 0, 1 at 2 fps -> 0.25 s; frames 2, 2 (padded) -> 1 s
    ref = (want[0].double().view(len(want[0]), 3, -1) / 255 - 0.5) / 0.5
    torch.testing.assert_close(proc.finish_video(patches).double(), ref.view(len(ref), -1), atol=1e-6, rtol=0)


def _hf_text(text, videos, tok, model):
    """The prompt text transformers' Qwen3-VL processor writes: each video's <|video_pad|>
    replaced by its replace_video_token() text (called on a stand-in for the processor)."""
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                           video_token="<|video_pad|>",
                           _calculate_timestamps=lambda i, f, m: Qwen3VLProcessor._calculate_timestamps(None, i, f, m))
    grids = torch.tensor([g for g, _ in videos])
    metas = [m for _, m in videos]
    parts = text.split("<|video_pad|>")
    out = parts[0]
    for j, rest in enumerate(parts[1:]):
        out += Qwen3VLProcessor.replace_video_token(fake, {"video_grid_thw": grids, "video_metadata": metas}, j)
        out += rest
    return out


def _meta(fps, idx):
    idx = list(idx)
    return VideoMetadata(total_num_frames=len(idx), fps=fps, frames_indices=idx)


def _cases(seed):
    """(prompt, [(item, hf metadata or None)]) with videos with and without metadata."""
    a = frames(seed, 4, 4, 6, patch=16)
    b = frames(seed + 1, 3, 2, 10, patch=16)
    c = frames(seed + 2, 10, 4, 6, patch=16)
    img = frames(seed + 3, 1, 4, 4, patch=16)[0]
    m_b = {"fps": 30.0, "frames_indices": [3, 40, 77]}
    return [
        ({"prompt": f"what happens {VID} in it", "multi_modal_data": {"video": a}},
         [(Video(a), _meta(2.0, range(4)))]),
        ({"prompt": f"{IMG} then {VID} end", "multi_modal_data": {"image": img, "video": (b, m_b)}},
         [(img, None), (Video(b, m_b), _meta(30.0, [3, 40, 77]))]),
        ({"prompt": f"{VID} and {VID}", "multi_modal_data": {"video": [(c, {"fps": 4.0, "do_sample_frames": True}),
                                                                      a]}},
         [(Video(c[[0, 2, 4, 7, 9]], {"fps": 4.0, "frames_indices": [0, 2, 4, 7, 9]}),
           _meta(4.0, [0, 2, 4, 7, 9])),
          (Video(a), _meta(2.0, range(4)))]),
        ("plain text in the same batch", []),
    ]


def _hf_logits(model, score, ids, items, proc):
    kw = {}
    imgs = [x for x, _ in items if not isinstance(x, Video)]
    vids = [x for x, _ in items if isinstance(x, Video)]
    if imgs:
        out = [proc(a, "img") for a in imgs]
        kw.update(pixel_values=proc.finish(torch.cat([p for p, _ in out])),
                  image_grid_thw=torch.tensor([g for _, g in out]))
    if vids:
        out = [proc.video(v, "vid") for v in vids]
        kw.update(pixel_values_videos=proc.finish_video(torch.cat([p for p, _, _ in out])),
                  video_grid_thw=torch.tensor([g for _, g, _ in out]))
    t = torch.tensor([ids])
    kw["mm_token_type_ids"] = (t == model.config.image_token_id).int() + 2 * (t == model.config.video_token_id).int()
    with torch.no_grad():
        h = model.model(input_ids=t, **kw).last_hidden_state[0, -1]
    return h.float() @ score.t()


def test_videos_match_transformers(vl3):
    path, model, tok, score = vl3
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    cases = _cases(1)
    got = llm.classify([p for p, _ in cases], use_activation=False, use_tqdm=False)
    proc = _proc(tok)
    for i, ((p, items), out) in enumerate(zip(cases, got)):
        text = p if isinstance(p, str) else p["prompt"]
        videos = [(proc.video(x, "v")[1], m) for x, m in items if isinstance(x, Video)]
        # the token layout: timestamps, vision start/end around each patch group
        want_ids = tok(_hf_text(text, videos, tok, model))["input_ids"]
        for x, _ in items:  # images: one placeholder per image, expanded as transformers does
            if not isinstance(x, Video):
                at = want_ids.index(model.config.image_token_id)
                want_ids[at:at + 1] = [model.config.image_token_id] * proc.tokens(proc(x, "img")[1])
        assert out.prompt_token_ids == want_ids, f"prompt {i}"
        ref = _hf_logits(model, score, want_ids, items, proc)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), ref, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"prompt {i}: {m}")


def test_expanded_token_prompts_are_taken_as_they_are(vl3):
    # A token prompt transformers' processor wrote (timestamps and runs already there) runs
    # as given and scores as the same video given by placeholder.
    path, model, tok, _ = vl3
    llm = LLM(path, dtype="float32", kernel_backend="torch")
    v = frames(7, 4, 4, 6, patch=16)
    short = llm.classify([{"prompt": f"see {VID}", "multi_modal_data": {"video": v}}], use_tqdm=False)[0]
    ids = short.prompt_token_ids
    assert ids.count(model.config.video_token_id) == 12 and len(ids) > len(tok(f"see {VID}")["input_ids"]) + 12
    full = llm.classify([{"prompt_token_ids": ids, "multi_modal_data": {"video": v}}], use_tqdm=False)[0]
    assert full.prompt_token_ids == ids
    torch.testing.assert_close(torch.tensor(full.outputs.probs), torch.tensor(short.outputs.probs), atol=1e-6,
                               rtol=0)


def test_fps_sets_the_times_of_frames_without_metadata(vl3):
    path, model, tok, _ = vl3
    v = frames(2, 4, 4, 6, patch=16)
    p = {"prompt": f"x {VID}", "multi_modal_data": {"video": v}}
    ids = {fps: LLM(path, dtype="float32", kernel_backend="torch", mm_processor_kwargs={"fps": fps})
           .classify([p], use_tqdm=False)[0].prompt_token_ids for fps in (2.0, 1.0)}
    text = {fps: tok.decode(i) for fps, i in ids.items()}
    assert "<0.2 seconds>" in text[2.0] and "<1.2 seconds>" in text[2.0]  # (0 + 0.5) / 2, (1 + 1.5) / 2
    assert "<0.5 seconds>" in text[1.0] and "<2.5 seconds>" in text[1.0]


def test_video_results_do_not_depend_on_the_batch(vl3):
    llm = LLM(vl3[0], dtype="float32", kernel_backend="torch")
    assert_batch_invariant(llm, [p for p, _ in _cases(5)])


@pytest.mark.parametrize("video, match", [
    (lambda v: (v, {"fps": 0}), r"prompts\[0\]\['multi_modal_data'\]\['video'\]: video metadata needs fps"),
    (lambda v: (v, {"frames": 3, "fps": 2}), r"video metadata has \['frames'\]; known keys"),
    (lambda v: (v, {"fps": 2, "frames_indices": [0, 1]}), r"video 0: metadata frames_indices has 2 entries for 4"),
    (lambda v: (v, {"fps": 2, "frames_indices": [0.5, 1, 2, 3]}), r"frames_indices must be a list of non-negative"),
    (lambda v: (v, {"fps": 2, "do_sample_frames": True, "total_num_frames": 9}),
     r"total_num_frames=9 with do_sample_frames, but the video has 4 frames"),
    (lambda v: v[:1], r"video 0 has 1 frame\(s\); this model's videos need at least 2"),
])
def test_bad_video_inputs(vl3, video, match):
    llm = LLM(vl3[0], dtype="float32", kernel_backend="torch")
    v = frames(1, 4, 4, 6, patch=16)
    with pytest.raises(ValueError, match=match):
        llm.classify([{"prompt": f"x {VID}", "multi_modal_data": {"video": video(v)}}], use_tqdm=False)


def _write_video_config(path):
    with open(path / "video_preprocessor_config.json", "w") as f:
        json.dump({"size": {"shortest_edge": V_MIN, "longest_edge": V_MAX}, "image_mean": HALF, "image_std": HALF}, f)


def test_triton_kernels_in_the_interpreter(tmp_path):
    # The deepstack features and the timestamp text between patch groups on the Triton
    # kernels (q/k norm with rotary by table, varlen attention per group).
    save_vl(tmp_path, "3", width=128)
    _write_video_config(tmp_path)
    p = {"prompt": f"x {VID} y", "multi_modal_data": {"video": frames(11, 4, 2, 4, patch=16)}}
    got, ref = (LLM(str(tmp_path), dtype="float32", kernel_backend=b).classify([p], use_activation=False,
                                                                              use_tqdm=False)[0]
                for b in ("triton", "torch"))
    torch.testing.assert_close(torch.tensor(got.outputs.probs), torch.tensor(ref.outputs.probs), atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_bf16_video_on_gpu(tmp_path):
    """bf16 on the default kernels (head_dim 64) against fp32 on CPU: DESIGN's bf16 bar."""
    save_vl(tmp_path, "3", width=128)
    _write_video_config(tmp_path)
    prompts = [p for p, _ in _cases(7)] * 2
    got = LLM(str(tmp_path), dtype="bfloat16", device="cuda").classify(prompts, use_tqdm=False)
    ref = LLM(str(tmp_path), dtype="float32", kernel_backend="torch").classify(prompts, use_tqdm=False)
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in got]),
                               torch.tensor([o.outputs.probs for o in ref]), atol=2e-2, rtol=0)
