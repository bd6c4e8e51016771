"""HTTP server with vLLM's pooling API: /classify, /pooling, /score, /rerank, /tokenize.

    python -m pyengine.serve --model DIR --host 127.0.0.1 --port 8000

Concurrent requests share ragged batches: each request is checked and tokenised on
its own (so one bad request fails alone), then its sequences join the engine core's
queue, which one worker thread packs under the token budget (see async_engine). A
client that disconnects has its queued sequences dropped. Needs the ``serve`` extra
(fastapi, uvicorn).

LoRA adapters (``--enable-lora --lora-modules NAME=PATH ...``) are served as extra
model names, as vLLM does: a request whose ``model`` is an adapter's name runs with it.
With ``--allow-runtime-lora-updating``, ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` add and remove them while the server runs.

``--chat-template`` (a file or Jinja source), as vLLM's flag: the chat template of
/classify requests with messages that bring none, and, where it uses ``query`` and
``document`` (see :mod:`pyengine.templates`), the score template of /score and /rerank.
A request's own ``chat_template`` is refused (400) unless the server runs with
``--trust-request-chat-template``, as vLLM's: a template is code, and one that loops long
enough holds the tokenizer thread every request goes through.

``--api-key KEY`` (or ``PYENGINE_API_KEY``) makes every route but the probes (/health,
/ping, /metrics, /version) answer 401 unless the request carries ``Authorization: Bearer
KEY``; ``--ssl-keyfile`` / ``--ssl-certfile`` serve HTTPS.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("pyengine.serve needs fastapi and uvicorn: pip install 'fastapi>=0.110' 'uvicorn>=0.29'") from e

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import EngineCore
from .inputs import parse_prompts
from .lora import LoRARequest
from .metrics import Metrics
from .pooler import score_activation
from .score_items import item, split_side
from . import __version__
from .serve_protocol import (ApiError, ClassifyRequest, DetokenizeRequest, LoadLoRARequest, PoolingRequest,
                             RerankRequest, ScoreRequest, TokenizeRequest, UnloadLoRARequest, bytes_body,
                             encode_floats, error_body, parse_input, render_chat, validate)
from .templates import load_score_template, read_template

log = logging.getLogger("pyengine.serve")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


async def _wait_disconnect(request: Request):
    # After the body is read, the server's receive() only returns at disconnect.
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.01)


class Server:
    """The routes over one EngineCore. ``names``: the served model names (the first is
    the one responses report); ``max_inputs``: inputs (or pairs) one request may hold;
    ``lora_modules``: {name: adapter directory}, each loaded and checked here;
    ``allow_runtime_lora``: add the routes that load and unload adapters;
    ``chat_template``: Jinja source or a file of it (see the module's docstring);
    ``api_keys``: bearer tokens, one of which every route but the probes requires;
    ``trust_request_chat_template``: accept a ``chat_template`` in a request's body."""

    # Routes open without a key: liveness and monitoring probes rarely carry one.
    OPEN_ROUTES = frozenset({"/health", "/ping", "/metrics", "/version"})

    def __init__(self, core: EngineCore, names: list[str], max_inputs: int = 1024,
                 max_request_bytes: int = 64 << 20, lora_modules: dict | None = None,
                 allow_runtime_lora: bool = False, chat_template: str | None = None,
                 api_keys: list[str] | None = None, trust_request_chat_template: bool = False):
        if max_inputs < 1:
            raise ValueError(f"max_inputs must be positive, got {max_inputs}")
        if api_keys is not None and (not isinstance(api_keys, (list, tuple)) or
                                     not all(isinstance(k, str) and k for k in api_keys)):
            raise ValueError("api_keys must be a list of non-empty strings")
        self.api_keys = [k.encode() for k in api_keys or ()]
        self.chat_template = None if chat_template is None else read_template(chat_template, "chat_template")
        self.score_template = None
        self.trust_request_chat_template = bool(trust_request_chat_template)
        if self.chat_template is not None and "query" in self.chat_template and "document" in self.chat_template:
            self.score_template = load_score_template(self.chat_template)
        if allow_runtime_lora and core.lora is None:
            raise ValueError("runtime LoRA updating needs an engine with LoRA enabled (enable_lora=True)")
        self.allow_runtime_lora = allow_runtime_lora
        self.loras, self._lora_ids = {}, itertools.count(1)
        self._loading = set()  # adapter names being loaded: a second load of one is refused
        for name, path in (lora_modules or {}).items():
            if name in names:
                raise ValueError(f"LoRA module name {name!r} is also a served model name")
            self.loras[name] = LoRARequest(name, next(self._lora_ids), path)
            core.lora_adapters(self.loras[name], 1)  # fails now on a bad adapter, or with LoRA off
        self.core, self.names, self.max_inputs = core, list(names), max_inputs
        self.max_request_bytes = max_request_bytes
        self.metrics = Metrics()
        self.engine: AsyncEngine | None = None
        self.created = int(time.time())
        id2label = getattr(core.hf_config, "id2label", None) or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(core.num_labels)]

    # ------------------------------------------------------------------ plumbing
    async def _read(self, request: Request, cls):
        """Body -> validated request model, with the checks every pooling route shares."""
        req = validate(cls, await self._body(request))
        if request.headers.get("x-request-id") and "request_id" in type(req).model_fields:
            # vLLM's precedence: the header, then the body's field
            req.request_id = request.headers["x-request-id"]
        if req.model == "":  # as vLLM: no name is the served model
            req.model = None
        if req.model is not None and req.model not in self.names and req.model not in self.loras:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves "
                                f"{self.names + list(self.loras)}")
        if getattr(req, "chat_template", None) is not None and not self.trust_request_chat_template:
            raise ApiError(400, "Chat template is passed with request, but --trust-request-chat-template is not "
                                "set. Refused request with untrusted chat template.")
        if getattr(req, "priority", 0) != 0:
            raise ApiError(400, "priority scheduling is not enabled on this server; priority must be 0")
        for name, flag in (("mm_processor_kwargs", "--mm-processor-kwargs"), ("media_io_kwargs", None)):
            if getattr(req, name, None):
                where = f"; set them for the whole server with {flag}" if flag else ""
                raise ApiError(400, f"{name} per request is not supported{where}")
        return req

    async def _body(self, request: Request):
        """The parsed JSON body, within the size limit."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {self.max_request_bytes}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_request_bytes:
                    raise ApiError(413, f"request body is over the limit of {self.max_request_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect:  # the client left while sending: not a server fault
            raise ClientGone() from None
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON body: nested too deeply") from None

    def _check_count(self, n: int, what: str):
        if n > self.max_inputs:
            raise ApiError(413, f"{n} {what} in one request; the limit is {self.max_inputs} "
                                "(--max-inputs-per-request)")

    def _activation(self, use_activation, kind):
        if use_activation is None:
            use_activation = self.core.cfg.pooler_config.use_activation
        return kind if use_activation else None

    async def _run(self, request, stats, req, prepare, *args):
        """Tokenise (``prepare(req, *args)`` on the tokenizer thread, where ``req``'s
        adapter is loaded too) then run; abandoned if the client goes away meanwhile.
        Returns (prompts, outputs)."""
        lora = self.loras.get(req.model)

        def prepare_all():
            adapter = None if lora is None else self.core.lora_adapters(lora, 1)[0]
            return *prepare(req, *args), adapter

        async def work():
            prompts, activation, adapter = await self.engine.preprocess(prepare_all)
            return prompts, await self.engine.run(prompts, activation, adapter)

        task = asyncio.ensure_future(work())
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the client left first
                task.cancel()  # cancels engine.run, which aborts the queued sequences
                await asyncio.wait({task})
        finally:
            watch.cancel()
            if not task.done():  # this handler itself was cancelled
                task.cancel()
        if task.cancelled():
            stats["aborted"] = True
            raise ClientGone()
        prompts, out = task.result()
        stats["tokens"] = sum(len(p.token_ids) for p in prompts)
        stats["inputs"] = len(prompts)
        return prompts, out

    def _usage(self, stats):
        return {"prompt_tokens": stats["tokens"], "total_tokens": stats["tokens"], "completion_tokens": 0,
                "prompt_tokens_details": None}

    def _model_name(self, req):
        """The name a response reports: the adapter's, or the first served name."""
        return req.model if req.model in self.loras else self.names[0]

    def _head(self, prefix, req):
        return {"id": f"{prefix}-{req.request_id or uuid.uuid4().hex}", "object": "list",
                "created": int(time.time()), "model": self._model_name(req)}

    # ------------------------------------------------------------------ tokenizer thread
    def _chat_prompt(self, req):
        """``req.messages`` rendered into one parsed prompt (with its images and videos, if any)."""
        media = {"image": [], "video": []} if self.core.inputs.images is not None else None
        text = render_chat(self.core.tokenizer, req, self.chat_template, media)
        data = {k: v for k, v in (media or {}).items() if v}
        return parse_prompts({"prompt": text, "multi_modal_data": data} if data else text)

    def _prepare_single(self, req: ClassifyRequest, prompts):
        """Messages or parsed input -> (TokenizedPrompts, activation)."""
        if req.messages is not None:
            prompts = self._chat_prompt(req)
            what, special = "messages", bool(req.add_special_tokens)
        else:
            what, special = "input", req.add_special_tokens is not False
        toks = self.core.inputs.process(prompts, req.truncate_prompt_tokens, req.truncation_side, what, special)
        return toks, self._activation(req.use_activation, self.core.classify_act)

    def _tokenize(self, req: TokenizeRequest):
        """The token ids the engine would run for ``req`` (images expanded), unchecked
        against the length limit: a client asks in order to compare with it."""
        if self.core.tokenizer is None:
            raise ApiError(400, "this model was loaded without a tokenizer")
        if req.messages is not None:
            prompts, special = self._chat_prompt(req), bool(req.add_special_tokens)
        else:
            prompts, special = [req.prompt], req.add_special_tokens is not False
        return self.core.inputs.process(prompts, None, None, "prompt", special, check=False)[0].token_ids

    def _prepare_pairs(self, req, first, second, names):
        template = self.score_template
        if req.chat_template is not None:  # _read refused it unless request templates are trusted
            if "{" not in req.chat_template:  # never a path: a request names no file on this disk
                raise ApiError(400, "chat_template must be Jinja source")
            template = load_score_template(req.chat_template)
        toks = self.core.inputs.process_pairs(first, second, req.truncate_prompt_tokens, req.truncation_side,
                                              template, names=names, template_vars=req.template_vars())
        return toks, self._activation(req.use_activation, score_activation(self.core.hf_config))

    # ------------------------------------------------------------------ routes
    async def _run_single(self, request, stats, req: ClassifyRequest):
        prompts = parse_input(req.input) if req.input is not None else None
        self._check_count(len(prompts) if prompts is not None else 1, "inputs")
        _, out = await self._run(request, stats, req, self._prepare_single, prompts)
        return out

    async def classify(self, request, stats):
        req = await self._read(request, ClassifyRequest)
        out = await self._run_single(request, stats, req)
        data = [{"index": i, "label": self.labels[int(row.argmax())], "probs": row.tolist(),
                 "num_classes": row.numel()} for i, row in enumerate(out)]
        return {**self._head("classify", req), "data": data, "usage": self._usage(stats)}

    async def pooling(self, request, stats):
        req = await self._read(request, PoolingRequest)
        if req.task not in (None, "classify"):
            raise ApiError(400, f"task {req.task!r} is not supported; this server serves task 'classify'")
        if req.dimensions is not None:
            raise ApiError(400, "'dimensions' applies to embedding models; this is a classifier")
        out = await self._run_single(request, stats, req)
        if req.encoding_format in ("bytes", "bytes_only"):
            body, items = bytes_body(out, req.embed_dtype, req.endianness)
            headers = None
            if req.encoding_format == "bytes":
                # ASCII JSON (json.dumps escapes the rest), as a header value must be
                head = self._head("pool", req)
                meta = {k: head[k] for k in ("id", "created", "model")}
                headers = {"metadata": json.dumps({**meta, "data": items, "usage": self._usage(stats)})}
            return Response(body, media_type="application/octet-stream", headers=headers)
        data = [{"index": i, "object": "pooling",
                 "data": encode_floats(row, req.encoding_format, req.embed_dtype, req.endianness)}
                for i, row in enumerate(out)]
        return {**self._head("pool", req), "data": data, "usage": self._usage(stats)}

    def _need_cross_encoder(self):
        if self.core.num_labels != 1:
            raise ApiError(400, f"score and rerank need a cross-encoder (num_labels == 1); this model has "
                                f"num_labels={self.core.num_labels}")

    async def score(self, request, stats):
        req = await self._read(request, ScoreRequest)
        self._need_cross_encoder()
        first, second, names = req.pair()
        self._check_count(max(len(split_side(side, name)) for side, name in zip((first, second), names)), "pairs")
        _, out = await self._run(request, stats, req, self._prepare_pairs, first, second, names)
        data = [{"index": i, "object": "score", "score": float(row[0])} for i, row in enumerate(out)]
        return {**self._head("score", req), "data": data, "usage": self._usage(stats)}

    async def rerank(self, request, stats):
        req = await self._read(request, RerankRequest)
        self._need_cross_encoder()
        sides = split_side(req.documents, "documents")
        self._check_count(len(sides), "documents")
        n = len(split_side(req.query, "query"))
        if n != 1:
            raise ApiError(400, f"rerank takes one query; 'query' holds {n} items")
        docs = [item(x, where) for x, where in sides]  # images are decoded on the tokenizer thread
        _, out = await self._run(request, stats, req, self._prepare_pairs, req.query, docs, ("query", "documents"))
        scores = [float(row[0]) for row in out]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep input order
        if req.top_n > 0:
            order = order[:req.top_n]
        # vLLM's RerankDocument: a string document as text, any other (a content part) as it came
        results = [{"index": i, "document": {"text": sides[i][0], "multi_modal": None} if isinstance(sides[i][0], str)
                    else {"text": None, "multi_modal": sides[i][0]}, "relevance_score": scores[i]} for i in order]
        return {"id": f"rerank-{req.request_id or uuid.uuid4().hex}", "model": self._model_name(req),
                "usage": {"prompt_tokens": stats["tokens"], "total_tokens": stats["tokens"]}, "results": results}

    async def tokenize(self, request, stats):
        req = await self._read(request, TokenizeRequest)
        ids = await self.engine.preprocess(self._tokenize, req)
        strs = self.core.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.core.max_model_len, "tokens": ids, "token_strs": strs}

    async def detokenize(self, request, stats):
        req = await self._read(request, DetokenizeRequest)
        tok, vocab = self.core.tokenizer, self.core.inputs.vocab_size
        if tok is None:
            raise ApiError(400, "this model was loaded without a tokenizer")
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})")
        return {"prompt": tok.decode(req.tokens)}

    async def load_lora(self, request, stats):
        req = validate(LoadLoRARequest, await self._body(request))
        if req.lora_name in self.names or req.lora_name in self.loras or req.lora_name in self._loading:
            raise ApiError(400, f"The lora adapter '{req.lora_name}' has already been loaded.")
        lora = LoRARequest(req.lora_name, next(self._lora_ids), req.lora_path)
        self._loading.add(req.lora_name)  # held across the await, so a concurrent load of the name fails
        try:  # read and checked on the tokenizer thread, which alone touches the adapter cache
            await self.engine.preprocess(self.core.lora_adapters, lora, 1)
        except FileNotFoundError as e:
            raise ApiError(400, str(e)) from None
        finally:
            self._loading.discard(req.lora_name)
        self.loras[req.lora_name] = lora
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def unload_lora(self, request, stats):
        req = validate(UnloadLoRARequest, await self._body(request))
        lora = self.loras.pop(req.lora_name, None)
        if lora is None:
            raise ApiError(404, f"The lora adapter '{req.lora_name}' cannot be found.")
        await self.engine.preprocess(self.core.lora.drop, lora.lora_int_id)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    # ------------------------------------------------------------------ app
    async def _serve(self, route: str, request: Request, handler) -> Response:
        """Run one POST route: map errors to vLLM-style bodies and record metrics."""
        t0 = time.perf_counter()
        stats = {"tokens": 0, "inputs": 0, "aborted": False}
        self.metrics.request_started()
        try:
            body = await handler(request, stats)
            try:
                resp = body if isinstance(body, Response) else JSONResponse(body)
            except ValueError as e:  # JSON has no NaN or infinity: the model's fault, not the request's
                raise RuntimeError(f"the output cannot be sent as JSON: {e}") from None
        except ApiError as e:
            resp = _error(e.status, e.message)
        except (ValueError, TypeError) as e:  # the input checks' errors: the request was bad
            resp = _error(400, str(e))
        except ClientGone:
            stats["aborted"] = True
            resp = Response(status_code=499)  # nobody reads it; the status is for metrics
        except Exception as e:  # noqa: BLE001 - answer 500 and stay up
            log.exception("%s failed", route)
            resp = _error(500, f"{type(e).__name__}: {e}")
        except BaseException:  # cancelled (server shutdown): still balance the in-flight gauge
            self.metrics.request_done(route, 499, time.perf_counter() - t0)
            raise
        ok = resp.status_code == 200
        self.metrics.request_done(route, resp.status_code, time.perf_counter() - t0,
                                  stats["tokens"] if ok else 0, stats["inputs"] if ok else 0, stats["aborted"])
        return resp

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip().encode()
        # Every key is compared, in constant time: how long a check takes says nothing.
        hits = [secrets.compare_digest(token, k) for k in self.api_keys]
        return scheme.lower() == "bearer" and any(hits)

    def build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.engine = AsyncEngine(self.core, on_step=self.metrics.step_done)
            try:
                yield
            finally:
                self.engine.shutdown()

        app = FastAPI(title="pyengine", lifespan=lifespan)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, exc):  # unknown routes and methods, in the same error shape
            return _error(exc.status_code, str(exc.detail))

        if self.api_keys:
            @app.middleware("http")
            async def authenticate(request: Request, call_next):
                if request.url.path in self.OPEN_ROUTES or self._authorized(request):
                    return await call_next(request)
                resp = _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return resp

        routes = {"/classify": self.classify, "/pooling": self.pooling, "/score": self.score,
                  "/v1/score": self.score, "/rerank": self.rerank, "/v1/rerank": self.rerank,
                  "/v2/rerank": self.rerank, "/tokenize": self.tokenize, "/detokenize": self.detokenize}
        if self.allow_runtime_lora:
            routes.update({"/v1/load_lora_adapter": self.load_lora, "/v1/unload_lora_adapter": self.unload_lora})
        def endpoint_for(path, handler):  # a closure: FastAPI would read default args as query params
            async def endpoint(request: Request):
                return await self._serve(path, request, handler)
            return endpoint

        for path, handler in routes.items():
            app.add_api_route(path, endpoint_for(path, handler), methods=["POST"])

        @app.get("/health")
        async def health():
            ok = self.engine is not None and self.engine.alive
            return Response(status_code=200 if ok else 503)

        app.add_api_route("/ping", health, methods=["GET", "POST"])  # vLLM's (SageMaker's) liveness route

        @app.get("/version")
        async def version():
            return {"version": __version__}

        @app.get("/v1/models")
        async def models():
            card = {"object": "model", "created": self.created, "owned_by": "pyengine",
                    "root": str(self.core.cfg.model), "parent": None, "max_model_len": self.core.max_model_len,
                    "permission": []}
            data = [{"id": n, **card} for n in self.names]
            data += [{"id": n, **card, "root": str(r.lora_path), "parent": self.names[0]}
                     for n, r in self.loras.items()]
            return {"object": "list", "data": data}

        @app.get("/metrics")
        async def metrics():
            depth = self.engine.num_waiting() if self.engine is not None else 0
            return PlainTextResponse(self.metrics.render(depth), media_type="text/plain; version=0.0.4")

        return app


