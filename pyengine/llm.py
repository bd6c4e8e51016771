"""The user-facing API, vLLM's pooling API: ``LLM`` (blocking, offline) and ``AsyncLLM``
(coroutines, for asyncio servers that import pyengine).

Both check and tokenise a call's inputs completely before any of it is queued (a bad
prompt anywhere fails the whole call, nothing half-done), then hand the prompts to one
:class:`~pyengine.engine.EngineCore`: ``LLM`` steps it until the call is done;
``AsyncLLM`` hands them to a worker thread that steps it for every caller at once, so
concurrent calls share ragged batches.
"""
from __future__ import annotations

import itertools

from tqdm.auto import tqdm

from .async_engine import AsyncEngine
from .config import EngineConfig, PoolerConfig, PoolingParams
from .engine import EngineCore, Request
from .inputs import ImagePrompt, parse_prompts
from .outputs import ClassificationRequestOutput, PoolingOutput, PoolingRequestOutput, ScoringRequestOutput
from .pooler import score_activation
from .score_items import pair_items


def _bar(use_tqdm, total, desc, hidden=False):
    """A progress bar: tqdm's, none (use_tqdm false, or ``hidden``), or as vLLM, the one
    that use_tqdm makes when it is callable (a tqdm class or factory)."""
    if callable(use_tqdm) and not hidden:
        return use_tqdm(total=total, desc=desc)
    return tqdm(total=total, desc=desc, unit="prompt", disable=not use_tqdm or hidden)


def _tokenization(tokenization_kwargs, truncate_prompt_tokens, truncation_side):
    """(truncate_prompt_tokens, truncation_side) with vLLM's ``tokenization_kwargs`` folded
    in: its truncate_prompt_tokens and truncation_side, or the tokenizer's form of a cut,
    truncation=True with max_length=k."""
    if tokenization_kwargs is None:
        return truncate_prompt_tokens, truncation_side
    if not isinstance(tokenization_kwargs, dict):
        raise TypeError(f"tokenization_kwargs must be a dict, got {type(tokenization_kwargs).__name__}")
    kw = dict(tokenization_kwargs)
    unknown = sorted(set(kw) - {"truncate_prompt_tokens", "truncation_side", "truncation", "max_length"})
    if unknown:
        raise ValueError(f"tokenization_kwargs {unknown} are not supported; it takes truncate_prompt_tokens, "
                         "truncation_side, and truncation=True with max_length")
    k = kw.get("truncate_prompt_tokens")
    if kw.get("truncation") not in (None, False, True):
        raise ValueError(f"tokenization_kwargs truncation must be a bool, got {kw['truncation']!r}")
    if kw.get("truncation"):
        if "max_length" not in kw or (k is not None and k != kw["max_length"]):
            raise ValueError("tokenization_kwargs truncation=True needs max_length (the tokens kept), "
                             "and no other truncate_prompt_tokens")
        k = kw["max_length"]
    elif "max_length" in kw:
        raise ValueError("tokenization_kwargs max_length cuts prompts only with truncation=True")
    for name, mine, theirs in (("truncate_prompt_tokens", truncate_prompt_tokens, k),
                               ("truncation_side", truncation_side, kw.get("truncation_side"))):
        if mine is not None and theirs is not None:
            raise ValueError(f"{name} given both as a keyword and in tokenization_kwargs")
    return (truncate_prompt_tokens if k is None else k,
            truncation_side if kw.get("truncation_side") is None else kw["truncation_side"])


