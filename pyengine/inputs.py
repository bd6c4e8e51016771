"""Prompt parsing, tokenisation, truncation and text pairs.

Everything here runs before any model work, so a bad prompt anywhere in a call fails
the whole call with a message naming the prompt, and nothing is half-done.
"""
from __future__ import annotations

import functools
import os
import re
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate, chain

import numpy as np

from .multimodal import MMData, media_list
from .score_items import has_image, pair_items, render_with_images
from .templates import load_score_template, render_pairs


@dataclass
class TokenizedPrompt:
    token_ids: list[int]
    token_type_ids: list[int] | None = None
    mm: MMData | None = None  # images of a vision-language prompt
    # token_ids as int64, a view of one array the checks make for a whole call (one C
    # pass over every token); batches are packed from these views. Set once checked;
    # token_ids do not change after that.
    id_array: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self):
        return len(self.token_ids)


def all_ints(ids) -> bool:
    """Every element an int and none a bool. The exact-type set is the fast path (a C
    loop, not a Python-level generator per token); other int subclasses take the slow one."""
    types = set(map(type, ids))
    if types <= {int}:
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in ids)


# Keys of a prompt dict (vLLM's TextPrompt / TokensPrompt); cache_salt only salts a prefix
# cache, and multi_modal_uuids only name images for a cache, which this engine does not
# have, so they change nothing here.
_PROMPT_KEYS = ("prompt", "prompt_token_ids", "token_type_ids", "cache_salt", "multi_modal_data",
                "multi_modal_uuids")


@dataclass
class ImagePrompt:
    """A prompt with images, as parsed: text or token ids, and the images (not yet read)."""
    prompt: str | list[int]
    images: list

    def __len__(self):
        return len(self.prompt)


def _ids(x, where):
    """A list of ints from a list, tuple, or 1-D integer numpy array or torch tensor."""
    if hasattr(x, "tolist") and getattr(x, "ndim", None) == 1 and "int" in str(getattr(x, "dtype", "")):
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{where} must be a list of ints (or a 1-D integer array), got {type(x).__name__}")
    if not all_ints(x):
        j, bad = next((j, t) for j, t in enumerate(x) if not isinstance(t, int) or isinstance(t, bool))
        raise TypeError(f"{where} must be a list of ints; element {j} is {type(bad).__name__} {bad!r}")
    return list(x)


