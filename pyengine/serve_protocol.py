"""Request bodies of the HTTP API, shaped like vLLM's pooling API, and their checks.

Field names and defaults follow vLLM's ``/classify``, ``/pooling``, ``/score`` and
``/rerank`` requests so existing clients work unchanged. Types are checked strictly
(a string where a bool belongs is an error, not a guess) and unknown fields are
ignored, as vLLM ignores them.
"""
from __future__ import annotations

import base64
import inspect
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import PreTrainedTokenizerBase

from .config import use_activation_of
from .inputs import all_ints
from .multimodal import image_from_data_url, video_from_data_url


class ApiError(Exception):
    """An error answered with ``status`` and a vLLM-style JSON error body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestEntityTooLargeError",
                499: "ClientClosedRequest", 500: "InternalServerError", 503: "ServiceUnavailableError"}


def error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": None,
                      "code": status}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    request_id: str | None = None
    priority: int = 0
    use_activation: bool | None = None
    # vLLM's older names for use_activation, which it still reads (the first one given
    # wins); normalize is an embedding model's option, refused when set.
    activation: bool | None = None
    softmax: bool | None = None
    normalize: bool | None = None
    # Taken as vLLM takes them: the salt has nothing to salt here (no prefix cache); the
    # processor and media settings are the server's (checked in pyengine.serve).
    cache_salt: str | None = Field(None, min_length=1)
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _activation_aliases(self):
        if self.normalize:
            raise ValueError("'normalize' applies to embedding models; this server serves classification "
                             "(use 'use_activation')")
        self.use_activation = use_activation_of(self.use_activation, self.activation, self.softmax)
        return self


class _TemplateVars(BaseModel):
    """What /score and /rerank pass to the score template besides query and document,
    as vLLM's: ``instruction`` (the Qwen3-Reranker template's) and ``chat_template_kwargs``;
    ``chat_template``: this request's score template (Jinja source), where the server
    trusts request templates."""
    instruction: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None

    def template_vars(self) -> dict:
        out = dict(self.chat_template_kwargs or {})
        if self.instruction is not None:
            out["instruction"] = self.instruction
        return out


class LoadLoRARequest(BaseModel):
    """POST /v1/load_lora_adapter: an adapter directory to serve as model ``lora_name``."""
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(BaseModel):
    """POST /v1/unload_lora_adapter: stop serving ``lora_name``."""
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class ClassifyRequest(_Common):
    """``input`` (str, [str], token ids or [token ids]) or chat ``messages``."""
    input: Any = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # None: True for input, False for messages (as vLLM)
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of 'input' and 'messages'")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("'add_generation_prompt' and 'continue_final_message' cannot both be true")
        return self


class PoolingRequest(ClassifyRequest):
    task: str | None = None
    # "bytes": the rows' raw bytes as the body, where each lies in the "metadata" header;
    # "bytes_only": the body alone (vLLM's binary formats)
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = "float"
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "little", "big"] = "native"
    dimensions: int | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize: a ``prompt``, or chat ``messages`` rendered as /classify renders them
    (but with add_generation_prompt on by default, as vLLM's /tokenize)."""
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("'add_generation_prompt' and 'continue_final_message' cannot both be true "
                             "(add_generation_prompt defaults to true here)")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids back to text."""
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int]


# vLLM accepts the score pair under any of these names.
SCORE_FIELDS = (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents"), ("queries", "items"))


# One side of a score pair: texts, content parts (images), or {"content": [parts]}
# (pyengine.score_items checks the parts).
ScoreSide = str | dict[str, Any] | list[str | dict[str, Any]]


class ScoreRequest(_TemplateVars, _Common):
    text_1: ScoreSide | None = None
    text_2: ScoreSide | None = None
    data_1: ScoreSide | None = None
    data_2: ScoreSide | None = None
    queries: ScoreSide | None = None
    documents: ScoreSide | None = None
    items: ScoreSide | None = None

    def pair(self):
        """(first, second, their field names) from whichever naming the client used."""
        for a, b in SCORE_FIELDS:
            x, y = getattr(self, a), getattr(self, b)
            if x is not None and y is not None:
                return x, y, (a, b)
        raise ApiError(400, "score needs 'text_1' and 'text_2' (or 'data_1'/'data_2', "
                            "'queries'/'documents', 'queries'/'items')")


class RerankRequest(_TemplateVars, _Common):
    query: str | dict[str, Any]
    documents: list[str | dict[str, Any]] | dict[str, Any] | str  # a string: one document, as vLLM takes it
    top_n: int = 0  # 0 or less: every document (as vLLM)


def validate(cls, data):
    """Build a request model from parsed JSON, or raise a 400 naming each bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err["loc"]) or "body"
            parts.append(f"{loc}: {err['msg']}")
        raise ApiError(400, "invalid request: " + "; ".join(parts)) from None


def parse_input(value) -> list:
    """``input`` into parse_prompts' form: a list of str and list[int]."""
    def ids(x):
        return isinstance(x, list) and all_ints(x)

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return list(value)
        if ids(value):
            return [list(value)]
        if all(isinstance(x, list) and x and ids(x) for x in value):
            return [list(x) for x in value]
    if isinstance(value, list) and not value:
        raise ApiError(400, "input is an empty list")
    raise ApiError(400, "input must be a string, a list of strings, a list of token ids or a list of "
                        f"token-id lists, got {type(value).__name__}")


