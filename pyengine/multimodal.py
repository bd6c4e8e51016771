"""Images and videos for vision-language classifiers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL):
preprocessing, the placeholder tokens, and the 3-D rotary positions of a prompt.

A prompt with images is ``{"prompt": str | "prompt_token_ids": [...], "multi_modal_data":
{"image": img | [img, ...]}}`` as in vLLM. Its text holds one ``<|image_pad|>`` per image
(inside ``<|vision_start|> ... <|vision_end|>``); each is expanded to the image's
``t * h * w / merge**2`` tokens, whose embeddings the vision tower's output replaces. A
token prompt may also come already expanded (as transformers' processor writes it).

Videos: ``{"video": frames | [frames, ...]}`` with one ``<|video_pad|>`` per video, frames
a uint8 array (T, H, W[, 3 or 4]) or a list of frames (PIL images or arrays), already
sampled: every frame is used (Qwen3-VL may sample, below). As transformers' video
processor does: every frame resized alike within the video pixel bounds, the count padded
to a multiple of ``temporal_patch_size`` with the last frame, and each patch spanning
``temporal_patch_size`` frames. Positions: a video's temporal axis steps by 1 per patch
group (Qwen2-VL) or by ``tokens_per_second * temporal_patch_size / fps`` (Qwen2.5-VL;
``fps`` 2 unless ``mm_processor_kwargs`` sets the rate the frames were sampled at), and
the text after it starts one past the largest position it took, as the models were
trained (transformers 5's ``get_rope_index`` starts it one past the spatial extent only).

Qwen3-VL's videos (:class:`VideoSettings` ``timestamps``): each patch group's tokens
written after a ``<{t:.1f} seconds>`` text between ``<|vision_start|>`` and
``<|vision_end|>``, positioned as an image each; frames sampled at ``fps``, or
``(frames, metadata)`` as vLLM's video loader gives them (times from the source's fps
and frame indices; ``do_sample_frames`` samples here, as transformers does); one pixel
budget for the whole video.

Features computed beforehand (vLLM's embedding inputs): ``{"image": {"image_embeds":
(tokens, width), "image_grid_thw": (items, 3)}}`` (``video_`` alike) stand for their items
(:class:`Embeds`); the grids fix the token counts and positions, the tower skips them.

An image is a PIL image, or a uint8 array (numpy or torch) of shape (H, W), (H, W, 3) or
(H, W, 4) (RGBA: composited over white, as transformers' and vLLM's loaders do). Preprocessing follows the
checkpoint's ``preprocessor_config.json``: a resize to multiples of ``patch * merge``
within [min_pixels, max_pixels] (PIL's bicubic filter; a value may differ from PIL's by
one level of 255) and uint8 patches of ``C * patch**2`` values in the vision tower's
order; once on the device, :meth:`ImageProcessor.finish` rescales and normalises them and
repeats each over ``temporal_patch_size``. Every image processor (also
pyengine.image_tiles') has that interface: ``prompt(ids, images, where)``, ``finish``,
``placeholder_text``, ``prepare_text``, ``image_token_id``.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

# OpenAI CLIP's statistics, the Qwen2-VL processor's defaults.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)  # Qwen3-VL's processors' mean and std


def smart_resize(height, width, factor, min_pixels, max_pixels, where="an image"):
    """(h, w) multiples of ``factor`` with h * w in [min_pixels, max_pixels], the aspect
    ratio kept as closely as possible (the Qwen2-VL processor's rule, as transformers has
    it: a side that rounds to 0 sends the image to the min_pixels branch, which scales both
    sides up, rather than being raised to one factor on its own)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"{where} is {height}x{width}: its aspect ratio is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def checkpoint_json(path, name):
    """The dict in ``path/name``, or {} where there is no such file (or no path)."""
    f = os.path.join(os.fspath(path), name) if path is not None else None
    if f is None or not os.path.isfile(f):
        return {}
    with open(f) as fh:
        return json.load(fh)


def _is_pil(x):
    return hasattr(x, "convert") and hasattr(x, "size") and not hasattr(x, "shape")


