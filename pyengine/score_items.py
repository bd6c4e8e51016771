"""score()'s inputs as vLLM's score API takes them: texts, images and videos, and the
rendering of (query, document) pairs that hold them into one prompt each.

An item (one query or one document) is a str, ``{"prompt": str}``, a content part, or
``{"content": [part, ...]}`` (vLLM's ScoreMultiModalParam: one item whose parts are
written one after another, text as it is and each image as the model's placeholder;
text parts alone are joined by newlines, as vLLM joins them).
Parts: ``{"type": "text", "text": str}``, ``{"type": "image_url", "image_url": {"url":
"data:image/...;base64,..."}}`` (the url may also stand alone), ``{"type": "image_pil",
"image_pil": img}`` (a PIL image, or a uint8 array as in multi_modal_data), ``{"type":
"video_url", "video_url": {"url": "data:video/jpeg;base64,<frame>,..."}}`` (JPEG frames,
for models that take videos). data_1 /
data_2 are one item or a list of items; a lone ``{"content": [...]}`` (not in a list)
holds one item per part, as in vLLM. Images stay undecoded until the pairs are
tokenised, on the tokenizer's thread in the server.

A pair with an image is rendered by a score template (the model's own, or the caller's;
without one, query then document back to back); the images go with the prompt in the
order the template placed them (jina-reranker-m0's template puts the document first).
"""
from __future__ import annotations

import itertools
import re

from .multimodal import Video, image_from_data_url, video_from_data_url

_FORMS = ("a str, {'prompt': str}, {'type': 'text', 'text': str}, {'type': 'image_url', 'image_url': "
          "{'url': 'data:...'}}, {'type': 'image_pil', 'image_pil': image} or {'type': 'video_url', 'video_url': "
          "{'url': 'data:video/jpeg;base64,...'}}")
# Image i of a pair renders as the model's placeholder followed by _MARK.format(i):
# private-use code points, which no text holds and which Jinja's string filters (upper,
# trim, ...) leave as they are. The placeholder before them lets a template test for
# images as vLLM's do ("<image>" in document).
_MARK = "\ue000{}\ue001"
_MARKS = re.compile("\ue000[0-9]+\ue001")


class ScoreImage:
    """One image or video part: the part as given, and where it came from (for error messages)."""

    __slots__ = ("part", "where")

    def __init__(self, part, where):
        self.part, self.where = part, where

    @property
    def video(self):
        return self.part["type"] == "video_url"

    def load(self):
        """The item itself: a PIL image (decoded from the data URL) or the image_pil object,
        or a :class:`~pyengine.multimodal.Video` of the decoded frames."""
        if self.part["type"] == "image_pil":
            return self.part["image_pil"]
        url = self.part[self.part["type"]]
        url = url.get("url") if isinstance(url, dict) else url
        return Video(video_from_data_url(url, self.where)) if self.video else image_from_data_url(url, self.where)


class ScoreParts(list):
    """A parsed item that holds an image: its parts in order, each a str or a ScoreImage."""

    __slots__ = ()


def _part(x, where):
    """One content part: a str, or a ScoreImage."""
    if not isinstance(x, dict):
        raise TypeError(f"{where} must be a content part ({_FORMS}); got {type(x).__name__}")
    kind = x.get("type")
    if kind == "text" and isinstance(x.get("text"), str):
        return x["text"]
    if kind in ("image_url", "image_pil", "video_url") and x.get(kind) is not None:
        return ScoreImage(x, where)
    raise ValueError(f"{where} is not a content part ({_FORMS}); got keys {sorted(map(str, x))}"
                     + (f" with type {kind!r}" if kind is not None else ""))


def item(x, where):
    """One query or document: a str, or ScoreParts (it has an image)."""
    if isinstance(x, (str, ScoreParts)):
        return x  # a str, or already parsed
    if not isinstance(x, dict):
        raise TypeError(f"{where} must be {_FORMS} or {{'content': [parts]}}; got {type(x).__name__}")
    if "type" in x:
        part = _part(x, where)
        return part if isinstance(part, str) else ScoreParts([part])
    if "content" in x:
        content = x["content"]
        if not isinstance(content, (list, tuple)) or not content:
            raise TypeError(f"{where}['content'] must be a non-empty list of content parts, got {content!r:.60}")
        parts = [_part(p, f"{where}['content'][{j}]") for j, p in enumerate(content)]
        # text parts alone are joined by newlines, as vLLM's parser of chat content joins them
        return ScoreParts(parts) if any(isinstance(p, ScoreImage) for p in parts) else "\n".join(parts)
    if "prompt" in x:
        if "multi_modal_data" in x:
            raise ValueError(f"{where}: score() takes images as content parts ({{'content': [{{'type': "
                             "'image_url', ...}]}), not as multi_modal_data")
        if not isinstance(x["prompt"], str):
            raise TypeError(f"{where}['prompt'] must be a str, got {type(x['prompt']).__name__}")
        return x["prompt"]
    raise ValueError(f"{where} is not a score item ({_FORMS} or {{'content': [parts]}}); got keys "
                     f"{sorted(map(str, x))}")