def _parse_dict(p, where):
    if "mm_processor_kwargs" in p:
        raise ValueError(f"{where} has 'mm_processor_kwargs': per-prompt processor settings are not supported "
                         "(the checkpoint's preprocessor_config.json applies)")
    unknown = sorted(str(k) for k in p if k not in _PROMPT_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; a prompt dict takes {list(_PROMPT_KEYS)}")
    if p.get("multi_modal_data") is not None:
        images = media_list(p["multi_modal_data"], f"{where}['multi_modal_data']")
        if p.get("token_type_ids") is not None:
            raise ValueError(f"{where}: token_type_ids do not go with images")
        rest = {k: v for k, v in p.items() if k != "multi_modal_data"}
        return ImagePrompt(_parse_dict(rest, where), images)
    if "prompt_token_ids" in p:
        ids = _ids(p["prompt_token_ids"], f"{where}['prompt_token_ids']")
        if p.get("token_type_ids") is None:
            return ids
        types = _ids(p["token_type_ids"], f"{where}['token_type_ids']")
        if len(types) != len(ids):
            raise ValueError(f"{where}['token_type_ids'] has {len(types)} entries for {len(ids)} token ids")
        return TokenizedPrompt(ids, types)
    if "token_type_ids" in p:
        raise ValueError(f"{where}: token_type_ids go with prompt_token_ids, not with a text prompt")
    if "prompt" not in p:
        raise ValueError(f"{where} is a dict without 'prompt' or 'prompt_token_ids' (keys: {sorted(map(str, p))})")
    if not isinstance(p["prompt"], str):
        raise TypeError(f"{where}['prompt'] must be a str, got {type(p['prompt']).__name__}")
    return p["prompt"]


def _is_text_array(x) -> bool:
    """A 1-D numpy array of str (dtype str_ or object holding str)."""
    if not isinstance(x, np.ndarray) or x.ndim != 1:
        return False
    return x.dtype.kind == "U" or (x.dtype.kind == "O" and all(isinstance(v, str) for v in x))


def parse_prompts(prompts, what="prompts"):
    """Normalise str | {"prompt": str} | {"prompt_token_ids": [...] [, "token_type_ids":
    [...]]} | list[int] (token ids), or a list of those, into a list of ``str``,
    ``list[int]`` and (token ids with their types) ``TokenizedPrompt``."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts and all_ints(prompts)):
        prompts = [prompts]  # one prompt: a text, a dict, or token ids (vLLM's list[int])
    if _is_text_array(prompts):  # a numpy array of strings, as vLLM takes it (a sequence of str)
        prompts = [str(p) for p in prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{what} must be a str, a dict, a list of token ids or a list of them, "
                        f"got {type(prompts).__name__}")
    out = []  # no prompts: no outputs, as vLLM returns for an empty list
    for i, p in enumerate(prompts):
        if isinstance(p, dict):
            out.append(_parse_dict(p, f"{what}[{i}]"))
        elif isinstance(p, str):
            out.append(p)
        elif isinstance(p, (list, tuple)):
            out.append(_ids(p, f"{what}[{i}]"))  # token ids, as {"prompt_token_ids": p}
        else:
            raise TypeError(f"{what}[{i}] must be a str, a dict or a list of token ids, got {type(p).__name__}")
    return out


_POOL = None


def _image_pool():
    """The threads that read images (None on one core), started on first use."""
    global _POOL
    n = min(8, os.cpu_count() or 1)
    if _POOL is None and n > 1:
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="pyengine-images", initializer=_one_thread)
    return _POOL


def _one_thread():
    # Each image thread runs torch's ops on itself alone: thread teams of their own left
    # behind by these threads slowed the model's own ops after them by up to 2x.
    import torch

    torch.set_num_threads(1)


def _forget_pool():
    global _POOL
    _POOL = None  # a forked child has none of its parent's threads


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool)


def _load(img):
    """Decode a lazily opened PIL image now (its errors are reported later, per prompt)."""
    try:
        img.load()
    except Exception:  # noqa: BLE001 - the prompt that holds it reports the error
        pass


_PROMPT_ERROR = re.compile(r"(?:prompts|pairs)\[(\d+)\]:? ?")


def prompt_error(message: str) -> tuple[int, str] | None:
    """(i, the rest) of an input error this module raises about prompts[i] or pairs[i] of
    one call, for callers that name the row their own way; None for any other message."""
    m = _PROMPT_ERROR.match(message)
    return None if m is None else (int(m[1]), message[m.end():])


class _BadText(ValueError):
    """A text the tokenizer cannot take: index, in the texts of one tokenizer call."""

    def __init__(self, index, message):
        super().__init__(f"text {index} {message}")
        self.index, self.message = index, message


def unicode_error(text, which="") -> str | None:
    """Why ``text`` is not valid Unicode (a lone surrogate such as JSON's "\\ud83d", left
    where scraped text was cut mid-character), or None; ``which`` follows "Unicode"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode{which}: {e.reason} at character {e.start}"
    return None


def _find_unencodable(texts, pairs, offset):
    """Raise _BadText for the first text (or pair) that is not valid Unicode, which the
    tokenizer refuses without saying which."""
    for j, t in enumerate(texts):
        for part, side in ((t, ""), (None if pairs is None else pairs[j], " (its second text)")):
            why = part is not None and unicode_error(part, side)
            if why:
                raise _BadText(offset + j, f"is {why}")


class InputProcessor:
    """Turns prompts into token ids under the model's length limit."""

    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, type_vocab_size: int = 0, images=None,
                 score_template=None, score_suffix=()):
        """type_vocab_size: the model's token types (0: it has none, and types are dropped);
        images: a multimodal.ImageProcessor for a vision-language model, else None;
        score_template: the model's own score template (Jinja source), used where a score
        call names none; score_suffix: token ids the model's score prompts end with."""
        self.tokenizer = tokenizer
        self.images = images
        self.score_template = score_template
        self.score_suffix = list(score_suffix)
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.type_vocab_size = type_vocab_size
        self.keep_token_types = type_vocab_size > 0

    # ------------------------------------------------------------------ limits
    def _limit(self, truncate_prompt_tokens, truncation_side, reserve=0):
        """(tokens the prompt itself may keep, side); reserve: tokens appended after
        truncation (a score suffix), which count towards the limit."""
        k = truncate_prompt_tokens
        if truncation_side not in (None, "left", "right"):
            raise ValueError(f"truncation_side must be 'left', 'right' or None, got {truncation_side!r}")
        if k is None:
            return None, "left"
        if not isinstance(k, int) or isinstance(k, bool) or (k < 1 and k != -1):
            raise ValueError(f"truncate_prompt_tokens must be None, -1 or a positive int, got {k!r}")
        if k == -1:
            k = self.max_model_len
        if k > self.max_model_len:
            raise ValueError(f"truncate_prompt_tokens={k} is greater than max_model_len={self.max_model_len}")
        if k <= reserve:
            raise ValueError(f"truncate_prompt_tokens={k} leaves no room: this model's score prompts end with "
                             f"{reserve} token(s) of their own")
        return k - reserve, truncation_side or "left"

    def _check_room(self, prompts, limits, what, reserve):
        """A truncation limit below the special tokens the tokenizer adds to a text (or a
        pair) is an error: the tokenizer would log it and return the text uncut."""
        need = {}
        for i, p in enumerate(prompts):
            k = limits[i][0]
            if k is None or not isinstance(p, (str, tuple)):
                continue
            pair = isinstance(p, tuple)
            if pair not in need:
                need[pair] = self.tokenizer.num_special_tokens_to_add(pair=pair)
            if k < need[pair]:
                raise ValueError(f"{what}[{i}]: truncate_prompt_tokens={k + reserve} keeps fewer tokens than the "
                                 f"{need[pair] + reserve} special tokens this model adds to a "
                                 f"{'text pair' if pair else 'text'}; pass at least {need[pair] + reserve}")

    def _check(self, prompts, what, index=None):
        """Raise ValueError for the first prompt that is too long, empty or holds an id
        outside the vocabulary (or the token types); index: each prompt's own index, where
        ``prompts`` is a subset."""
        def at(i):
            return f"{what}[{i if index is None else index[i]}]"

        for i, p in enumerate(prompts):
            n = len(p.token_ids)
            if n == 0:  # text without special tokens can tokenise to nothing
                raise ValueError(f"{at(i)} has no tokens")
            if n > self.max_model_len:
                raise ValueError(f"{at(i)} has {n} tokens, more than max_model_len={self.max_model_len}; "
                                 "shorten it or pass truncate_prompt_tokens")
            types = p.token_type_ids
            if types is not None and (min(types) < 0 or max(types) >= self.type_vocab_size):
                bad = next(t for t in types if t < 0 or t >= self.type_vocab_size)
                raise ValueError(f"{at(i)} has token type id {bad} outside the model's token types "
                                 f"[0, {self.type_vocab_size})")
        ends = list(accumulate(len(p.token_ids) for p in prompts))
        try:
            flat = np.fromiter(chain.from_iterable(p.token_ids for p in prompts), dtype=np.int64,
                               count=ends[-1] if ends else 0)
        except OverflowError:  # an id beyond int64: outside the vocabulary, found below
            flat = None
        if flat is None or (flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size)):
            i, bad = self._first_bad_id(prompts, flat, ends)
            raise ValueError(f"{at(i)} has token id {bad} outside the vocabulary [0, {self.vocab_size})")
        if self.images is not None:
            # The prompts holding a placeholder, each once (an image prompt holds hundreds).
            marks = [self.images.image_token_id, getattr(self.images, "video_token_id", None)]
            hits = np.searchsorted(ends, np.flatnonzero(np.isin(flat, [t for t in marks if t is not None])),
                                   side="right")
            i = next((int(i) for i in np.unique(hits) if prompts[i].mm is None), None)
            if i is not None:
                raise ValueError(f"{at(i)} has an image or video placeholder token but no image or video; pass "
                                 "it as {'prompt': ..., 'multi_modal_data': {'image': img}} ('video': frames)")
        for p, start, end in zip(prompts, [0] + ends[:-1], ends):
            p.id_array = flat[start:end]
        return prompts

    def _first_bad_id(self, prompts, flat, ends):
        """(prompt index, id) of the first token id outside the vocabulary."""
        if flat is not None:
            j = int(np.flatnonzero((flat < 0) | (flat >= self.vocab_size))[0])
            return bisect_right(ends, j), int(flat[j])
        return next((i, t) for i, p in enumerate(prompts) for t in p.token_ids if not 0 <= t < self.vocab_size)

    # Texts per tokenizer call: large enough for the fast tokenizer's parallel batch, small
    # enough that a progress bar moves on a large corpus.
    CHUNK = 8192
    # Prompts with images or videos past which their preparation (reading, resizing,
    # patching: milliseconds each, a video's frames more) shows a progress bar.
    MEDIA_BAR = 32

    def _tokenize(self, texts, pairs, k, side, add_special_tokens=True, progress=None):
        """progress: None, or a callable told how many texts each tokenizer call did. A
        text the tokenizer cannot take raises _BadText with its index in ``texts``."""
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass tokenizer=... or token ids")
        tok, out = self.tokenizer, []
        old = tok.truncation_side
        tok.truncation_side = side
        try:
            for lo in range(0, len(texts), self.CHUNK):
                chunk = texts[lo:lo + self.CHUNK]
                second = None if pairs is None else pairs[lo:lo + self.CHUNK]
                try:
                    enc = tok(chunk, text_pair=second, add_special_tokens=add_special_tokens,
                              truncation=k is not None, max_length=k, return_attention_mask=False,
                              return_token_type_ids=self.keep_token_types)
                except (TypeError, ValueError):
                    _find_unencodable(chunk, second, lo)
                    raise
                types = enc.get("token_type_ids") if self.keep_token_types else None
                out += [TokenizedPrompt(ids, types[i] if types is not None else None)
                        for i, ids in enumerate(enc["input_ids"])]
                if progress is not None:
                    progress(len(chunk))
        finally:
            tok.truncation_side = old
        return out

    # ------------------------------------------------------------------ public
    def process(self, prompts, truncate_prompt_tokens=None, truncation_side=None, what="prompts",
                add_special_tokens=True, progress=None, suffix=(), check=True):
        """prompts: the output of :func:`parse_prompts`, or (str, str) text pairs (as the
        tokenizer encodes a pair); truncate_prompt_tokens: one value for every prompt, or
        a list of one per prompt. Returns list[TokenizedPrompt].
        add_special_tokens=False is for text a chat template has already framed;
        progress: as in :meth:`_tokenize`; suffix: token ids appended to every prompt
        after truncation (a truncated prompt keeps room for them); check=False skips the
        length, vocabulary and placeholder checks (for a count, not for running)."""
        suffix = list(suffix)
        if isinstance(truncate_prompt_tokens, list):
            if len(truncate_prompt_tokens) != len(prompts):
                raise ValueError(f"{len(truncate_prompt_tokens)} truncation settings for {len(prompts)} {what}")
            limits = [self._limit(k, truncation_side, len(suffix)) for k in truncate_prompt_tokens]
        else:
            limits = [self._limit(truncate_prompt_tokens, truncation_side, len(suffix))] * len(prompts)
        for i, p in enumerate(prompts):
            if check and len(p) == 0:  # a count of an empty prompt is fine (0, or the special tokens)
                raise ValueError(f"{what}[{i}] is empty")
        if add_special_tokens and self.tokenizer is not None:
            self._check_room(prompts, limits, what, len(suffix))
        out: list[TokenizedPrompt | None] = [None] * len(prompts)
        texts_by_limit = {}  # one tokenizer call per distinct (k, side, pair or not)
        with_images = [i for i, p in enumerate(prompts) if isinstance(p, ImagePrompt)]
        for i, p in enumerate(prompts):
            if isinstance(p, ImagePrompt):
                continue
            if isinstance(p, (str, tuple)):
                texts_by_limit.setdefault((*limits[i], isinstance(p, tuple)), []).append(i)
                continue
            # p is parse_prompts' own copy: kept as is, or sliced (a new list).
            ids, types = (p.token_ids, p.token_type_ids) if isinstance(p, TokenizedPrompt) else (p, None)
            k, side = limits[i]
            if k is not None and len(ids) > k:
                cut = slice(None, k) if side == "right" else slice(-k, None)
                ids, types = ids[cut], (None if types is None else types[cut])
            out[i] = TokenizedPrompt(ids, types if self.keep_token_types else None)
        for (k, side, pairs), idx in texts_by_limit.items():
            firsts = [prompts[i][0] if pairs else prompts[i] for i in idx]
            seconds = [prompts[i][1] for i in idx] if pairs else None
            try:
                toks = self._tokenize(firsts, seconds, k, side, add_special_tokens, progress)
            except _BadText as e:  # e.index counts in this group: name the prompt itself
                raise ValueError(f"{what}[{idx[e.index]}] {e.message}") from None
            for i, tp in zip(idx, toks):
                out[i] = tp
        if with_images:
            if check:  # the other prompts first: their checks are cheap, reading images is not
                plain = [i for i in range(len(prompts)) if out[i] is not None]
                self._check([out[i] for i in plain], what, plain)
            self._with_images(prompts, with_images, limits, out, what, add_special_tokens, suffix, progress)
        if suffix:
            for tp in out:
                if tp.mm is None:  # an image prompt took its suffix before its positions were laid out
                    tp.token_ids = tp.token_ids + suffix
                    if tp.token_type_ids is not None:
                        tp.token_type_ids = tp.token_type_ids + [tp.token_type_ids[-1]] * len(suffix)
        return self._check(out, what) if check else out

    def _with_images(self, prompts, idx, limits, out, what, add_special_tokens, suffix=(), progress=None):
        """Fill out[i] for the prompts with images: placeholders expanded, images read
        into patches, rotary positions laid out. Such a prompt is never truncated (a cut
        could split an image's tokens), so one over the limit is an error. progress: as
        in :meth:`_tokenize`, told of each prompt done."""
        if self.images is None:
            raise ValueError(f"{what}[{idx[0]}] has images or videos, but this model takes text only")
        texts = [i for i in idx if isinstance(prompts[i].prompt, str)]
        ids = {i: prompts[i].prompt for i in idx}
        proc = self.images
        if texts:
            try:
                enc = self._tokenize([proc.prepare_text(prompts[i].prompt) for i in texts], None, None, "left",
                                     add_special_tokens)
            except _BadText as e:
                raise ValueError(f"{what}[{texts[e.index]}] {e.message}") from None
            ids.update((i, tp.token_ids) for i, tp in zip(texts, enc))

        def prepare(i):
            return proc.prompt(list(ids[i]) + list(suffix), prompts[i].images, f"{what}[{i}]")

        # Every prompt's checks that read no pixels come first, so that a bad prompt is
        # reported before any image is decoded or resized.
        for i in idx:
            bad = next((t for t in ids[i] if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{what}[{i}] has token id {bad} outside the vocabulary [0, {self.vocab_size})")
            proc.check(list(ids[i]) + list(suffix), prompts[i].images, f"{what}[{i}]")

        # Images are read on a few threads (decoding and resizing release the GIL); the
        # results are taken in prompt order, so the first bad prompt is the one reported.
        pool = _image_pool() if len(idx) > 1 else None
        if pool is not None:
            # A PIL image opened lazily decodes on first use, which is not safe from two
            # threads at once: each distinct one is decoded once first.
            lazy = {id(im): im for i in idx for im in prompts[i].images if hasattr(im, "load")}
            list(pool.map(_load, lazy.values()))
        for i, (tokens, mm) in zip(idx, pool.map(prepare, idx) if pool else map(prepare, idx)):
            where = f"{what}[{i}]"
            k = limits[i][0]
            if k is not None and len(tokens) > k + len(suffix):
                raise ValueError(f"{where} has images and {len(tokens)} tokens, more than the truncation limit "
                                 f"{k + len(suffix)}; a prompt with images is not truncated (use smaller images or "
                                 "a shorter text)")
            out[i] = TokenizedPrompt(tokens, None, mm)
            if progress is not None:
                progress(1)

    @functools.cached_property
    def image_placeholder(self) -> str:
        """The text that stands for one image (Qwen-VL: <|vision_start|><|image_pad|><|vision_end|>)."""
        if self.tokenizer is None:
            raise ValueError("scoring images needs the model's tokenizer")
        return self.images.placeholder_text(self.tokenizer)

    @functools.cached_property
    def video_placeholder(self) -> str | None:
        """The text that stands for one video (<|vision_start|><|video_pad|><|vision_end|>),
        or None for a model that takes no videos."""
        fn = getattr(self.images, "video_placeholder_text", None)
        return fn(self.tokenizer) if fn is not None and self.tokenizer is not None else None

    def process_pairs(self, data_1, data_2, truncate_prompt_tokens=None, truncation_side=None, template=None,
                      progress=None, names=("data_1", "data_2"), template_vars=None):
        """Cross-encoder pairs: 1:1, 1:N (one query, N documents) or N:N, of texts and
        (vision-language models) images, see :mod:`pyengine.score_items`. Returns
        list[TokenizedPrompt], one per pair. Without a template (``template``, else the
        model's own) each text pair is tokenised as the tokenizer does a text pair,
        keeping token_type_ids, and a pair with an image as query then document back to
        back; with one (see :mod:`pyengine.templates`) each pair is rendered into one text
        and tokenised as a prompt. The model's score suffix ends every prompt. names: what
        errors call the two sides; template_vars: more variables for the template (an
        ``instruction``; unused without a template)."""
        d1, d2 = pair_items(data_1, data_2, names)
        template = self.score_template if template is None else template
        images = [i for i, (q, d) in enumerate(zip(d1, d2)) if has_image(q) or has_image(d)]
        if images and self.images is None:
            i = images[0]
            img = next(x for x in (d1[i] if has_image(d1[i]) else d2[i]) if not isinstance(x, str))
            raise ValueError(f"pair {i} has an image or video ({img.where}), but this model takes text only")
        if template is not None:
            extra = dict(template_vars or {})
            rendered = render_with_images(load_score_template(template),
                                          lambda t, qs, ds: render_pairs(t, qs, ds, **extra), d1, d2,
                                          self.image_placeholder if images else None,
                                          self.video_placeholder if images else None)
        else:
            rendered = [((q, d), []) for q, d in zip(d1, d2)]
            if images:
                back_to_back = render_with_images(None, lambda _, qs, ds: [q + d for q, d in zip(qs, ds)],
                                                  [d1[i] for i in images], [d2[i] for i in images],
                                                  self.image_placeholder, self.video_placeholder)
                for i, r in zip(images, back_to_back):
                    rendered[i] = r
        prompts = [ImagePrompt(p, [x.load() for x in imgs]) if imgs else p for p, imgs in rendered]
        return self.process(prompts, truncate_prompt_tokens, truncation_side, what="pairs", progress=progress,
                            suffix=self.score_suffix)