def _vllm_keywords(task="auto", trust_remote_code=False, seed=None, tensor_parallel_size=1, pipeline_parallel_size=1,
                   data_parallel_size=1, gpu_memory_utilization=None):
    """vLLM's LLM keywords that scripts pass and that change nothing here, checked: task
    (vLLM's older runner choice), trust_remote_code (the architectures run as this engine's
    own code; no checkpoint code is run either way), seed (inference draws no random
    numbers), gpu_memory_utilization (no cache is preallocated: memory follows the batch
    budget); parallel sizes above 1 are refused (scale out as docs/SCALE_OUT.md says)."""
    if task not in ("auto", "classify", "score", "reward"):
        raise ValueError(f"task={task!r} is not supported; this engine classifies and scores ('classify', "
                         "'score', 'reward' or 'auto')")
    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"trust_remote_code must be a bool, got {trust_remote_code!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    for name, v in (("tensor_parallel_size", tensor_parallel_size), ("pipeline_parallel_size", pipeline_parallel_size),
                    ("data_parallel_size", data_parallel_size)):
        if v != 1 or isinstance(v, bool):
            raise ValueError(f"{name}={v!r}: this engine runs one model per GPU; for more GPUs run several "
                             "engines (pyengine.integrations.ray, docs/SCALE_OUT.md)")
    if gpu_memory_utilization is not None and (isinstance(gpu_memory_utilization, bool) or not isinstance(
            gpu_memory_utilization, (int, float)) or not 0 < gpu_memory_utilization <= 1):
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")


_VLLM_ONLY = ("task", "trust_remote_code", "seed", "tensor_parallel_size", "pipeline_parallel_size",
              "data_parallel_size", "gpu_memory_utilization")


def engine_config(model, **kwargs) -> EngineConfig:
    """The EngineConfig of ``LLM(model, **kwargs)``, checked as LLM checks it (vLLM's
    keywords that change nothing here are checked, then dropped); loads nothing."""
    _vllm_keywords(**{k: kwargs.pop(k) for k in _VLLM_ONLY if k in kwargs})
    return EngineConfig(model=model, **kwargs)


