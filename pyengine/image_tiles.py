"""Images for NVIDIA's Llama-Nemotron VL rerankers: each image cut into square tiles.

An image is resized to a grid of ``cols x rows`` tiles of ``image_size`` pixels, the grid
whose aspect ratio is closest to the image's among those of ``min_tiles`` to
``max_tiles`` tiles (a larger grid wins where the image has the pixels for it), and cut
row by row; an image of more than one tile also gets a thumbnail, the whole image
resized to one tile. Each tile becomes ``tokens_per_tile`` tokens after the vision tower.

In a text prompt an image is ``<image>`` (vLLM's placeholder for these models), which
becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tiles * tokens_per_tile) + ``</img>``. A token
prompt holds one ``<IMG_CONTEXT>`` per image, or every one already expanded.

Pixels: PIL's bicubic resize (torch's where pillow is missing), as the checkpoints'
processors resize. Tiles stay uint8 up to the device, a quarter of the bytes to copy;
:meth:`TileProcessor.finish` normalises them there as SigLIP does, ``(x / 255 - 0.5) / 0.5``
in fp32.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .multimodal import VIDEO, Embeds, MMData, Video, _check_pixels, _rgb, _runs, checkpoint_json

PLACEHOLDER = "<image>"
START, CONTEXT, END = "<img>", "<IMG_CONTEXT>", "</img>"


def grid_options(min_tiles, max_tiles):
    """The (cols, rows) grids of min_tiles to max_tiles tiles, fewest tiles first."""
    # Built as a set and sorted stably by size, as the checkpoints' processors build it:
    # among equally good grids the first in this order wins, so the order is part of
    # the result.
    grids = {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def best_grid(width, height, size, options):
    """The (cols, rows) of ``options`` for a width x height image: the largest product of
    closeness in aspect ratio and the grid's pixels over the image's (capped at 0.6, so
    that past 0.6 only the aspect ratio counts)."""
    aspect, area = width / height, width * height
    best, best_score = (1, 1), float("-inf")
    for c, r in options:
        target = c / r
        score = min(c * r * size * size / area, 0.6) * min(target / aspect, aspect / target)
        if score > best_score:
            best, best_score = (c, r), score
    return best


class TileProcessor:
    """Images -> tiles (N, 3, size, size) uint8 for the SigLIP tower, and the prompt's
    image tokens. image_token_id, start_id, end_id: <IMG_CONTEXT>, <img>, </img>."""

    # vLLM's names for the tiling settings of InternVL-style processors.
    OVERRIDES = ("min_dynamic_patch", "max_dynamic_patch", "dynamic_image_size")

    def __init__(self, image_token_id, start_id, end_id, image_size, tokens_per_tile, min_tiles=1, max_tiles=1,
                 thumbnail=True):
        if not 1 <= min_tiles <= max_tiles:
            raise ValueError(f"image tiles: need 1 <= min ({min_tiles}) <= max ({max_tiles})")
        self.image_token_id, self.start_id, self.end_id = int(image_token_id), int(start_id), int(end_id)
        self.size, self.tokens_per_tile = int(image_size), int(tokens_per_tile)
        self.min_tiles, self.max_tiles, self.thumbnail = int(min_tiles), int(max_tiles), bool(thumbnail)
        self.options = grid_options(self.min_tiles, self.max_tiles)

    @classmethod
    def from_checkpoint(cls, path, config, vision_config, overrides=None, tokenizer=None):
        """Tiling from ``path/processor_config.json`` (min_input_tiles, max_input_tiles,
        dynamic_image_size, use_thumbnail) where there is one, else the config's
        min_dynamic_patch / max_dynamic_patch / dynamic_image_size, then ``overrides``
        (vLLM's mm_processor_kwargs names). Token ids from the tokenizer."""
        overrides = dict(overrides or {})
        bad = sorted(str(k) for k in overrides if k not in cls.OVERRIDES)
        if bad:
            raise ValueError(f"mm_processor_kwargs: {bad} cannot be set; supported: {list(cls.OVERRIDES)}")
        for k, v in overrides.items():
            ok = isinstance(v, bool) if k == "dynamic_image_size" else (isinstance(v, int) and not isinstance(v, bool)
                                                                         and v >= 1)
            if not ok:
                want = "a bool" if k == "dynamic_image_size" else "a positive int"
                raise ValueError(f"mm_processor_kwargs: {k} must be {want}, got {v!r}")
        pre = checkpoint_json(path, "processor_config.json")
        lo = overrides.get("min_dynamic_patch", pre.get("min_input_tiles", getattr(config, "min_dynamic_patch", 1)))
        hi = overrides.get("max_dynamic_patch", pre.get("max_input_tiles", getattr(config, "max_dynamic_patch", 1)))
        dynamic = overrides.get("dynamic_image_size",
                                pre.get("dynamic_image_size", getattr(config, "dynamic_image_size", True)))
        if not dynamic:
            lo = hi = 1
        if tokenizer is None:
            raise ValueError("images need the model's tokenizer (for the <img>, </img> and <IMG_CONTEXT> tokens)")
        ids = {}
        for t in (START, CONTEXT, END):
            ids[t] = tokenizer.convert_tokens_to_ids(t)
            if ids[t] is None or ids[t] == tokenizer.unk_token_id or tokenizer(t, add_special_tokens=False)[
                    "input_ids"] != [ids[t]]:
                raise ValueError(f"the tokenizer has no token {t!r}; this model's images need it")
        ctx = getattr(config, "img_context_token_id", None)
        if ctx is not None and int(ctx) != ids[CONTEXT]:
            raise ValueError(f"config img_context_token_id={ctx} but the tokenizer's {CONTEXT} is {ids[CONTEXT]}")
        size = int(getattr(config, "force_image_size", None) or vision_config.image_size)
        k = round(1 / float(getattr(config, "downsample_ratio", 0.5)))
        side = size // vision_config.patch_size
        return cls(ids[CONTEXT], ids[START], ids[END], size, (side // k) ** 2, lo, hi,
                   pre.get("use_thumbnail", True))

    # ------------------------------------------------------------------ text
    def placeholder_text(self, tokenizer):
        return PLACEHOLDER

    def prepare_text(self, text):
        """A text prompt with each <image> written as <img><IMG_CONTEXT></img>, one context
        token that :meth:`prompt` widens to the image's."""
        return text.replace(PLACEHOLDER, START + CONTEXT + END)

    # ------------------------------------------------------------------ pixels
    def tiles(self, img, where):
        """One image -> (n, 3, size, size) uint8 tiles: the grid row by row, then the
        thumbnail where there is more than one tile."""
        x = _rgb(img, where)
        s = self.size
        H, W = x.shape[1:]
        cols, rows = best_grid(W, H, s, self.options)
        parts = [_resize(x, rows * s, cols * s).view(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)]
        if self.thumbnail and cols * rows > 1:
            parts.append(_resize(x, s, s)[None])
        return torch.cat(parts)

    def finish(self, tiles):
        """uint8 tiles (N, 3, S, S), on the device -> SigLIP's input, fp32."""
        return (tiles.float() / 255 - 0.5) / 0.5

    def check(self, ids, images, where):
        """The checks of :meth:`prompt` that read no pixels."""
        if any(isinstance(x, Video) or (isinstance(x, Embeds) and x.kind == VIDEO) for x in images):
            raise ValueError(f"{where} has a video; this model takes images only")
        if any(isinstance(x, Embeds) for x in images):
            raise ValueError(f"{where} has image embeddings; this model takes pixels only")
        runs = _runs(ids, self.image_token_id)
        if len(runs) != len(images):  # one run of tokens per image, in either form
            raise ValueError(f"{where} has {len(runs)} image placeholder(s) for {len(images)} image(s) (needs one "
                             f"{PLACEHOLDER} in a text prompt, or one <IMG_CONTEXT> token, per image)")
        for j, img in enumerate(images):
            _check_pixels(img, f"{where} image {j}")

    def prompt(self, ids, images, where):
        """Token ids with each image's context tokens widened to its tiles' count ->
        (token ids, MMData with the tiles and the tiles per image)."""
        self.check(ids, images, where)
        tiles = [self.tiles(img, f"{where} image {j}") for j, img in enumerate(images)]
        counts = [t.shape[0] * self.tokens_per_tile for t in tiles]
        runs = _runs(ids, self.image_token_id)
        if runs == counts:
            out = list(ids)
        elif runs == [1] * len(images):
            out, it, n = [], iter(counts), len(ids)
            for i, t in enumerate(ids):
                if t != self.image_token_id:
                    out.append(t)
                    continue
                # Wrapped in <img> ... </img> unless the prompt already wraps it.
                if not (i and ids[i - 1] == self.start_id):
                    out.append(self.start_id)
                out += [t] * next(it)
                if not (i + 1 < n and ids[i + 1] == self.end_id):
                    out.append(self.end_id)
        else:
            raise ValueError(f"{where} has {len(runs)} image placeholder(s) for {len(images)} image(s) (needs one "
                             f"{PLACEHOLDER} in a text prompt, or one <IMG_CONTEXT> token, per image; or "
                             f"<IMG_CONTEXT> runs already expanded as {counts})")
        return out, MMData(torch.cat(tiles), [t.shape[0] for t in tiles], None)


def _resize(x, h, w):
    """(3, H, W) uint8 -> (3, h, w) uint8 by PIL's bicubic resize, as the checkpoints'
    processors resize. Without pillow, torch's uint8 antialiased bicubic: PIL's filter in
    the same fixed-point steps, within one level of it where PIL runs the horizontal pass
    first (newer Pillow may run the vertical one first when it shrinks more, and then
    differs by several levels)."""
    if tuple(x.shape[1:]) == (h, w):
        return x
    try:
        from PIL import Image
    except ImportError:
        return F.interpolate(x[None].contiguous(), size=(h, w), mode="bicubic", antialias=True,
                             align_corners=False)[0]
    img = Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB").resize((w, h), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
