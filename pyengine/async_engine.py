"""An asyncio driver for :class:`EngineCore`: many concurrent callers, one batch loop.

One worker thread owns the core: it takes new requests and aborts from a command
queue, steps the core while anything waits, and resolves each caller's future back on
that caller's event loop. Because ``EngineCore.step`` packs whatever is waiting under
the token budget, requests that arrive while a batch runs share the next batch
launched; no artificial batching delay is needed. On CUDA the core keeps two batches
in flight, so a step launches the next batch before it waits for the previous one and
delivers that one's results; an abort of a sequence in flight drops its result.
Tokenisation runs on a second single thread: it keeps the event loop free, and the
tokenizer is not safe to share between threads (``InputProcessor`` sets its
truncation side per call).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .engine import BatchError, EngineCore, Request
from .inputs import TokenizedPrompt

log = logging.getLogger("pyengine.async_engine")


class _Call:
    """The sequences of one caller's request; resolved when the last one finishes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future, n: int):
        self.loop, self.future = loop, future
        self.outputs: list[torch.Tensor | None] = [None] * n
        self.remaining = n

    def _deliver(self, fn, value):
        def settle():
            if not self.future.done():
                fn(value)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop has closed: nobody is waiting any more
            pass

    def finish(self, index: int, output: torch.Tensor):
        self.outputs[index] = output
        self.remaining -= 1
        if self.remaining == 0:
            self._deliver(self.future.set_result, torch.stack(self.outputs))

    def fail(self, exc: BaseException):
        self._deliver(self.future.set_exception, exc)


class AsyncEngine:
    """Thread-safe front of one :class:`EngineCore`.

    on_step(num_seqs, num_tokens, seconds) is called from the worker after every batch
    (for metrics); it must be cheap and must not raise.
    """

    def __init__(self, core: EngineCore, on_step=None):
        self.core = core
        self.on_step = on_step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._ids = itertools.count()
        self._count_lock = threading.Lock()
        self._handed_over = 0  # sequences in _commands not yet in the core
        self._owner: dict[str, tuple[_Call, int]] = {}  # worker thread only
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="pyengine-tokenize")
        self._thread = threading.Thread(target=self._loop, name="pyengine-core", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers (event loop)
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def num_waiting(self) -> int:
        """Sequences not yet finished: handed over but not yet taken by the worker (it
        takes them between batches), plus those in the core (waiting or in a batch in
        flight). Racy reads, fine for a gauge."""
        return self._handed_over + self.core.num_unfinished()

    def _check_alive(self):
        if not self.alive:
            raise RuntimeError("the engine was shut down" if self._stop else "the engine loop is not running")

    async def preprocess(self, fn, *args):
        """Run ``fn(*args)`` (tokenisation, template rendering) on the tokenizer thread."""
        self._check_alive()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)
        except asyncio.CancelledError:
            # shutdown() cancels the queued work: the caller was not cancelled, so it
            # gets the shutdown's error, as a call already queued in the core does.
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", None)
            if self._stop and (cancelling is None or not cancelling()):
                raise RuntimeError("the engine was shut down") from None
            raise

    async def run(self, prompts: list[TokenizedPrompt], activation, lora=None, request_id=None) -> torch.Tensor:
        """Queue ``prompts`` and wait for them: (len(prompts), num_labels) fp32 on the
        host. activation: one activation kind (or None, raw logits) for all, or a list of
        one per prompt; lora: one loaded LoRAAdapter (or None) for all, or a list of one
        per prompt; request_id: the sequences' ids are f"{request_id}-{i}" (default: a
        counter's next value; the caller keeps ids unique). Cancelling the await drops
        whatever of them has not run yet."""
        self._check_alive()
        if not prompts:
            raise ValueError("no prompts to run")
        n = len(prompts)
        acts = activation if isinstance(activation, list) else [activation] * n
        loras = lora if isinstance(lora, list) else [lora] * n
        loop = asyncio.get_running_loop()
        call = _Call(loop, loop.create_future(), n)
        base = next(self._ids) if request_id is None else request_id
        reqs = [Request(f"{base}-{i}", p, act, ad) for i, (p, act, ad) in enumerate(zip(prompts, acts, loras))]
        with self._count_lock:
            self._handed_over += len(reqs)
        self._send(("add", reqs, call))
        try:
            return await call.future
        except asyncio.CancelledError:
            self._send(("abort", [r.request_id for r in reqs], None))
            raise

    def shutdown(self, timeout: float = 10.0):
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def _send(self, command):
        self._commands.put(command)
        self._wake.set()

    # ------------------------------------------------------------------ worker thread
    def _drain(self):
        while True:
            try:
                op, payload, call = self._commands.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                for i, r in enumerate(payload):
                    self.core.add_request(r)
                    self._owner[r.request_id] = (call, i)
                with self._count_lock:
                    self._handed_over -= len(payload)
            else:
                self.core.abort(payload)
                for rid in payload:
                    self._owner.pop(rid, None)

    def _loop(self):
        while not self._stop:
            self._wake.clear()
            self._drain()
            if not self.core.has_unfinished():
                self._wake.wait()
                continue
            t0 = time.perf_counter()
            try:
                finished = self.core.step()
            except BatchError as e:
                # Inputs were validated before queueing, so this is the engine's fault: the
                # callers with a sequence in that batch fail, everyone else carries on.
                log.exception("engine step failed")
                self._fail_requests(e.request_ids, RuntimeError(f"engine step failed: {e}"))
                continue
            except Exception as e:  # noqa: BLE001 - a fault outside a batch must not kill the loop
                log.exception("engine step failed")
                self._fail_all(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            if self.on_step is not None and finished:
                self.on_step(len(finished), sum(len(r.prompt.token_ids) for r in finished),
                             time.perf_counter() - t0)
            for r in finished:
                owner = self._owner.pop(r.request_id, None)
                if owner is not None:
                    owner[0].finish(owner[1], r.output)
        self._drain()
        self._fail_all(RuntimeError("the engine was shut down"))

    def _fail_requests(self, request_ids, exc):
        """Fail the callers owning ``request_ids`` and drop their other queued sequences."""
        calls = {}
        for rid in request_ids:
            owner = self._owner.get(rid)
            if owner is not None:
                calls[id(owner[0])] = owner[0]
        doomed = [rid for rid, (c, _) in self._owner.items() if id(c) in calls]
        self.core.abort(doomed)
        for rid in doomed:
            del self._owner[rid]
        for c in calls.values():
            c.fail(exc)

    def _fail_all(self, exc):
        calls = {id(c): c for c, _ in self._owner.values()}
        self.core.abort(list(self._owner))
        self._owner.clear()
        for c in calls.values():
            c.fail(exc)