class _Frontend:
    """What LLM and AsyncLLM share: the engine core, and turning a call's arguments into
    (prompts, activation per prompt, adapter per prompt) before any work starts."""

    def __init__(self, model, tokenizer=None, dtype="auto", device="auto", max_model_len=None,
                 max_num_batched_tokens=16384, max_num_seqs=256, hf_overrides=None,
                 pooler_config: PoolerConfig | dict | None = None, kernel_backend="auto", convert="auto",
                 runner="auto", enforce_eager=False, enable_lora=False, max_loras=1, max_lora_rank=16,
                 mm_processor_kwargs=None, *, task="auto", trust_remote_code=False, seed=None,
                 tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1, gpu_memory_utilization=None):
        _vllm_keywords(task, trust_remote_code, seed, tensor_parallel_size, pipeline_parallel_size,
                       data_parallel_size, gpu_memory_utilization)
        self.config = EngineConfig(model=model, tokenizer=tokenizer, dtype=dtype, device=device,
                                   max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                                   max_num_seqs=max_num_seqs, hf_overrides=hf_overrides,
                                   pooler_config=pooler_config, kernel_backend=kernel_backend, convert=convert,
                                   runner=runner, enforce_eager=enforce_eager, enable_lora=enable_lora,
                                   max_loras=max_loras, max_lora_rank=max_lora_rank,
                                   mm_processor_kwargs=mm_processor_kwargs)
        self.engine = EngineCore(self.config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _activation(self, use_activation, kind):
        if use_activation is None:
            use_activation = self.config.pooler_config.use_activation
        if not isinstance(use_activation, bool):
            raise TypeError(f"use_activation must be a bool or None, got {use_activation!r}")
        return kind if use_activation else None

    def _params(self, pooling_params, n, truncate_prompt_tokens, use_activation, kind, task):
        """(truncate_prompt_tokens: one value or one per prompt, [activation per prompt])
        from the keywords, or from ``pooling_params`` (one PoolingParams, or a list of n)."""
        if pooling_params is None:
            return truncate_prompt_tokens, [self._activation(use_activation, kind)] * n
        if truncate_prompt_tokens is not None or use_activation is not None:
            raise ValueError("give truncate_prompt_tokens and use_activation as keywords or in pooling_params, "
                             "not both")
        one = isinstance(pooling_params, PoolingParams)
        params = [pooling_params] if one else pooling_params
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, PoolingParams) for p in params):
            raise TypeError(f"pooling_params must be a PoolingParams or a list of them, got "
                            f"{type(pooling_params).__name__}")
        if not one and len(params) != n:
            raise ValueError(f"pooling_params has {len(params)} entries for {n} prompts")
        for p in params:
            # a cross-encoder's score is its classify head's output: vLLM's newest score
            # calls take task "classify", its older ones "score"
            if p.task not in (None, task) and not (task == "score" and p.task == "classify"):
                raise ValueError(f"PoolingParams.task={p.task!r} given to a {task} call")
        acts = [self._activation(p.use_activation, kind) for p in params]
        if one:
            return pooling_params.truncate_prompt_tokens, acts * n
        return [p.truncate_prompt_tokens for p in params], acts

    def _tokenizing(self, n_texts, use_tqdm, n_media=0):
        """A progress bar over the texts to tokenise and the prompts with images or videos
        to prepare, for calls of more than one tokenizer chunk or more than MEDIA_BAR such
        prompts (below that the work is done before a bar would say anything)."""
        inputs = self.engine.inputs
        return _bar(use_tqdm, n_texts + n_media, "Preparing inputs" if n_media else "Tokenizing",
                    hidden=n_texts <= inputs.CHUNK and n_media <= inputs.MEDIA_BAR)

    def _encode_inputs(self, prompts, pooling_task, truncate_prompt_tokens, truncation_side, use_activation,
                       lora_request, pooling_params, use_tqdm=False, tokenization_kwargs=None):
        """encode()'s arguments -> (prompts, activations, adapters), one each per prompt."""
        if isinstance(pooling_params, str):  # encode(prompts, "classify"): the task, in the second place
            pooling_task, pooling_params = pooling_params, None
        truncate_prompt_tokens, truncation_side = _tokenization(tokenization_kwargs, truncate_prompt_tokens,
                                                                truncation_side)
        if pooling_task != "classify":
            raise ValueError(f"pooling_task={pooling_task!r} is not supported; this engine serves 'classify'")
        parsed = parse_prompts(prompts)
        trunc, acts = self._params(pooling_params, len(parsed), truncate_prompt_tokens, use_activation,
                                   self.engine.classify_act, "classify")
        with self._tokenizing(sum(isinstance(p, str) for p in parsed), use_tqdm,
                              sum(isinstance(p, ImagePrompt) for p in parsed)) as bar:
            toks = self.engine.inputs.process(parsed, trunc, truncation_side, progress=bar.update)
        return toks, acts, self.engine.lora_adapters(lora_request, len(toks))

    def _score_inputs(self, data_1, data_2, truncate_prompt_tokens, truncation_side, use_activation,
                      score_template, lora_request, pooling_params, chat_template=None, use_tqdm=False,
                      tokenization_kwargs=None):
        """score()'s arguments -> (prompts, activations, adapters), one each per pair.
        chat_template is vLLM's name for the score template."""
        truncate_prompt_tokens, truncation_side = _tokenization(tokenization_kwargs, truncate_prompt_tokens,
                                                                truncation_side)
        if chat_template is not None:
            if score_template is not None:
                raise ValueError("give score_template or chat_template (its vLLM name), not both")
            score_template = chat_template
        if self.engine.num_labels != 1:
            raise ValueError(f"score() needs a model with num_labels == 1 (a cross-encoder); "
                             f"this one has num_labels={self.engine.num_labels}")
        if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
            raise TypeError(f"score() takes one PoolingParams for every pair, got {type(pooling_params).__name__}")
        d1, d2 = pair_items(data_1, data_2)
        trunc, acts = self._params(pooling_params, len(d1), truncate_prompt_tokens, use_activation,
                                   score_activation(self.engine.hf_config), "score")
        with self._tokenizing(len(d1), use_tqdm) as bar:
            toks = self.engine.inputs.process_pairs(d1, d2, trunc, truncation_side, score_template, bar.update)
        return toks, acts, self.engine.lora_adapters(lora_request, len(toks))