def split_side(data, name):
    """One side of score() as a list of (raw item, where)."""
    if isinstance(data, dict) and "content" in data and "type" not in data:
        content = data["content"]
        if not isinstance(content, (list, tuple)):
            raise TypeError(f"{name}['content'] must be a list of content parts, got {type(content).__name__}")
        return [(x, f"{name}['content'][{i}]") for i, x in enumerate(content)]
    if isinstance(data, (str, dict)):
        return [(data, f"{name}[0]")]
    if not isinstance(data, (list, tuple)):
        raise TypeError(f"score() takes for {name} a str, a dict or a list of them; got {type(data).__name__}")
    return [(x, f"{name}[{i}]") for i, x in enumerate(data)]


def score_items(data, name):
    """One side of score(): a list of items, each a str or ScoreParts."""
    return [item(x, where) for x, where in split_side(data, name)]


def has_image(item) -> bool:
    return isinstance(item, ScoreParts)


def pair_items(data_1, data_2, names=("data_1", "data_2")):
    """score()'s inputs as two equal-length lists of items (1:1, 1:N or N:N), none empty.
    names: what errors call the two sides (the server's request fields)."""
    d1, d2 = score_items(data_1, names[0]), score_items(data_2, names[1])
    for name, d in zip(names, (d1, d2)):
        if not d:
            raise ValueError(f"score() got an empty list for {name}")
        for i, x in enumerate(d):
            if isinstance(x, str) and not x:
                raise ValueError(f"{name}[{i}] is empty")
    if len(d1) == 1 and len(d2) > 1:
        d1 = d1 * len(d2)
    if len(d1) != len(d2):
        raise ValueError(f"score() pairs must be 1:1, 1:N or N:N; got {len(d1)} items in {names[0]} and "
                         f"{len(d2)} in {names[1]}")
    return d1, d2


def render_with_images(template, render, d1, d2, placeholder, video_placeholder=None):
    """Prompts of pairs: a list of (text, [ScoreImage in text order]).

    render(template, queries, documents) -> texts (:func:`pyengine.templates.render_pairs`);
    placeholder / video_placeholder: the model's text for one image / video. Where a
    template rewrites the image placeholders (drops each and writes its own), the pair's
    images follow in the pair's order. Raises ValueError where the template drops an
    image or video or writes it twice."""
    marks = itertools.count()
    qs, ds, imgs = [], [], []
    for q, d in zip(d1, d2):
        pair = {}
        for x, side in ((q, qs), (d, ds)):
            if has_image(x):
                text = []
                for seg in x:
                    if isinstance(seg, ScoreImage):
                        if seg.video and video_placeholder is None:
                            raise ValueError(f"{seg.where} is a video; this model takes images only")
                        mark = (video_placeholder if seg.video else placeholder) + _MARK.format(next(marks))
                        pair[mark] = seg
                        seg = mark
                    text.append(seg)
                x = "".join(text)
            side.append(x)
        imgs.append(pair)
    out = []
    for i, (text, pair) in enumerate(zip(render(template, qs, ds), imgs)):
        counts = {mark: text.count(mark) for mark in pair}
        if pair and not any(counts.values()) and _MARKS.search(text) and not any(m.video for m in pair.values()):
            # The template rewrote the placeholders (vLLM's Nemotron VL template moves a
            # document's image to the front): its own placeholders take the images in
            # the pair's order, the query's first, where there are as many as images.
            text = _MARKS.sub("", text)
            if text.count(placeholder) == len(pair):
                out.append((text, list(pair.values())))
                continue
        at = {}
        for mark, img in pair.items():
            if counts[mark] != 1:
                raise ValueError(f"pair {i}: the score template wrote its image ({img.where}) {counts[mark]} times; "
                                 "each image must appear exactly once")
            at[text.index(mark)] = (mark, img)
        order = [at[k] for k in sorted(at)]
        for mark, img in order:
            text = text.replace(mark, video_placeholder if img.video else placeholder)
        out.append((text, [img for _, img in order]))
    return out
