"""The engine core: a loop over a request queue.

``EngineCore.step()`` schedules ragged batches from the waiting requests, launches
them and finishes the oldest batch in flight. ``LLM`` (:mod:`pyengine.llm`) adds a
call's requests and steps until they are done; ``AsyncLLM`` and the HTTP server drive
the same core from a worker thread (:mod:`pyengine.async_engine`).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from . import cuda_graph
from .batch import RaggedBatch
from .config import EngineConfig
from .inputs import InputProcessor, TokenizedPrompt
from .kernels import _tuned
from .lora import LoRAAdapter, LoRABatch, LoRAManager
from .models import model_class, resolve_architecture
from .models.convert import resolve_token_ids
from .models.loader import iter_weights, load_hf_config
from .multimodal import ImageProcessor, MMBatch
from .ops import resolve_ops
from .pooler import Pooler, classify_activation
from .scheduler import WaitingQueue


class BatchError(RuntimeError):
    """A batch failed, while being launched or while its results were awaited.
    ``request_ids`` are the requests it held (less any aborted meanwhile), already taken
    off the engine; every other request, waiting or in flight, is untouched."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids


@dataclass
class Request:
    request_id: str
    prompt: TokenizedPrompt
    activation: str | None  # None: raw logits
    lora: LoRAAdapter | None = None
    arrival: float = field(default_factory=time.monotonic)
    output: torch.Tensor | None = None  # (num_labels,) fp32 on the host once finished


class _Done:
    """The event of work that was finished when it was launched (any non-CUDA device)."""

    @staticmethod
    def synchronize():
        pass

    @staticmethod
    def query() -> bool:
        return True


DONE = _Done()


class PendingBatch:
    """One launched batch. ``output``: (B, num_labels) fp32 on the host, valid once
    ``ready`` (a ``torch.cuda.Event``, or :data:`DONE`) has completed; ``pinned``: the
    output is a pinned staging buffer; ``requests`` are set by the engine, in row order."""

    __slots__ = ("output", "ready", "pinned", "requests")

    def __init__(self, output: torch.Tensor, ready=DONE, pinned: bool = False):
        self.output = output
        self.ready = ready
        self.pinned = pinned
        self.requests: list[Request] = []

    def wait(self) -> torch.Tensor:
        """Block until the batch is done; returns (B, num_labels) fp32 on the host. A CUDA
        error raised by the batch's kernels surfaces here."""
        self.ready.synchronize()
        if self.pinned:
            # A pageable copy lets the pinned block go back to torch's host cache now,
            # not when the caller drops the last result row.
            return self.output.clone()
        return self.output


# Files holding a tokenizer's vocabulary, one of which every saved tokenizer that has one
# comes with. Without any, transformers would build a default tokenizer with an empty
# vocabulary for some model types (BERT's: every word becomes [UNK]) instead of failing,
# even where a tokenizer_config.json is there.
_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "spm.model",
                "sentencepiece.bpe.model", "tokenizer.model")
_TOKENIZER_FILES = _VOCAB_FILES + ("tokenizer_config.json",)


def _has_vocab(path) -> bool:
    names = os.listdir(path)
    return any(n in _VOCAB_FILES or n.endswith((".model", ".tiktoken")) for n in names)