class LLM(_Frontend):
    """Offline sequence classification, scoring and pooling (vLLM's pooling API).

    LLM(model, tokenizer=None, dtype="auto", device="auto", max_model_len=None,
    max_num_batched_tokens=16384, max_num_seqs=256, hf_overrides=None, pooler_config=None,
    kernel_backend="auto", convert="auto", runner="auto", enforce_eager=False,
    enable_lora=False, max_loras=1, max_lora_rank=16, mm_processor_kwargs=None): see
    :class:`EngineConfig`."""

    def _run(self, prompts, activations, loras, use_tqdm, desc) -> list[PoolingRequestOutput]:
        eng = self.engine
        reqs = [Request(eng.new_request_id(), p, act, lora) for p, act, lora in zip(prompts, activations, loras)]
        for r in reqs:
            eng.add_request(r)
        done = 0
        with _bar(use_tqdm, len(reqs), desc) as bar:
            try:
                while done < len(reqs):
                    n = len(eng.step())
                    if n == 0:
                        raise RuntimeError("the engine stopped with requests still waiting")
                    done += n
                    bar.update(n)
            except BaseException:
                eng.abort([r.request_id for r in reqs])
                raise
        return [PoolingRequestOutput(r.request_id, PoolingOutput(r.output), r.prompt.token_ids) for r in reqs]

    def encode(self, prompts, pooling_params=None, *, pooling_task="classify", truncate_prompt_tokens=None,
               truncation_side=None, use_activation=None, use_tqdm=True, lora_request=None,
               tokenization_kwargs=None) -> list[PoolingRequestOutput]:
        """Pooled classifier outputs per prompt: ``.outputs.data`` is (num_labels,) fp32.

        prompts: a str, a dict ({"prompt": ...} or {"prompt_token_ids": [...]}), a list
        of token ids, or a list of those. pooling_params (vLLM's second argument): a
        :class:`PoolingParams` for every prompt or a list of one per prompt (each
        prompt's truncation and activation), instead of the keywords; a str there is
        read as pooling_task. tokenization_kwargs: vLLM's form of the truncation
        keywords (truncate_prompt_tokens / truncation_side, or truncation=True with
        max_length). lora_request: a :class:`LoRARequest` for every prompt, or a list of
        one (or None) per prompt; needs ``LLM(enable_lora=True)``. use_tqdm: a bool, or
        as vLLM a callable that makes the progress bar (a tqdm class)."""
        inputs = self._encode_inputs(prompts, pooling_task, truncate_prompt_tokens, truncation_side, use_activation,
                                     lora_request, pooling_params, use_tqdm, tokenization_kwargs)
        return self._run(*inputs, use_tqdm, "Classifying")

    def classify(self, prompts, pooling_params=None, *, truncate_prompt_tokens=None, truncation_side=None,
                 use_activation=None, use_tqdm=True, lora_request=None, tokenization_kwargs=None
                 ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt: ``.outputs.probs`` is a list of num_labels floats.
        Options as in :meth:`encode`.

        A reward model is a classifier with num_labels == 1: ``use_activation=False``
        returns its raw reward (the logit), the default its sigmoid."""
        outs = self.encode(prompts, pooling_params, pooling_task="classify",
                           truncate_prompt_tokens=truncate_prompt_tokens, truncation_side=truncation_side,
                           use_activation=use_activation, use_tqdm=use_tqdm, lora_request=lora_request,
                           tokenization_kwargs=tokenization_kwargs)
        return [ClassificationRequestOutput.from_base(o) for o in outs]

    def score(self, data_1, data_2, *, truncate_prompt_tokens=None, truncation_side=None, use_activation=None,
              use_tqdm=True, score_template=None, lora_request=None, pooling_params=None, chat_template=None,
              tokenization_kwargs=None) -> list[ScoringRequestOutput]:
        """Cross-encoder relevance of pairs (1:1, 1:N or N:N): ``.outputs.score``.
        pooling_params: one :class:`PoolingParams` for every pair, instead of the
        truncation and activation keywords.

        Each side is texts or, on a vision-language reranker, images too, as vLLM takes
        them: an item ``{"content": [part, ...]}`` with parts such as ``{"type": "image_url",
        "image_url": {"url": "data:image/png;base64,..."}}``, ``{"type": "image_pil",
        "image_pil": img}`` or ``{"type": "text", "text": ...}`` (see :mod:`pyengine.score_items`).

        Without a score template a pair is tokenised as the tokenizer does a text pair,
        whatever its pair template is (Qwen's tokenizer, for one, puts the two texts'
        tokens back to back with nothing between). With one (``score_template``: Jinja
        source or a file path, see :mod:`pyengine.templates`; ``chat_template``, vLLM's
        name for it, is the same; else the model's own, as jina-reranker-m0's) each pair is
        rendered into one prompt and tokenised as a single text."""
        inputs = self._score_inputs(data_1, data_2, truncate_prompt_tokens, truncation_side, use_activation,
                                    score_template, lora_request, pooling_params, chat_template, use_tqdm,
                                    tokenization_kwargs)
        return [ScoringRequestOutput.from_base(o) for o in self._run(*inputs, use_tqdm, "Scoring")]


class AsyncLLM(_Frontend):
    """LLM's API as coroutines, for asyncio programs that import pyengine: concurrent
    calls share ragged batches, stepped by one worker thread (as the HTTP server's).

        async with AsyncLLM("path/to/reranker") as llm:
            outs = await asyncio.gather(llm.score(q1, docs1), llm.score(q2, docs2))

    Arguments as :class:`LLM`'s. Each call is checked and tokenised on a tokenizer thread
    first (errors raise there, before anything is queued); cancelling a call drops what
    of it has not run. :meth:`shutdown` (or leaving ``async with``) stops the worker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._driver = AsyncEngine(self.engine)
        self._calls = itertools.count()

    async def _run(self, prepare, *args) -> list[PoolingRequestOutput]:
        call = next(self._calls)  # ids in call order, the same as the engine core's
        prompts, activations, loras = await self._driver.preprocess(prepare, *args)
        if not prompts:  # an empty list of prompts: no outputs, as LLM and vLLM
            return []
        rows = await self._driver.run(prompts, activations, loras, request_id=call)
        return [PoolingRequestOutput(f"{call}-{i}", PoolingOutput(row), p.token_ids)
                for i, (p, row) in enumerate(zip(prompts, rows.unbind(0)))]

    async def encode(self, prompts, pooling_params=None, *, pooling_task="classify", truncate_prompt_tokens=None,
                     truncation_side=None, use_activation=None, lora_request=None, tokenization_kwargs=None
                     ) -> list[PoolingRequestOutput]:
        """As :meth:`LLM.encode`."""
        return await self._run(self._encode_inputs, prompts, pooling_task, truncate_prompt_tokens, truncation_side,
                               use_activation, lora_request, pooling_params, False, tokenization_kwargs)

    async def classify(self, prompts, pooling_params=None, *, truncate_prompt_tokens=None, truncation_side=None,
                       use_activation=None, lora_request=None, tokenization_kwargs=None
                       ) -> list[ClassificationRequestOutput]:
        """As :meth:`LLM.classify`."""
        outs = await self.encode(prompts, pooling_params, pooling_task="classify",
                                 truncate_prompt_tokens=truncate_prompt_tokens, truncation_side=truncation_side,
                                 use_activation=use_activation, lora_request=lora_request,
                                 tokenization_kwargs=tokenization_kwargs)
        return [ClassificationRequestOutput.from_base(o) for o in outs]

    async def score(self, data_1, data_2, *, truncate_prompt_tokens=None, truncation_side=None, use_activation=None,
                    score_template=None, lora_request=None, pooling_params=None, chat_template=None,
                    tokenization_kwargs=None) -> list[ScoringRequestOutput]:
        """As :meth:`LLM.score`."""
        outs = await self._run(self._score_inputs, data_1, data_2, truncate_prompt_tokens, truncation_side,
                               use_activation, score_template, lora_request, pooling_params, chat_template, False,
                               tokenization_kwargs)
        return [ScoringRequestOutput.from_base(o) for o in outs]

    def shutdown(self):
        """Stop the worker thread; calls still waiting fail."""
        self._driver.shutdown()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.shutdown()