# apply_chat_template's own arguments that chat_template_kwargs may set, as vLLM lets it
# (overriding the request's fields); the others would change what the call returns (token
# ids, a dict, tensors) or which template runs.
_TEMPLATE_ARGS = {"tools", "documents", "add_generation_prompt", "continue_final_message"}
_RESERVED = (set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
             - {"self", "kwargs", "conversation"} - _TEMPLATE_ARGS)


def _message_text(content, where):
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text is served here
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{j}] must be a text part "
                                    "{'type': 'text', 'text': str}; this model takes text only")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts")


def decode_image(url, where):
    """An ``image_url`` part's image: a base64 data URL, decoded with pillow (the server
    fetches nothing)."""
    try:
        return image_from_data_url(url, where)
    except (TypeError, ValueError) as e:
        raise ApiError(400, str(e)) from None


def decode_video(url, where):
    """A ``video_url`` part's frames: JPEG frames in one data URL (pyengine.multimodal)."""
    try:
        return video_from_data_url(url, where)
    except (TypeError, ValueError) as e:
        raise ApiError(400, str(e)) from None


def _message_parts(content, where, media):
    """Content parts with images or videos: text parts kept, each image_url (video_url)
    part decoded into ``media["image"]`` (``media["video"]``) and replaced by {'type':
    'image'} ({'type': 'video'}) for the chat template to place."""
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "video_url"):
            url = part.get(kind)
            url, at = (url.get("url") if isinstance(url, dict) else url), f"{where}.content[{j}]"
            image = kind == "image_url"
            media["image" if image else "video"].append(decode_image(url, at) if image else decode_video(url, at))
            parts.append({"type": "image" if image else "video"})
        else:
            raise ApiError(400, f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}}, an "
                                "image part {'type': 'image_url', 'image_url': {'url': 'data:...'}} or a video "
                                "part {'type': 'video_url', 'video_url': {'url': 'data:video/jpeg;base64,...'}}")
    return parts


def render_chat(tokenizer, req: ClassifyRequest, default_template: str | None = None, media=None) -> str:
    """The prompt text the chat template (the request's, else ``default_template``, the
    server's, else the tokenizer's) makes of ``req.messages``. media: None for a
    text-only model; else {"image": [], "video": []}, which receive the decoded images of
    image_url parts and the frames of video_url parts, in order (those messages reach the
    template as parts: {'type': 'image'}, {'type': 'video'})."""
    if tokenizer is None:
        raise ApiError(400, "chat messages need a tokenizer, and this model was loaded without one")
    if not req.messages:
        raise ApiError(400, "messages is an empty list")
    msgs = []
    for i, m in enumerate(req.messages):
        if not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] needs a string 'role'")
        content, where = m.get("content", ""), f"messages[{i}]"
        with_media = media is not None and isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") in ("image_url", "video_url") for p in content)
        content = _message_parts(content, where, media) if with_media else _message_text(content, where)
        msgs.append({**m, "content": content})
    kwargs = {"add_generation_prompt": req.add_generation_prompt,
              "continue_final_message": req.continue_final_message, **(req.chat_template_kwargs or {})}
    clash = sorted(set(kwargs) & (_RESERVED | {"conversation"}))
    if clash:
        raise ApiError(400, f"chat_template_kwargs may not set {clash}")
    template = req.chat_template if req.chat_template is not None else default_template
    if template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ApiError(400, "the tokenizer has no chat template; start the server with --chat-template (or send "
                            "'chat_template' to a server run with --trust-request-chat-template)")
    try:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - a template fault is the caller's template or messages
        raise ApiError(400, f"cannot render the chat template: {type(e).__name__}: {e}") from None


def pooled_bytes(row, dtype: str, endianness: str) -> bytes:
    """One pooled row's values in vLLM's embed_dtype and byte order."""
    # Each value's bytes as the dtype stores them (bfloat16 and fp8 through torch, as raw
    # 2- and 1-byte integers), then swapped where another byte order is asked for.
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[dtype]
    as_int = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[torch_dtype.itemsize]
    arr = row.to(torch_dtype).view(as_int).numpy()
    if endianness != "native" and arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder("<" if endianness == "little" else ">"))
    return arr.tobytes()


def encode_floats(row, fmt: str, dtype: str, endianness: str):
    """One pooled row as a JSON list, or base64 of its bytes (vLLM's encoding_format)."""
    if fmt == "float":
        return row.tolist()
    return base64.b64encode(pooled_bytes(row, dtype, endianness)).decode("ascii")


def bytes_body(rows, dtype: str, endianness: str):
    """vLLM's "bytes" encoding of pooled rows: (body, items), the body every row's bytes
    one after the other, items where each lies: index, embed_dtype, endianness, start,
    end (byte offsets into the body) and shape."""
    chunks, items, offset = [], [], 0
    for i, row in enumerate(rows):
        data = pooled_bytes(row, dtype, endianness)
        items.append({"index": i, "embed_dtype": dtype, "endianness": endianness, "start": offset,
                      "end": offset + len(data), "shape": list(row.shape)})
        chunks.append(data)
        offset += len(data)
    return b"".join(chunks), items