def load_tokenizer(cfg: EngineConfig):
    """The tokenizer of ``cfg`` (its ``tokenizer`` or the model's own files), or None for
    a checkpoint without tokenizer files (token-id prompts only); ValueError for files a
    tokenizer cannot be built from."""
    from transformers import AutoTokenizer

    tok = cfg.tokenizer
    if tok is not None and not isinstance(tok, (str, os.PathLike)):
        return tok  # already a tokenizer object
    source = tok if tok is not None else cfg.model
    if not isinstance(source, (str, os.PathLike)):
        source = getattr(getattr(source, "config", None), "_name_or_path", None)
        if not source or not os.path.isdir(source):
            return None  # a model instance with no local tokenizer: token-id prompts only
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in _TOKENIZER_FILES):
        if tok is not None:
            raise ValueError(f"tokenizer directory {os.fspath(source)!r} has no tokenizer files "
                             f"(any of {', '.join(_TOKENIZER_FILES)})")
        return None  # a checkpoint without a tokenizer: token-id prompts only
    if os.path.isdir(source) and not _has_vocab(source):
        raise ValueError(f"{os.fspath(source)!r} has tokenizer settings but no vocabulary (none of "
                         f"{', '.join(_VOCAB_FILES)}): a tokenizer built from them would read every word as "
                         "unknown; add the tokenizer's files, or pass tokenizer=<a loaded tokenizer>")
    try:
        # Never remote code: a config.json with an auto_map would otherwise ask on stdin.
        return AutoTokenizer.from_pretrained(os.fspath(source), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - files that are there but unreadable (tokenizers raises Exception): say so
        raise ValueError(f"cannot load the tokenizer from {os.fspath(source)!r}: {type(e).__name__}: {e}") from e


class EngineCore:
    """Owns the model, the tokenizer-side limits, the waiting queue and the batches in
    flight.

    ``pipeline_depth`` is how many batches may be in flight at once: 2 on CUDA, where
    :meth:`step` launches batch N+1 (host-side batch building, kernel launches) while
    the GPU still runs batch N, and only then waits for N; 1 elsewhere, where a launch
    finishes the work. Any depth goes through the same code, so depth 2 is tested on
    the CPU too.
    """

    # A request older than this is scheduled next, whatever its length.
    MAX_WAIT_S = 2.0
    # On the CPU batches are filled to this many tokens (a longer prompt runs alone): a
    # pass over more works out of cache. On 2 cores, fp32, against 16384 in interleaved
    # runs: BERT (hidden 256, 4 layers, 256 mixed prompts) 88 -> 124 seq/s, MiniLM-L6
    # 25.5 -> 31.4; 2048 was no faster than 4096, 8192 in between.
    CPU_BATCH_TOKENS = 4096

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.device = cfg.torch_device
        self.hf_config = load_hf_config(cfg.model, cfg.hf_overrides)
        self.arch = resolve_architecture(self.hf_config, cfg.convert)
        # Loaded before the model: a head built from classifier_from_token needs token ids.
        self.tokenizer = load_tokenizer(cfg)
        resolve_token_ids(self.hf_config, self.tokenizer)
        self.ops = resolve_ops(cfg.kernel_backend, self.device)
        if set(self.ops.chosen.values()) - {"torch"}:
            _tuned.check(self.device)  # a bad tuned-configs file fails here, not mid-batch
        pooling = cfg.pooler_config.pooling_type.lower() if cfg.pooler_config.pooling_type else None
        cls = model_class(self.arch)
        self.model = cls(self.hf_config, self.arch, cfg.torch_dtype, self.device, self.ops, pooling)
        self.num_labels = self.model.num_labels
        limit = self.model.max_model_len
        if cfg.max_model_len is not None and cfg.max_model_len > limit:
            raise ValueError(f"max_model_len={cfg.max_model_len} exceeds the model's maximum {limit}")
        if cfg.max_model_len is None:
            # Long-context decoders allow more positions than one batch holds; like vLLM's
            # pooling runner, the default is what one batch can take.
            self.max_model_len = min(limit, cfg.max_num_batched_tokens)
        elif cfg.max_model_len > cfg.max_num_batched_tokens:
            raise ValueError(f"max_model_len={cfg.max_model_len} is larger than max_num_batched_tokens="
                             f"{cfg.max_num_batched_tokens}: a prompt of full length could never be scheduled")
        else:
            self.max_model_len = cfg.max_model_len
        self.model.load_weights(iter_weights(cfg.model))
        self.model.eval()
        images = None
        if getattr(self.model, "vision", None) is not None:
            src = cfg.model if isinstance(cfg.model, (str, os.PathLike)) else None
            proc = getattr(self.model, "image_processor", ImageProcessor)
            images = proc.from_checkpoint(src, self.hf_config, self.hf_config.vision_config, cfg.mm_processor_kwargs,
                                          tokenizer=self.tokenizer)
            table = getattr(self.model, "cos_sin", None)
            if table is not None:
                images.max_position = int(table.shape[0])
        elif cfg.mm_processor_kwargs:
            raise ValueError(f"mm_processor_kwargs was given, but {self.arch} takes no images")
        self.inputs = InputProcessor(self.tokenizer, self.max_model_len, self.model.vocab_size,
                                     int(getattr(self.model, "type_vocab", 0) or 0), images,
                                     getattr(self.model, "score_template", None),
                                     getattr(self.model, "score_suffix", ()))
        pooler_config = cfg.pooler_config
        if pooler_config.logit_bias is None and getattr(self.model, "logit_bias", None) is not None:
            # A checkpoint whose scores are calibrated by a bias of its own (as vLLM sets it).
            pooler_config = dataclasses.replace(pooler_config, logit_bias=self.model.logit_bias)
        self.pooler = Pooler(self.ops, pooler_config)
        self.classify_act = classify_activation(self.hf_config)
        self.waiting = WaitingQueue()  # not yet launched: request id -> Request, arrival order
        self.running: dict[str, Request] = {}  # launched and not yet finished
        self._inflight: deque[PendingBatch] = deque()  # launch order
        # Requests added and not yet finished, aborted or failed. A counter rather than
        # len(waiting) + len(running): other threads read it while a batch moves from
        # one to the other.
        self._num_unfinished = 0
        self.pipeline_depth = 2 if self.device.type == "cuda" else 1
        self._ids = itertools.count()
        self.lora = None
        if cfg.enable_lora:
            if not getattr(self.model, "lora_weights", ()):
                raise ValueError(f"{self.arch} does not support LoRA adapters")
            self.lora = LoRAManager(self.model, cfg.max_loras, cfg.max_lora_rank)
        self.graphs = None
        if cuda_graph.wanted(self.device, cfg.enforce_eager, self.model, self.ops):
            self.graphs = cuda_graph.GraphRunner(self.model, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                                 self.max_model_len, self.device)

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def lora_adapters(self, lora_request, n: int) -> list[LoRAAdapter | None]:
        """The adapter of each of n prompts, loaded now (so a bad adapter fails before any
        work starts). lora_request: None, one LoRARequest for all, or a list of n (each
        a LoRARequest or None)."""
        if lora_request is None or (isinstance(lora_request, (list, tuple)) and len(lora_request) == n
                                    and all(r is None for r in lora_request)):
            return [None] * n  # None in a list is the base model, LoRA enabled or not (as vLLM)
        if self.lora is None:
            raise ValueError("a lora_request was given, but LoRA is not enabled; pass enable_lora=True")
        if isinstance(lora_request, (list, tuple)):
            if len(lora_request) != n:
                raise ValueError(f"lora_request has {len(lora_request)} entries for {n} prompts")
            return [None if r is None else self.lora.get(r) for r in lora_request]
        return [self.lora.get(lora_request)] * n

    # ------------------------------------------------------------------ queue
    @property
    def pipeline_depth(self) -> int:
        return self._pipeline_depth

    @pipeline_depth.setter
    def pipeline_depth(self, depth: int):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"pipeline_depth must be a positive int, got {depth!r}")
        self._pipeline_depth = depth

    def add_request(self, req: Request):
        if req.request_id in self.waiting or req.request_id in self.running:
            raise ValueError(f"request id {req.request_id!r} is already queued")
        self.waiting.add(req.request_id, len(req.prompt.token_ids), req, req.lora.key if req.lora else 0)
        self._num_unfinished += 1

    def abort(self, request_ids):
        """Drop requests, waiting or in flight; unknown ids are ignored. An in-flight
        request's batch still runs; its output is dropped."""
        hit_running = False
        for rid in request_ids:
            if self.waiting.remove(rid) is not None:
                self._num_unfinished -= 1
            elif self.running.pop(rid, None) is not None:
                self._num_unfinished -= 1
                hit_running = True
        if hit_running:
            # A batch with nothing left to deliver is not waited for.
            self._inflight = deque(b for b in self._inflight if self._live(b))

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or in flight."""
        return bool(self.waiting) or bool(self.running)

    def num_unfinished(self) -> int:
        """Requests waiting or in flight (safe to read from another thread)."""
        return self._num_unfinished

    def step(self) -> list[Request]:
        """Launch batches of waiting requests until ``pipeline_depth`` are in flight, then
        wait for the oldest one; returns the requests it finished (empty only when
        nothing was waiting or in flight).

        Raises :class:`BatchError` naming the requests of the one batch that failed,
        either the one being launched (the batches already in flight stay in flight) or
        the one waited for (the others stay in flight); the engine stays usable.
        """
        while len(self._inflight) < self._pipeline_depth and self.waiting:
            self._launch_next()
        if not self._inflight:
            return []
        return self._finish(self._inflight.popleft())

    def _live(self, pending: PendingBatch) -> list[Request]:
        running = self.running
        return [r for r in pending.requests if running.get(r.request_id) is r]

    def _launch_next(self):
        if self.lora is not None:
            # Adapters dropped since (on whichever thread loads them): free their graphs
            # here, on the thread that replays them (and empty the list without graphs too).
            dropped = self.lora.dropped
            while dropped:
                key = dropped.popleft()
                if self.graphs is not None:
                    self.graphs.forget(key)
        oldest = self.waiting.oldest()
        anchored = time.monotonic() - oldest.arrival > self.MAX_WAIT_S
        reqs = self.waiting.pop_batch(self.cfg.max_num_batched_tokens, self.cfg.max_num_seqs, anchored,
                                      self.CPU_BATCH_TOKENS if self.device.type == "cpu" else None)
        for r in reqs:
            self.running[r.request_id] = r
        try:
            pending = self.launch_batch([r.prompt for r in reqs], [r.activation for r in reqs],
                                        [r.lora for r in reqs])
        except Exception as e:
            self._fail(reqs, e)
        except BaseException:
            self._drop(reqs)  # interrupted: nothing will ever finish these
            raise
        pending.requests = reqs
        self._inflight.append(pending)

    def _finish(self, pending: PendingBatch) -> list[Request]:
        try:
            output = pending.wait()
        except Exception as e:
            self._fail(self._live(pending), e)
        except BaseException:
            self._drop(self._live(pending))  # interrupted: the batch has left the pipeline
            raise
        running, done = self.running, []
        for r, row in zip(pending.requests, output.unbind(0)):
            if running.get(r.request_id) is r:  # not aborted while in flight
                r.output = row
                done.append(r)
        self._drop(done)
        return done

    def _drop(self, reqs: list[Request]):
        for r in reqs:
            del self.running[r.request_id]
        self._num_unfinished -= len(reqs)

    def _fail(self, reqs: list[Request], cause: Exception):
        self._drop(reqs)
        raise BatchError([r.request_id for r in reqs], cause) from cause

    @torch.inference_mode()
    def launch_batch(self, prompts: list[TokenizedPrompt], activations: list[str | None],
                     loras: list[LoRAAdapter | None] | None = None) -> PendingBatch:
        """Build one ragged batch and queue its forward (with each prompt's adapter in
        ``loras``, where given: one LoRAAdapter or None per prompt, an adapter's prompts
        next to each other), pooling and device-to-host copy without waiting for them (on
        CUDA). Returns its :class:`PendingBatch`."""
        if self.device.type != "cuda":
            return self._launch_batch(prompts, activations, loras)
        # Triton launches on torch's current device, not on its tensors' one: on a second
        # GPU it would fail (or, with peer access, run on the first one, off this stream).
        with torch.cuda.device(self.device):
            return self._launch_batch(prompts, activations, loras)

    def _launch_batch(self, prompts, activations, loras) -> PendingBatch:
        types = None
        if any(p.token_type_ids is not None for p in prompts):
            types = [p.token_type_ids for p in prompts]
        token_ids = [p.token_ids if p.id_array is None else p.id_array for p in prompts]
        lora = None if loras is None else LoRABatch.build(loras, [len(t) for t in token_ids])
        # The graph's output is overwritten by its next replay; the pooler reads it first
        # (stream order), so nothing here needs to copy it. A graph holds the base model or
        # one adapter; a batch that mixes them runs eagerly.
        logits = None
        adapter = None if lora is None else lora.single(len(prompts))
        # A dropped adapter's last requests run eagerly: a graph captured now would keep
        # its weights for good, as nothing will drop it again.
        # A batch with images runs eagerly: the vision tower's shapes follow the images.
        mm = any(p.mm is not None for p in prompts)
        if self.graphs is not None and not mm and (lora is None or (adapter is not None
                                                                     and self.lora.holds(adapter))):
            logits = self.graphs(token_ids, types, adapter)
        if logits is None:
            batch = RaggedBatch.build(token_ids, types, self.device)
            if mm:
                batch.mm = MMBatch.build(prompts, self.device, self.inputs.images)
            logits = self.model(batch) if lora is None else self.model(batch, lora)
        out = self.pooler(logits, activations)  # (B, num_labels) fp32 on the device
        if self.device.type != "cuda":
            return PendingBatch(out.cpu())
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return PendingBatch(host, ready, pinned=True)

    def run_batch(self, prompts: list[TokenizedPrompt], activations: list[str | None],
                  loras: list[LoRAAdapter | None] | None = None) -> torch.Tensor:
        """Forward one ragged batch outside the queue. Returns (B, num_labels) fp32 on the host."""
        return self.launch_batch(prompts, activations, loras).wait()