def _rgb(img, where):
    """(3, H, W) uint8 from a PIL image or a uint8 array."""
    if _is_pil(img):
        # Transparency kept where the image has it in any form (an alpha band, or a
        # palette's or an RGB PNG's transparent colour), to be composited over white below.
        alpha = "A" in img.getbands() or img.info.get("transparency") is not None
        try:
            img = np.array(img.convert("RGBA" if alpha else "RGB"))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors on a cut or corrupt file
            raise ValueError(f"{where}: cannot read the image: {e}") from None
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(np.array(img))  # a copy: arrays may be read-only
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{where} must be a PIL image or a uint8 array, got {type(img).__name__}")
    if img.dtype != torch.uint8:
        raise TypeError(f"{where} is a {img.dtype} array; images are uint8 arrays (H, W[, 3 or 4]) or PIL images")
    if img.ndim == 2:
        img = img[:, :, None].expand(-1, -1, 3)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"{where} has shape {tuple(img.shape)}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if min(img.shape[:2]) < 1:
        raise ValueError(f"{where} is empty ({tuple(img.shape)})")
    if img.shape[2] == 4:
        # Transparent pixels over white, as transformers' and vLLM's RGB conversion.
        a = img[:, :, 3:].int()
        img = ((img[:, :, :3].int() * a + 255 * (255 - a) + 127) // 255).to(torch.uint8)
    return img.permute(2, 0, 1)


def _placeholder(tokenizer, ids, what):
    """The text of the token ids ``ids``, checked to encode back to them."""
    text = "".join(tokenizer.convert_ids_to_tokens(ids))
    if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
        raise ValueError(f"the tokenizer does not encode the {what} placeholder {text!r} as the token ids {ids}")
    return text


class ImageProcessor:
    """Images -> vision-tower patches for one checkpoint.

    image_token_id: the placeholder token; patch_size, temporal_patch_size, merge_size:
    the vision tower's; min_pixels, max_pixels, mean, std, rescale, do_resize, do_rescale,
    do_normalize: the checkpoint's preprocessor settings."""

    def __init__(self, image_token_id, patch_size=14, temporal_patch_size=2, merge_size=2,
                 min_pixels=56 * 56, max_pixels=28 * 28 * 1280, mean=_MEAN, std=_STD, rescale=1 / 255,
                 do_resize=True, do_rescale=True, do_normalize=True, video_token_id=None,
                 vision_start_token_id=None, vision_end_token_id=None, video=None, tokenizer=None,
                 embed_width=None):
        """video: None (videos refused), or a :class:`VideoSettings`; tokenizer: what encodes
        Qwen3-VL's video timestamps; embed_width: the width of features given in place of
        pixels (the language model's hidden size, times 1 + deepstack levels; None: refused)."""
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} is greater than max_pixels={max_pixels}")
        self.image_token_id, self.video_token_id = int(image_token_id), video_token_id
        self.patch, self.tp, self.merge = int(patch_size), int(temporal_patch_size), int(merge_size)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.rescale = float(rescale)
        self._on = {}  # device -> (mean, std) there
        self.do_resize, self.do_rescale, self.do_normalize = do_resize, do_rescale, do_normalize
        # What stands for one image in a text: <|vision_start|><|image_pad|><|vision_end|>.
        self.placeholder_ids = [int(t) for t in (vision_start_token_id, image_token_id, vision_end_token_id)
                                if t is not None]
        self.video_settings = video
        # Qwen3-VL's videos: each patch group's tokens between these, after its timestamp
        # text, which this tokenizer encodes (set by from_checkpoint).
        self.vision_start_token_id, self.vision_end_token_id = vision_start_token_id, vision_end_token_id
        self.tokenizer, self._stamps = tokenizer, {}
        self.embed_width = embed_width
        # Rows of the model's rotary table (set by the engine): a prompt whose 3-D positions
        # reach past it (a long video's time steps) is an error before any work.
        self.max_position = None

    # Settings a user may set for the whole engine (vLLM's LLM(mm_processor_kwargs=...)),
    # e.g. the pixel bounds a checkpoint's own scoring code uses in place of its saved ones;
    # "size": {"shortest_edge", "longest_edge"} is transformers 5's name for the same bounds.
    OVERRIDES = ("min_pixels", "max_pixels", "size", "fps")

    @classmethod
    def from_checkpoint(cls, path, config, vision_config, overrides=None, tokenizer=None):
        """Settings from ``path/preprocessor_config.json`` where there is one (else the
        Qwen2-VL defaults), then ``overrides`` (a dict of :attr:`OVERRIDES`); the patch
        geometry must agree with the vision config."""
        overrides = dict(overrides or {})
        bad = sorted(str(k) for k in overrides if k not in cls.OVERRIDES)
        if bad:
            raise ValueError(f"mm_processor_kwargs: {bad} cannot be set; supported: {list(cls.OVERRIDES)}")
        size = overrides.pop("size", None)
        if size is not None:
            if not isinstance(size, dict) or not size or set(size) - {"shortest_edge", "longest_edge"}:
                raise ValueError(f"mm_processor_kwargs: size must be a dict of shortest_edge and/or longest_edge "
                                 f"(pixel counts), got {size!r}")
            for k, name in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
                if k in size:
                    if name in overrides:
                        raise ValueError(f"mm_processor_kwargs: give {name} or size.{k}, not both")
                    overrides[name] = size[k]
        fps = overrides.pop("fps", None)
        if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool)
                                or not 0 < fps < float("inf")):
            raise ValueError(f"mm_processor_kwargs: fps (the rate the video frames were sampled at) must be a "
                             f"positive number, got {fps!r}")
        for k, v in overrides.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"mm_processor_kwargs: {k} must be a positive int, got {v!r}")
        pre = checkpoint_json(path, "preprocessor_config.json")
        size = pre.get("size") or {}
        qwen3 = str(getattr(config, "model_type", "")).startswith("qwen3")
        hidden = getattr(getattr(config, "text_config", None), "hidden_size", None) or config.hidden_size
        deep = (getattr(vision_config, "deepstack_visual_indexes", None) or []) if qwen3 else []
        geom = {"patch_size": vision_config.patch_size, "temporal_patch_size": vision_config.temporal_patch_size,
                "merge_size": vision_config.spatial_merge_size}
        for k, v in geom.items():
            if k in pre and int(pre[k]) != int(v):
                raise ValueError(f"preprocessor_config.json has {k}={pre[k]} but the vision tower's is {v}")
        return cls(config.image_token_id, **geom,
                   min_pixels=overrides.get("min_pixels", pre.get("min_pixels", size.get("shortest_edge", 56 * 56))),
                   max_pixels=overrides.get("max_pixels",
                                            pre.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
                   mean=pre.get("image_mean", _HALF if qwen3 else _MEAN),
                   std=pre.get("image_std", _HALF if qwen3 else _STD), rescale=pre.get("rescale_factor", 1 / 255),
                   do_resize=pre.get("do_resize", True),
                   do_rescale=pre.get("do_rescale", True), do_normalize=pre.get("do_normalize", True),
                   video_token_id=getattr(config, "video_token_id", None),
                   vision_start_token_id=getattr(config, "vision_start_token_id", None),
                   vision_end_token_id=getattr(config, "vision_end_token_id", None),
                   video=VideoSettings.from_checkpoint(path, config, vision_config, overrides, fps),
                   tokenizer=tokenizer, embed_width=hidden * (1 + len(deep)))

    def _resized(self, x, where, bounds):
        """(..., C, H, W) uint8 -> the same resized to multiples of patch * merge: by
        :func:`smart_resize` within bounds (min_pixels, max_pixels), or to the (h, w) a
        callable bounds(H, W) gives."""
        H, W = x.shape[-2:]
        factor = self.patch * self.merge
        if self.do_resize:
            h, w = bounds(H, W) if callable(bounds) else smart_resize(H, W, factor, *bounds, where=where)
            if (h, w) != (H, W):
                # torch's uint8 antialiased bicubic: PIL's filter in the same fixed-point
                # steps (8-bit between the two passes) and the op transformers' video
                # processor runs. It agrees with PIL to one level where both resize the
                # same axis first; PIL starts with the axis that shrinks more, which moves
                # some shapes' pixels by up to ~20 levels of 255.
                lead = x.shape[:-3]
                x = F.interpolate(x.reshape(-1, *x.shape[-3:]).contiguous(), size=(h, w), mode="bicubic",
                                  antialias=True, align_corners=False).reshape(*lead, -1, h, w)
        elif H % factor or W % factor:
            raise ValueError(f"{where} is {H}x{W}, not a multiple of {factor}, and do_resize is off")
        return x

    def __call__(self, img, where):
        """One image -> (patches (h*w, C*p*p) uint8, (t, h, w) grid of patches), in the
        vision tower's order; :meth:`finish` turns them into its input on the device."""
        x = self._resized(_rgb(img, where), where, (self.min_pixels, self.max_pixels))
        C, h, w = x.shape
        gh, gw, m, p = h // self.patch, w // self.patch, self.merge, self.patch
        # Patches in merge-block order (each m x m block of patches is one LLM token),
        # each flattened as (C, p, p); still uint8, a quarter of fp32's bytes to copy,
        # and not yet repeated over time.
        x = x.reshape(C, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        return x.reshape(gh * gw, C * p * p), (1, gh, gw)

    def video(self, video, where):
        """One video -> (patches (t*h*w, C*tp*p*p) uint8, (t, h, w) grid, times): patches in
        the vision tower's order (:meth:`finish_video` turns them into its input on the
        device); times None, or (Qwen3-VL) the seconds each patch group stands for."""
        vs = self.video_settings  # None never gets here: expand() refuses videos then
        x = _frames(video.frames, where)
        keep, times = vs.sample(len(x), video.metadata, self.tp, where)
        if keep is not None:
            x = x[keep]
        if vs.timestamps:  # Qwen3-VL: one pixel budget for the whole video
            n = len(x)
            x = self._resized(x, where, lambda H, W: vs.frames_size(n, H, W, self.patch * self.merge, self.tp, where))
        else:
            x = self._resized(x, where, (vs.min_pixels, vs.max_pixels))
        if pad := -x.shape[0] % self.tp:  # the last frame repeated, as transformers pads
            x = torch.cat((x, x[-1:].expand(pad, -1, -1, -1)))
        T, C, h, w = x.shape
        gt, gh, gw, m, p, tp = T // self.tp, h // self.patch, w // self.patch, self.merge, self.patch, self.tp
        # (group, block row, block col, row in block, col in block) x (C, frame in group, p, p)
        x = x.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, C * tp * p * p), (gt, gh, gw), times

    def timestamp_ids(self, seconds):
        """The token ids of Qwen3-VL's "<{seconds:.1f} seconds>" before a patch group's tokens."""
        text = f"<{seconds:.1f} seconds>"
        if text not in self._stamps:
            if self.tokenizer is None:
                raise ValueError("this image processor has no tokenizer for the video timestamps")
            self._stamps[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._stamps[text]

    def t_interval(self, kind):
        """The temporal position step between a media item's patch groups (IMAGE or VIDEO)."""
        return self.video_settings.interval if kind == VIDEO else 1.0

    def finish(self, patches):
        """uint8 patches (N, C*p*p), on the device -> the tower's input (N, C*tp*p*p) fp32:
        rescaled, normalised per channel, the still image repeated over time."""
        N = patches.shape[0]
        x = self._normalised(patches, self.mean, self.std, self.do_rescale, self.do_normalize)
        return x[:, :, None].expand(-1, -1, self.tp, -1).reshape(N, -1)

    def finish_video(self, patches):
        """uint8 video patches (N, C*tp*p*p), on the device -> the tower's input, fp32."""
        vs = self.video_settings
        return self._normalised(patches, vs.mean, vs.std, vs.do_rescale, vs.do_normalize).reshape(patches.shape[0], -1)

    def _normalised(self, patches, mean, std, do_rescale, do_normalize):
        """(N, C*k) uint8 -> (N, C, k) fp32, rescaled and normalised per channel: x * scale +
        shift in one pass over the uint8 values (scale = rescale / std, shift = -mean / std),
        instead of a pass for the conversion and one per step (0.42 -> 0.23 s on 32 videos'
        24M values, 2 CPU cores)."""
        scale, shift = self._affine(patches.device, mean, std, do_rescale, do_normalize)
        return torch.addcmul(shift, patches.view(patches.shape[0], mean.shape[0], -1), scale)

    def _affine(self, device, mean, std, do_rescale, do_normalize):
        """(scale, shift) as (1, C, 1) fp32 on ``device``, made there once (a copy per
        batch from pageable memory would stall the host)."""
        key = (str(device), id(mean), do_rescale, do_normalize)
        if key not in self._on:
            mean, std = mean.reshape(-1), std.reshape(-1)
            C = mean.shape[0]
            scale = torch.full((C,), self.rescale if do_rescale else 1.0, dtype=torch.float32)
            shift = torch.zeros(C)
            if do_normalize:
                scale, shift = scale / std, -mean / std
            self._on[key] = (scale.view(1, C, 1).to(device), shift.view(1, C, 1).to(device))
        return self._on[key]

    def tokens(self, grid):
        t, h, w = grid
        return t * h * w // self.merge ** 2

    def placeholder_text(self, tokenizer):
        """The text that stands for one image: <|vision_start|><|image_pad|><|vision_end|>."""
        return _placeholder(tokenizer, self.placeholder_ids, "image")

    def video_placeholder_text(self, tokenizer):
        """The text that stands for one video, <|vision_start|><|video_pad|><|vision_end|>,
        or None where the model takes no videos."""
        ids = [self.vision_start_token_id, self.video_token_id, self.vision_end_token_id]
        if self.video_settings is None or any(t is None for t in ids):
            return None
        return _placeholder(tokenizer, ids, "video")

    def prepare_text(self, text):
        return text

    def check(self, ids, items, where):
        """The checks of :meth:`prompt` that read no pixels."""
        check_items(ids, items, self, where)

    def prompt(self, ids, items, where):
        """Token ids with each image's and video's placeholder expanded -> (token ids, MMData)."""
        tokens, mm = expand(ids, items, self, where)
        intervals = [self.t_interval(k) for k in mm.kinds or [IMAGE] * len(mm.grids)]
        mm.rope_positions = rope_positions(tokens, mm.grids, self.image_token_id, self.merge, intervals,
                                           self.video_token_id)
        if self.max_position is not None and len(tokens):
            top = int(mm.rope_positions.max())
            if top >= self.max_position:
                raise ValueError(f"{where} takes rotary positions up to {top}, past the model's {self.max_position} "
                                 "(a video's positions step with its time: fewer frames, or frames sampled at a "
                                 "higher fps)")
        return tokens, mm


IMAGE, VIDEO = 0, 1


class VideoSettings:
    """A checkpoint's video preprocessing: pixel bounds, statistics, the temporal
    position step ``interval`` (1 for Qwen2-VL; tokens_per_second * temporal_patch_size /
    fps for Qwen2.5-VL), and for Qwen3-VL (``timestamps``) its frame sampling (``fps``,
    ``min_frames``, ``max_frames``), its per-video pixel budget and its per-frame cap."""

    def __init__(self, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768, mean=_MEAN, std=_STD,
                 do_rescale=True, do_normalize=True, interval=1.0, timestamps=False, fps=2.0, min_frames=4,
                 max_frames=768, cap_pixels_per_frame=False, max_video_tokens=768):
        if min_pixels > max_pixels:
            raise ValueError(f"video min_pixels={min_pixels} is greater than max_pixels={max_pixels}")
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.do_rescale, self.do_normalize, self.interval = do_rescale, do_normalize, float(interval)
        self.timestamps, self.fps = bool(timestamps), float(fps)
        self.min_frames, self.max_frames = int(min_frames), int(max_frames)
        self.cap, self.max_video_tokens = bool(cap_pixels_per_frame), int(max_video_tokens)

    @classmethod
    def from_checkpoint(cls, path, config, vision_config, overrides, fps):
        """None where the model takes no videos; else the settings from the video
        processor's saved config, found as transformers finds it (processor_config.json's
        "video_processor", video_preprocessor_config.json, preprocessor_config.json), with
        min_pixels / max_pixels from ``overrides`` (they apply to images and videos alike)
        and ``fps`` (None: 2, or for Qwen3-VL the saved one)."""
        if getattr(config, "video_token_id", None) is None:
            return None
        pre = checkpoint_json(path, "processor_config.json").get("video_processor") or \
            checkpoint_json(path, "video_preprocessor_config.json") or checkpoint_json(path, "preprocessor_config.json")
        size = pre.get("size") or {}
        qwen3 = str(getattr(config, "model_type", "")).startswith("qwen3")
        lo, hi = (128 * 32 * 32, 32 * 32 * 768) if qwen3 else (128 * 28 * 28, 28 * 28 * 768)
        kw = dict(min_pixels=overrides.get("min_pixels", pre.get("min_pixels", size.get("shortest_edge", lo))),
                  max_pixels=overrides.get("max_pixels", pre.get("max_pixels", size.get("longest_edge", hi))),
                  mean=pre.get("image_mean", _HALF if qwen3 else _MEAN),
                  std=pre.get("image_std", _HALF if qwen3 else _STD),
                  do_rescale=pre.get("do_rescale", True), do_normalize=pre.get("do_normalize", True))
        if qwen3:
            fps = float(pre.get("fps") or 2.0) if fps is None else fps
            return cls(**kw, timestamps=True, fps=fps, min_frames=pre.get("min_frames", 4),
                       max_frames=pre.get("max_frames", 768),
                       cap_pixels_per_frame=bool(pre.get("cap_pixels_per_frame")),
                       max_video_tokens=pre.get("max_video_tokens", 768))
        tps = getattr(vision_config, "tokens_per_second", None)
        fps = 2.0 if fps is None else fps  # the rate the frames were sampled at
        return cls(**kw, interval=1.0 if tps is None else tps * vision_config.temporal_patch_size / fps)

    def sample(self, n, meta, tp, where):
        """Qwen3-VL's frame choice and times for a video of ``n`` frames -> (indices of the
        frames to keep (None: all), the seconds each group of ``tp`` frames stands for: the
        mean of its first and last frame's time); (None, None) for the other models.

        Without metadata the frames were sampled at ``fps``. With it, ``metadata["fps"]``
        is the source video's rate and ``frames_indices`` (default 0..n-1) place the frames
        in it; with ``do_sample_frames`` the frames are the whole video, sampled here at
        ``fps`` (at least ``min_frames``, at most ``max_frames``) as transformers' Qwen3-VL
        video processor samples them."""
        if not self.timestamps:
            return None, None
        keep = None
        if meta is None:
            idx, rate = list(range(n)), self.fps
        else:
            rate = meta["fps"]
            if meta.get("do_sample_frames"):
                total = meta.get("total_num_frames", n)
                if total != n:
                    raise ValueError(f"{where}: metadata total_num_frames={total} with do_sample_frames, but the "
                                     f"video has {n} frames")
                num = min(max(int(n / rate * self.fps), self.min_frames), self.max_frames, n)
                keep = idx = np.linspace(0, n - 1, num).round().astype(int).tolist()
            else:
                idx = [int(i) for i in meta.get("frames_indices", range(n))]
                if len(idx) != n:
                    raise ValueError(f"{where}: metadata frames_indices has {len(idx)} entries for {n} frames")
        if len(idx) < tp:
            raise ValueError(f"{where} has {len(idx)} frame(s); this model's videos need at least {tp}")
        idx = idx + [idx[-1]] * (-len(idx) % tp)
        secs = [i / rate for i in idx]
        return keep, [(secs[i] + secs[i + tp - 1]) / 2 for i in range(0, len(secs), tp)]

    def frames_size(self, n, H, W, factor, tp, where="a video"):
        """Qwen3-VL: the (h, w), multiples of ``factor``, of a video's ``n`` frames of H x W:
        its rounded frame count times h * w within [min_pixels, max_pixels] (with the
        per-frame cap where the checkpoint sets ``cap_pixels_per_frame``)."""
        hi = self.max_pixels
        if self.cap:
            per = max(min(self.max_video_tokens * factor * factor, self.max_pixels // n), int(self.min_pixels * 1.05))
            hi = per * n
        if H < factor or W < factor:
            s = max(factor / H, factor / W)
            H, W = int(H * s), int(W * s)
        if max(H, W) / min(H, W) > 200:
            raise ValueError(f"{where} has {H}x{W} frames: their aspect ratio is over 200")
        h, w, t = round(H / factor) * factor, round(W / factor) * factor, round(n / tp) * tp
        if t * h * w > hi:
            beta = math.sqrt(n * H * W / hi)
            h = max(factor, math.floor(H / beta / factor) * factor)
            w = max(factor, math.floor(W / beta / factor) * factor)
        elif t * h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (n * H * W))
            h, w = math.ceil(H * beta / factor) * factor, math.ceil(W * beta / factor) * factor
        return h, w


# What video metadata (vLLM's and transformers' VideoMetadata) may hold.
_META = ("fps", "frames_indices", "total_num_frames", "duration", "video_backend", "do_sample_frames", "height",
         "width")


class Video:
    """A video of a prompt, as given: ``frames`` a uint8 array (T, H, W[, C]) or a list of
    frames; ``metadata`` None or a dict of :data:`_META` keys (checked here)."""

    __slots__ = ("frames", "metadata")

    def __init__(self, frames, metadata=None, where="video"):
        self.frames, self.metadata = frames, metadata
        if metadata is None:
            return
        bad = sorted(str(k) for k in metadata if k not in _META)
        if bad:
            raise ValueError(f"{where}: video metadata has {bad}; known keys: {list(_META)}")
        fps = metadata.get("fps")
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps < float("inf"):
            raise ValueError(f"{where}: video metadata needs fps, the source video's frame rate (a positive "
                             f"number), got {fps!r}")
        idx = metadata.get("frames_indices")
        if idx is not None:
            idx = np.asarray(idx)
            if idx.ndim != 1 or idx.dtype.kind not in "iu" or (idx < 0).any():
                raise ValueError(f"{where}: video metadata frames_indices must be a list of non-negative ints")


class Embeds:
    """Images' or videos' features computed beforehand (vLLM's embedding inputs): ``kind``
    IMAGE or VIDEO, ``rows`` (tokens, width) float tensor, ``grids`` [(t, h, w)] patch
    grids, which fix each item's token count and positions; ``where`` names it in errors."""

    __slots__ = ("kind", "rows", "grids", "where", "per_item")

    def __init__(self, kind, rows, grids, where, per_item=None):
        """per_item: the token count of every item, where the rows came as (items, tokens, width)."""
        self.kind, self.rows, self.grids, self.where, self.per_item = kind, rows, grids, where, per_item

    def split(self, merge, width):
        """-> one Embeds per grid, its rows cut by t * h * w / merge**2 tokens; the row
        count and ``width`` (the language model's, times 1 + deepstack levels) checked."""
        what = "image" if self.kind == IMAGE else "video"
        counts = [t * h * w // merge ** 2 for t, h, w in self.grids]
        bad = next((g for g in self.grids if g[1] % merge or g[2] % merge), None)
        if bad is not None:
            raise ValueError(f"{self.where}: grid {bad} is not a multiple of the merge size {merge}")
        if self.per_item is not None and any(n != self.per_item for n in counts):
            raise ValueError(f"{self.where}: {what}_embeds has {self.per_item} tokens per item; its grids "
                             f"{[list(g) for g in self.grids]} need {counts}")
        if self.rows.shape[0] != sum(counts) or self.rows.shape[1] != width:
            raise ValueError(f"{self.where}: {what}_embeds is {tuple(self.rows.shape)}; its grids "
                             f"{[list(g) for g in self.grids]} need ({sum(counts)}, {width})")
        rows = self.rows.split(counts)
        return [Embeds(self.kind, r, [g], f"{self.where} item {j}") for j, (r, g) in enumerate(zip(rows, self.grids))]


def _embeds(v, kind, where):
    """A ``{"image_embeds", "image_grid_thw"}`` (or ``video_``) dict -> an :class:`Embeds`."""
    what = "image" if kind == IMAGE else "video"
    keys = {f"{what}_embeds", f"{what}_grid_thw"}
    if set(v) != keys:
        raise ValueError(f"{where}: embedding inputs are a dict of exactly {sorted(keys)}, got {sorted(map(str, v))}")
    rows, grid = v[f"{what}_embeds"], v[f"{what}_grid_thw"]
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point() or rows.ndim not in (2, 3):
        raise ValueError(f"{where}: {what}_embeds must be a float tensor (tokens, width) or (items, tokens, width), "
                         f"got {getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
    try:
        grid = torch.as_tensor(grid)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: {what}_grid_thw must be positive ints (items, 3), got {grid!r:.60}: {e}") from None
    if grid.ndim == 1:
        grid = grid[None]
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.is_floating_point() or (grid < 1).any():
        raise ValueError(f"{where}: {what}_grid_thw must be positive ints (items, 3), got {tuple(grid.shape)}")
    finite = torch.isfinite(rows)
    if not bool(finite.all()):
        bad = int(finite.logical_not().reshape(-1, rows.shape[-1]).any(-1).nonzero()[0, 0])
        raise ValueError(f"{where}: {what}_embeds holds NaN or infinity (row {bad} of its tokens)")
    per_item = None
    if rows.ndim == 3:
        if rows.shape[0] != grid.shape[0]:
            raise ValueError(f"{where}: {rows.shape[0]} {what}_embeds items for {grid.shape[0]} grids")
        per_item = rows.shape[1]
        rows = rows.reshape(-1, rows.shape[-1])
    return Embeds(kind, rows.detach().cpu(), [tuple(int(x) for x in g) for g in grid], where, per_item)


class MMData:
    """One prompt's images and videos: pixel_values (N, ...) uint8 of its images (as the processor leaves them, or
    None), video_values (N, ...) uint8 of its videos (or None), grids (per image and video in token order: (t, h, w)
    patches, or a tile count), kinds (IMAGE or VIDEO per grid; None: images only), rope_positions (3, L) int64,
    the (temporal, height, width) rotary position of each token (None: the model's own positions), and embeds
    (per grid: None, or the features given for it (tokens, width); None: all from pixels)."""

    __slots__ = ("pixel_values", "grids", "rope_positions", "video_values", "kinds", "embeds")

    def __init__(self, pixel_values, grids, rope_positions, video_values=None, kinds=None, embeds=None):
        self.pixel_values, self.grids, self.rope_positions = pixel_values, grids, rope_positions
        self.video_values, self.kinds, self.embeds = video_values, kinds, embeds


def _is_frame(x):
    return _is_pil(x) or getattr(x, "ndim", 0) in (2, 3)


def _with_meta(v):
    """Whether ``v`` is a (frames, metadata) pair."""
    return isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], dict)


def media_list(data, where):
    """The images and videos of a ``multi_modal_data`` dict, as one non-empty list:
    images as given, each video wrapped in a :class:`Video`. A video is a (T, H, W[, C])
    array or a list of frames, or a (frames, metadata dict) pair as vLLM's video loader
    gives them; ``"video"`` holds one video or a list of them."""
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a dict such as {{'image': img}}, got {type(data).__name__}")
    other = sorted(str(k) for k in data if k not in ("image", "video"))
    if other:
        raise ValueError(f"{where} has {other}: only 'image' and 'video' are supported")
    if "image" not in data and "video" not in data:
        raise ValueError(f"{where} has no 'image' or 'video'")
    out = []
    if "image" in data:
        imgs = data["image"]
        if isinstance(imgs, dict):
            out.append(_embeds(imgs, IMAGE, f"{where}['image']"))
        else:
            imgs = list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
            if not imgs:
                raise ValueError(f"{where}['image'] is an empty list")
            out += imgs
    if "video" in data and isinstance(data["video"], dict):
        out.append(_embeds(data["video"], VIDEO, f"{where}['video']"))
    elif "video" in data:
        v = data["video"]
        one = getattr(v, "ndim", None) is not None or _with_meta(v) or (
            isinstance(v, (list, tuple)) and v and _is_frame(v[0]))
        videos = [v] if one else list(v) if isinstance(v, (list, tuple)) else [v]
        if not videos:
            raise ValueError(f"{where}['video'] is an empty list")
        for j, x in enumerate(videos):
            at = f"{where}['video']" + ("" if one else f"[{j}]")
            out.append(Video(*x, where=at) if _with_meta(x) else Video(x))
    return out


def _frames(frames, where):
    """(T, C, H, W) uint8 from a (T, H, W[, C]) uint8 array or a list of frames of one size.
    A 3-D array whose last size is 3 or 4 is one (H, W, C) frame, as transformers reads it
    (frames 3 or 4 pixels wide are no video); other 3-D arrays are T grey frames."""
    if getattr(frames, "ndim", None) is not None:
        if frames.ndim not in (3, 4):
            raise ValueError(f"{where} has shape {tuple(frames.shape)}; a video is (T, H, W[, 3 or 4]) frames")
        frames = [frames] if frames.ndim == 3 and frames.shape[-1] in (3, 4) else list(frames)
    if not isinstance(frames, (list, tuple)) or not frames:
        raise TypeError(f"{where} must be a uint8 array (T, H, W[, 3 or 4]) or a non-empty list of frames, "
                        f"got {type(frames).__name__}")
    out = [_rgb(f, f"{where} frame {i}") for i, f in enumerate(frames)]
    bad = next((i for i, f in enumerate(out) if f.shape != out[0].shape), None)
    if bad is not None:
        raise ValueError(f"{where} frame {bad} is {tuple(out[bad].shape[1:])}, frame 0 {tuple(out[0].shape[1:])}; "
                         "a video's frames must share one size")
    return torch.stack(out)


def _data_url(url, where, what, form):
    """(head, payload) of a data URL; other URLs are refused: nothing here fetches from
    the network or reads files. what: "image" / "video"; form: an example for messages."""
    if not isinstance(url, str):
        raise TypeError(f"{where}: {'an' if what == 'image' else 'a'} {what} URL must be a string, "
                        f"got {type(url).__name__}")
    if not url.startswith("data:"):
        raise ValueError(f"{where}: {what}s are not fetched from URLs or files; send the {what} as a data URL "
                         f"({form})")
    head, _, data = url.partition(",")
    return head, data


def image_from_data_url(url, where):
    """A base64 data URL (``data:image/png;base64,...``) decoded into a PIL image."""
    head, data = _data_url(url, where, "image", "data:image/png;base64,...")
    if not head.endswith(";base64") or not data:
        raise ValueError(f"{where}: a data URL must be base64 (data:image/...;base64,...)")
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("decoding images needs pillow (pip install pillow)") from None
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: the data URL is not valid base64: {e}") from None
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except Exception as e:  # noqa: BLE001 - any undecodable payload is the caller's
        raise ValueError(f"{where}: cannot decode the image: {type(e).__name__}: {e}") from None
    return img


def video_from_data_url(url, where):
    """A video sent as JPEG frames, ``data:video/jpeg;base64,<frame>,<frame>,...`` (each
    frame base64 on its own, as vLLM's video loader takes them) -> a list of PIL images.
    Other video types are refused: there is no video decoder here."""
    head, data = _data_url(url, where, "video", "data:video/jpeg;base64,<frame>,<frame>,...")
    if head.lower() != "data:video/jpeg;base64" or not data:
        raise ValueError(f"{where}: a video is taken as JPEG frames, data:video/jpeg;base64,<frame>,<frame>,... "
                         f"(there is no video decoder here), got {head[:40]!r}")
    return [image_from_data_url("data:image/jpeg;base64," + f, f"{where} frame {i}")
            for i, f in enumerate(data.split(","))]


def _kind(x):
    return x.kind if isinstance(x, Embeds) else VIDEO if isinstance(x, Video) else IMAGE


def _check_pixels(x, where):
    """Raise the error :func:`_rgb` gives for an array image it refuses (dtype, shape, size),
    without converting a good one; PIL images are read later."""
    if _is_pil(x):
        return
    if isinstance(x, (np.ndarray, torch.Tensor)) and x.dtype in (np.uint8, torch.uint8) and (
            x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (3, 4))) and min(x.shape[:2]) >= 1:
        return
    _rgb(x, where)


def _check_video(v, where):
    """As :func:`_check_pixels`, for each frame of a video."""
    frames = v.frames
    if getattr(frames, "ndim", None) is not None:
        if frames.ndim not in (3, 4) or frames.dtype not in (np.uint8, torch.uint8) or frames.ndim == 4 and (
                frames.shape[-1] not in (3, 4)):
            _frames(frames, where)  # its error
        return
    if isinstance(frames, (list, tuple)) and frames:
        for i, f in enumerate(frames):
            _check_pixels(f, f"{where} frame {i}")


def check_items(ids, items, proc, where):
    """The checks of one prompt's images and videos that read no pixels (kinds the model
    takes, placeholder counts, array dtypes and shapes), made for every prompt before any
    image is decoded or resized -> (images, videos), features split per item."""
    if any(isinstance(x, Embeds) for x in items):
        if proc.embed_width is None:
            raise ValueError(f"{where} has image or video embeddings; this model takes pixels only")
        items = [y for x in items for y in (x.split(proc.merge, proc.embed_width) if isinstance(x, Embeds) else [x])]
    images = [x for x in items if _kind(x) == IMAGE]
    videos = [x for x in items if _kind(x) == VIDEO]
    vs = proc.video_settings
    if videos and vs is None:
        raise ValueError(f"{where} has a video; this model takes images only")
    if vs is not None and not vs.timestamps:
        meta = next((j for j, v in enumerate(videos) if isinstance(v, Video) and v.metadata is not None), None)
        if meta is not None:
            raise ValueError(f"{where} video {meta}: (frames, metadata) is taken by Qwen3-VL only; pass the "
                             "frames, sampled at mm_processor_kwargs' fps (default 2)")
    vt = proc.video_token_id
    if vt is not None and not videos and vt in ids:
        raise ValueError(f"{where} has a video placeholder token but no video; pass it as "
                         "{'prompt': ..., 'multi_modal_data': {'video': frames}}")
    for what, tok, xs in (("image", proc.image_token_id, images), ("video", vt, videos)):
        have = sum(1 for t in ids if t == tok) if tok is not None else 0
        if have < len(xs):  # one token per item at least, in either form
            raise ValueError(f"{where} has {have} {what} placeholder token(s) for {len(xs)} {what}(s) (needs "
                             f"one placeholder per {what})")
    for j, x in enumerate(images):
        if not isinstance(x, Embeds):
            _check_pixels(x, f"{where} image {j}")
    for j, x in enumerate(videos):
        if isinstance(x, Video):
            _check_video(x, f"{where} video {j}")
    return images, videos


def expand(ids, items, proc, where):
    """Token ids with each image's and video's placeholder expanded -> (token ids, MMData
    without positions). ``ids`` holds, per kind, one placeholder per item, or every
    placeholder token already; grids come in token order. A Qwen3-VL video is one grid
    (1, h, w) per patch group, each run of its tokens after the group's timestamp text.
    Features given beforehand (:class:`Embeds`) take the place of their item's pixels."""
    images, videos = check_items(ids, items, proc, where)
    vs, vt = proc.video_settings, proc.video_token_id
    token = {IMAGE: proc.image_token_id, VIDEO: vt}
    # per kind, per item: (patches or None, [grid per token run], [token ids standing for
    # the item], [given features per token run] or None)
    done = {IMAGE: [], VIDEO: []}
    for j, x in enumerate(images):
        if isinstance(x, Embeds):
            done[IMAGE].append((None, x.grids, [token[IMAGE]] * proc.tokens(x.grids[0]), [x.rows]))
            continue
        patches, grid = proc(x, f"{where} image {j}")
        done[IMAGE].append((patches, [grid], [token[IMAGE]] * proc.tokens(grid), None))
    for j, x in enumerate(videos):
        if isinstance(x, Embeds):
            patches, (t, h, w), rows = None, x.grids[0], x.rows
            # Qwen3-VL's timestamps for features: frames taken to be sampled at fps
            times = vs.sample(t * proc.tp, None, proc.tp, x.where)[1]
        else:
            patches, (t, h, w), times = proc.video(x, f"{where} video {j}")
            rows = None
        n = h * w // proc.merge ** 2
        if times is None:
            done[VIDEO].append((patches, [(t, h, w)], [vt] * (t * n), None if rows is None else [rows]))
            continue
        text = [i for s in times for i in proc.timestamp_ids(s) + [proc.vision_start_token_id] + [vt] * n +
                [proc.vision_end_token_id]]
        done[VIDEO].append((patches, [(1, h, w)] * t, text, None if rows is None else list(rows.split(n))))
    whole = {}  # kind -> an iterator over the items' expansions (None: the prompt has every token already)
    for kind, what in ((IMAGE, "image"), (VIDEO, "video")):
        counts = [proc.tokens(g) for _, grids, _, _ in done[kind] for g in grids]
        have = sum(1 for t in ids if t == token[kind]) if token[kind] is not None else 0
        if have == len(done[kind]):
            whole[kind] = iter(text for _, _, text, _ in done[kind])
        elif have == sum(counts) and _runs(ids, token[kind]) == counts:
            whole[kind] = None
        else:
            raise ValueError(f"{where} has {have} {what} placeholder token(s) for {len(done[kind])} {what}(s) "
                             f"(needs one placeholder per {what}, or {sum(counts)} tokens already expanded as "
                             f"{counts})")
    kind_of = {t: k for k, t in token.items() if t is not None}
    out, kinds, prev = [], [], None
    for t in ids:
        k = kind_of.get(t)
        if k is None:
            out.append(t)
        elif whole[k] is not None:
            text = next(whole[k])
            out += text
            kinds += [k] * len(_runs(text, t))
        else:
            out.append(t)
            if prev != t:
                kinds.append(k)
        prev = t
    nxt = {k: iter([(g, None if given is None else given[i]) for _, grids, _, given in done[k]
                    for i, g in enumerate(grids)]) for k in (IMAGE, VIDEO)}
    grids, embeds = zip(*[next(nxt[k]) for k in kinds]) if kinds else ((), ())
    pix = [p for p, _, _, _ in done[IMAGE] if p is not None]
    vid = [p for p, _, _, _ in done[VIDEO] if p is not None]
    return out, MMData(torch.cat(pix) if pix else None, list(grids), None, torch.cat(vid) if vid else None,
                       kinds if videos else None, list(embeds) if any(e is not None for e in embeds) else None)


def _runs(ids, tok):
    runs, n = [], 0
    for t in ids:
        if t == tok:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs + [n] if n else runs


def rope_positions(ids, grids, image_token_id, merge, intervals=None, video_token_id=None):
    """(3, L) int64 positions: text tokens count up on all three axes; a media item's
    tokens (image or video placeholders, one grid each in token order) take (start +
    floor(group * interval), start + row, start + col) over its merged grid, and the text
    after it continues one past the largest of them. intervals: per grid, the temporal
    step between patch groups (default 1; a still image has one group)."""
    pos = np.empty((3, len(ids)), dtype=np.int64)
    i, start, it = 0, 0, iter(zip(grids, intervals or [1.0] * len(grids)))
    arr = np.asarray(ids)
    media = (arr == image_token_id) if video_token_id is None else (arr == image_token_id) | (arr == video_token_id)
    while i < len(ids):
        if not media[i]:
            j = i
            while j < len(ids) and not media[j]:
                j += 1
            pos[:, i:j] = np.arange(start, start + j - i)
            start += j - i
            i = j
            continue
        (t, h, w), step = next(it)
        h, w = h // merge, w // merge
        n = t * h * w
        tpos = (np.arange(t) * step).astype(np.int64)  # floor, as the models' rope index
        pos[0, i:i + n] = np.repeat(tpos, h * w) + start
        pos[1, i:i + n] = np.tile(np.repeat(np.arange(h), w), t) + start
        pos[2, i:i + n] = np.tile(np.arange(w), t * h) + start
        start += max(int(tpos[-1]), h - 1, w - 1) + 1
        i += n
    return torch.from_numpy(pos)


class MMBatch:
    """A batch's images: pixel_values (N, ...) of the items the tower runs, their grids,
    rope_positions (3, T) (or None) on the device, and given (None, or per item in token
    order: None for the tower's next item, or the (tokens, width) features given for it).
    The model fills rotary (positions, table), mask (T,) bool (the image tokens) and
    deepstack (Qwen3-VL's per-layer image features)."""

    __slots__ = ("pixel_values", "grids", "rope_positions", "given", "rotary", "mask", "deepstack")

    def __init__(self, pixel_values, grids, rope_positions, given=None):
        self.pixel_values, self.grids, self.rope_positions = pixel_values, grids, rope_positions
        self.given = given
        self.rotary = self.mask = self.deepstack = None

    @classmethod
    def build(cls, prompts, device, proc):
        """prompts: TokenizedPrompts, some with ``mm``; text-only ones count up. proc: the
        image processor, whose ``finish`` (``finish_video`` for videos) turns the pixels,
        once on the device, into the vision tower's input."""
        pix, vid, grids, pos, kinds, given = [], [], [], [], [], []
        mrope = any(p.mm is not None and p.mm.rope_positions is not None for p in prompts)
        for p in prompts:
            if p.mm is None:
                pos.append(torch.arange(len(p.token_ids)).expand(3, -1))
                continue
            if p.mm.pixel_values is not None:
                pix.append(p.mm.pixel_values)
            if p.mm.video_values is not None:
                vid.append(p.mm.video_values)
            grids += p.mm.grids
            kinds += p.mm.kinds or [IMAGE] * len(p.mm.grids)
            given += p.mm.embeds or [None] * len(p.mm.grids)
            pos.append(p.mm.rope_positions)
        images = proc.finish(_to(torch.cat(pix), device)) if pix else None
        tower = [g for g, e in zip(grids, given) if e is None]
        if vid:
            # The tower takes every item in token order: images' and videos' rows interleaved.
            videos = proc.finish_video(_to(torch.cat(vid), device))
            rows, at, parts = {IMAGE: images, VIDEO: videos}, {IMAGE: 0, VIDEO: 0}, []
            for k, (t, h, w), e in zip(kinds, grids, given):
                if e is None:
                    parts.append(rows[k][at[k]:at[k] + t * h * w])
                    at[k] += t * h * w
            images = torch.cat(parts)
        if any(e is not None for e in given):
            given = [None if e is None else _to(e, device) for e in given]
        else:
            given = None
        return cls(images, tower, _to(torch.cat(pos, dim=1), device) if mrope else None, given)

    def features(self, tower, deep, width, merge, dtype):
        """The tower's output for its items (tower (N, width) or None where it ran on
        none, deep [(N, width)] per deepstack level) with the given features put in their
        places, in token order, as ``dtype`` -> (features, deep); a given item's row holds
        its features, then its deepstack levels'."""
        if self.given is None:
            return tower.to(dtype), [d.to(dtype) for d in deep]
        levels = next(e.shape[1] for e in self.given if e is not None) // width - 1
        out, dout, at, it = [], [[] for _ in range(levels)], 0, iter(self.grids)
        for e in self.given:
            if e is None:
                t, h, w = next(it)
                n = t * h * w // merge ** 2
                parts = [tower[at:at + n]] + [lv[at:at + n] for lv in deep]
                at += n
            else:
                parts = e.split(width, dim=1)
            for acc, x in zip([out] + dout, parts):
                acc.append(x.to(dtype))
        return torch.cat(out), [torch.cat(d) for d in dout]


def _to(t, device):
    """A host tensor on ``device``. To a GPU from pinned memory without waiting: a copy
    from pageable memory would hold the host until the batch in flight is done."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