def serve_in_thread(app, host="127.0.0.1", port=0, timeout=60.0, **uvicorn_config):
    """Start ``app`` on a background thread; returns (base_url, stop). Port 0 picks a
    free port (the socket is bound here, so there is no race for it). uvicorn_config:
    more of uvicorn.Config's keywords (``ssl_keyfile``, ``ssl_certfile``: an https URL)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **uvicorn_config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="pyengine-http")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(timeout)
        sock.close()

    scheme = "https" if uvicorn_config.get("ssl_certfile") else "http"
    return f"{scheme}://{host}:{sock.getsockname()[1]}", stop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyengine.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kernel-backend", default="auto")
    p.add_argument("--convert", default="auto")
    p.add_argument("--runner", default="auto", help="auto or pooling (the only runner)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--hf-overrides", type=json.loads, default=None, help="JSON object")
    p.add_argument("--pooler-config", type=json.loads, default=None, help="JSON object")
    p.add_argument("--mm-processor-kwargs", type=json.loads, default=None,
                   help="JSON object: image and video preprocessing of a vision-language model (Qwen-VL: min_pixels, "
                        "max_pixels, fps; "
                        "Nemotron VL: min_dynamic_patch, max_dynamic_patch, dynamic_image_size)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients may use in 'model' (default: --model); the first is reported")
    p.add_argument("--enable-lora", action="store_true", help="accept LoRA adapters (--lora-modules)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="PEFT LoRA adapters served under their own model names")
    p.add_argument("--max-loras", type=int, default=1, help="adapters kept loaded at once")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter add and remove adapters")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                   help="chat template for /classify messages; with query and document, the score template "
                        "of /score and /rerank (vLLM's score template files work as they are)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a 'chat_template' in request bodies (refused by default: a template is code "
                        "the tokenizer thread runs)")
    p.add_argument("--max-inputs-per-request", type=int, default=1024)
    p.add_argument("--max-request-bytes", type=int, default=64 << 20)
    p.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but the probes "
                        "(default: the PYENGINE_API_KEY environment variable, if set)")
    p.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key")
    p.add_argument("--ssl-certfile", default=None, help="and this certificate")
    p.add_argument("--log-level", default="info")
    return p


def _lora_modules(parser, specs):
    modules = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--lora-modules takes NAME=PATH entries, got {spec!r}")
        if name in modules:
            parser.error(f"--lora-modules names {name!r} twice")
        modules[name] = path
    return modules


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    lora_modules = _lora_modules(parser, args.lora_modules)
    if (lora_modules or args.allow_runtime_lora_updating) and not args.enable_lora:
        parser.error("--lora-modules and --allow-runtime-lora-updating need --enable-lora")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        parser.error("--ssl-keyfile and --ssl-certfile go together")
    for f in (args.ssl_keyfile, args.ssl_certfile):
        if f is not None and not os.path.isfile(f):
            parser.error(f"{f!r} does not exist")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    core = EngineCore(EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, hf_overrides=args.hf_overrides, pooler_config=args.pooler_config,
        kernel_backend=args.kernel_backend, convert=args.convert, runner=args.runner, enforce_eager=args.enforce_eager,
        enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        mm_processor_kwargs=args.mm_processor_kwargs))
    api_keys = args.api_key or ([os.environ["PYENGINE_API_KEY"]] if os.environ.get("PYENGINE_API_KEY") else None)
    server = Server(core, args.served_model_name or [args.model], args.max_inputs_per_request,
                    args.max_request_bytes, lora_modules, args.allow_runtime_lora_updating, args.chat_template,
                    api_keys, args.trust_request_chat_template)
    uvicorn.run(server.build_app(), host=args.host, port=args.port, log_level=args.log_level.lower(),
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)


if __name__ == "__main__":
    main()
