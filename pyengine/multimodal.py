"""Images for vision-language classifiers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): preprocessing, the
placeholder tokens, and the 3-D rotary positions of a prompt.

A prompt with images is ``{"prompt": str | "prompt_token_ids": [...], "multi_modal_data":
{"image": img | [img, ...]}}`` as in vLLM. Its text holds one ``<|image_pad|>`` per image
(inside ``<|vision_start|> ... <|vision_end|>``); each is expanded to the image's
``t * h * w / merge**2`` tokens, whose embeddings the vision tower's output replaces. A
token prompt may also come already expanded (as transformers' processor writes it).

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


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """(h, w) multiples of ``factor`` with h * w in [min_pixels, max_pixels], the aspect
    ratio kept as closely as possible (the Qwen2-VL processor's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {height}x{width} has an aspect ratio over 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
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


def _rgb(img, where):
    """(3, H, W) uint8 from a PIL image or a uint8 array."""
    if hasattr(img, "convert") and hasattr(img, "size") and not hasattr(img, "shape"):
        img = np.array(img.convert("RGBA" if "A" in img.mode else "RGB"))
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


class ImageProcessor:
    """Images -> vision-tower patches for one checkpoint.

    image_token_id: the placeholder token; patch_size, temporal_patch_size, merge_size:
    the vision tower's; min_pixels, max_pixels, mean, std, rescale, do_resize, do_rescale,
    do_normalize: the checkpoint's preprocessor settings."""

    def __init__(self, image_token_id, patch_size=14, temporal_patch_size=2, merge_size=2,
                 min_pixels=56 * 56, max_pixels=28 * 28 * 1280, mean=_MEAN, std=_STD, rescale=1 / 255,
                 do_resize=True, do_rescale=True, do_normalize=True, video_token_id=None,
                 vision_start_token_id=None, vision_end_token_id=None):
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

    # Settings a user may set for the whole engine (vLLM's LLM(mm_processor_kwargs=...)),
    # e.g. the pixel bounds a checkpoint's own scoring code uses in place of its saved ones;
    # "size": {"shortest_edge", "longest_edge"} is transformers 5's name for the same bounds.
    OVERRIDES = ("min_pixels", "max_pixels", "size")

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
        for k, v in overrides.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"mm_processor_kwargs: {k} must be a positive int, got {v!r}")
        pre = checkpoint_json(path, "preprocessor_config.json")
        size = pre.get("size") or {}
        geom = {"patch_size": vision_config.patch_size, "temporal_patch_size": vision_config.temporal_patch_size,
                "merge_size": vision_config.spatial_merge_size}
        for k, v in geom.items():
            if k in pre and int(pre[k]) != int(v):
                raise ValueError(f"preprocessor_config.json has {k}={pre[k]} but the vision tower's is {v}")
        return cls(config.image_token_id, **geom,
                   min_pixels=overrides.get("min_pixels", pre.get("min_pixels", size.get("shortest_edge", 56 * 56))),
                   max_pixels=overrides.get("max_pixels",
                                            pre.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
                   mean=pre.get("image_mean", _MEAN), std=pre.get("image_std", _STD),
                   rescale=pre.get("rescale_factor", 1 / 255), do_resize=pre.get("do_resize", True),
                   do_rescale=pre.get("do_rescale", True), do_normalize=pre.get("do_normalize", True),
                   video_token_id=getattr(config, "video_token_id", None),
                   vision_start_token_id=getattr(config, "vision_start_token_id", None),
                   vision_end_token_id=getattr(config, "vision_end_token_id", None))

    def __call__(self, img, where):
        """One image -> (patches (h*w, C*p*p) uint8, (t, h, w) grid of patches), in the
        vision tower's order; :meth:`finish` turns them into its input on the device."""
        x = _rgb(img, where)
        H, W = x.shape[1:]
        factor = self.patch * self.merge
        if self.do_resize:
            h, w = smart_resize(H, W, factor, self.min_pixels, self.max_pixels)
            if (h, w) != (H, W):
                # torch's uint8 antialiased bicubic is PIL's filter in the same fixed-point
                # steps (8-bit between the two passes), so it agrees with PIL to one level.
                x = F.interpolate(x[None].contiguous(), size=(h, w), mode="bicubic", antialias=True,
                                  align_corners=False)[0]
        elif H % factor or W % factor:
            raise ValueError(f"{where} is {H}x{W}, not a multiple of {factor}, and do_resize is off")
        C, h, w = x.shape
        gh, gw, m, p = h // self.patch, w // self.patch, self.merge, self.patch
        # Patches in merge-block order (each m x m block of patches is one LLM token),
        # each flattened as (C, p, p); still uint8, a quarter of fp32's bytes to copy,
        # and not yet repeated over time.
        x = x.reshape(C, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        return x.reshape(gh * gw, C * p * p), (1, gh, gw)

    def finish(self, patches):
        """uint8 patches (N, C*p*p), on the device -> the tower's input (N, C*tp*p*p) fp32:
        rescaled, normalised per channel, the still image repeated over time."""
        N, C = patches.shape[0], self.mean.shape[0]
        x = patches.view(N, C, -1).float()
        if self.do_rescale:
            x = x * self.rescale
        if self.do_normalize:
            mean, std = self._stats(x.device)
            x = (x - mean) / std
        return x[:, :, None].expand(-1, -1, self.tp, -1).reshape(N, -1)

    def _stats(self, device):
        """(mean, std) as (1, C, 1) on ``device``, copied there once (a copy per batch
        from pageable memory would stall the host)."""
        key = str(device)
        if key not in self._on:
            C = self.mean.shape[0]
            self._on[key] = (self.mean.view(1, C, 1).to(device), self.std.view(1, C, 1).to(device))
        return self._on[key]

    def tokens(self, grid):
        t, h, w = grid
        return t * h * w // self.merge ** 2

    def placeholder_text(self, tokenizer):
        """The text that stands for one image: <|vision_start|><|image_pad|><|vision_end|>."""
        text = "".join(tokenizer.convert_ids_to_tokens(self.placeholder_ids))
        if tokenizer(text, add_special_tokens=False)["input_ids"] != self.placeholder_ids:
            raise ValueError(f"the tokenizer does not encode the image placeholder {text!r} as the token ids "
                             f"{self.placeholder_ids}")
        return text

    def prepare_text(self, text):
        return text

    def prompt(self, ids, images, where):
        """Token ids with each image's placeholder expanded -> (token ids, MMData)."""
        tokens, pixels, grids = expand(ids, images, self, where)
        return tokens, MMData(pixels, grids, rope_positions(tokens, grids, self.image_token_id, self.merge))


class MMData:
    """One prompt's images: pixel_values (N, ...) uint8 (as the processor leaves them), grids (per image: (t, h, w)
    patches, or a tile count), and rope_positions (3, L) int64, the (temporal, height,
    width) rotary position of each token (None: the model's own positions)."""

    __slots__ = ("pixel_values", "grids", "rope_positions")

    def __init__(self, pixel_values, grids, rope_positions):
        self.pixel_values, self.grids, self.rope_positions = pixel_values, grids, rope_positions


def image_list(data, where):
    """The images of a ``multi_modal_data`` dict, as a non-empty list."""
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a dict such as {{'image': img}}, got {type(data).__name__}")
    other = sorted(str(k) for k in data if k != "image")
    if other:
        raise ValueError(f"{where} has {other}: only 'image' is supported (no video or audio)")
    if "image" not in data:
        raise ValueError(f"{where} has no 'image'")
    imgs = data["image"]
    imgs = list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
    if not imgs:
        raise ValueError(f"{where}['image'] is an empty list")
    return imgs


def image_from_data_url(url, where):
    """A base64 data URL (``data:image/png;base64,...``) decoded into a PIL image. Other
    URLs are refused: nothing here fetches from the network or reads files."""
    if not isinstance(url, str):
        raise TypeError(f"{where}: an image URL must be a string, got {type(url).__name__}")
    if not url.startswith("data:"):
        raise ValueError(f"{where}: images are not fetched from URLs or files; send the image as a data URL "
                         "(data:image/png;base64,...)")
    head, _, data = url.partition(",")
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


def expand(ids, images, proc, where):
    """Token ids with each image's placeholder expanded, and the images' patches and
    grids. ``ids`` holds one placeholder per image, or every placeholder token already."""
    if proc.video_token_id is not None and proc.video_token_id in ids:
        raise ValueError(f"{where} has a video placeholder; videos are not supported")
    pix, grids = [], []
    for j, img in enumerate(images):
        p, g = proc(img, f"{where} image {j}")
        pix.append(p)
        grids.append(g)
    counts = [proc.tokens(g) for g in grids]
    have = sum(1 for t in ids if t == proc.image_token_id)
    if have == len(images):
        out, it = [], iter(counts)
        for t in ids:
            if t == proc.image_token_id:
                out += [t] * next(it)
            else:
                out.append(t)
    elif have == sum(counts) and _runs(ids, proc.image_token_id) == counts:
        out = list(ids)
    else:
        raise ValueError(f"{where} has {have} image placeholder token(s) for {len(images)} image(s) "
                         f"(needs one placeholder per image, or {sum(counts)} tokens already expanded as "
                         f"{counts})")
    return out, torch.cat(pix), grids


def _runs(ids, tok):
    runs, n = [], 0
    for t in ids:
        if t == tok:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs + [n] if n else runs


def rope_positions(ids, grids, image_token_id, merge):
    """(3, L) int64 positions: text tokens count up on all three axes; an image's tokens
    take (start, start + row, start + col) over its merged grid, and the text after it
    continues from start + max(rows, cols)."""
    pos = np.empty((3, len(ids)), dtype=np.int64)
    i, start, it = 0, 0, iter(grids)
    arr = np.asarray(ids)
    while i < len(ids):
        if arr[i] != image_token_id:
            j = i
            while j < len(ids) and arr[j] != image_token_id:
                j += 1
            pos[:, i:j] = np.arange(start, start + j - i)
            start += j - i
            i = j
            continue
        t, h, w = next(it)
        h, w = h // merge, w // merge
        n = t * h * w
        pos[0, i:i + n] = start  # still images: one time step
        pos[1, i:i + n] = np.tile(np.repeat(np.arange(h), w), t) + start
        pos[2, i:i + n] = np.tile(np.arange(w), t * h) + start
        start += max(h, w)
        i += n
    return torch.from_numpy(pos)


class MMBatch:
    """A batch's images: pixel_values (N, ...) and rope_positions (3, T) (or None) on the
    device, grids in token order. The model fills rotary (positions, table), mask
    (T,) bool (the image tokens) and deepstack (Qwen3-VL's per-layer image features)."""

    __slots__ = ("pixel_values", "grids", "rope_positions", "rotary", "mask", "deepstack")

    def __init__(self, pixel_values, grids, rope_positions):
        self.pixel_values, self.grids, self.rope_positions = pixel_values, grids, rope_positions
        self.rotary = self.mask = self.deepstack = None

    @classmethod
    def build(cls, prompts, device, finish):
        """prompts: TokenizedPrompts, some with ``mm``; text-only ones count up. finish:
        the image processor's, which turns the pixels, once on the device, into the
        vision tower's input."""
        pix, grids, pos = [], [], []
        mrope = any(p.mm is not None and p.mm.rope_positions is not None for p in prompts)
        for p in prompts:
            if p.mm is None:
                pos.append(torch.arange(len(p.token_ids)).expand(3, -1))
            else:
                pix.append(p.mm.pixel_values)
                grids += p.mm.grids
                pos.append(p.mm.rope_positions)
        return cls(finish(_to(torch.cat(pix), device)), grids, _to(torch.cat(pos, dim=1), device) if mrope else None)


def _to(t, device):
    """A host tensor on ``device``. To a GPU from pinned memory without waiting: a copy
    from pageable memory would hold the host until the batch in flight is done."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
