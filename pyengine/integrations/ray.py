"""Ray integration (extra ``ray``): score a Ray Dataset with one engine per actor, and
run the HTTP server under Ray Serve with one replica per GPU.

    import ray
    from pyengine.integrations.ray import PyEngineClassifier

    ds = ray.data.read_parquet("corpus/")
    ds = ds.map_batches(PyEngineClassifier, fn_constructor_kwargs={"model": "/models/clf"},
                        concurrency=8, num_gpus=1, batch_size=1024)
    ds.write_parquet("scored/")

Each actor builds one engine, so the model is loaded once per actor; each call hands its
whole batch to the engine, which sorts it by length and packs it under its token budget.
The classifier needs only numpy (Ray calls it; it never calls Ray), so importing this
module does not import Ray; :func:`serve_app` imports Ray Serve when it is called.
See docs/SCALE_OUT.md.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os

import numpy as np
import torch

from ..inputs import prompt_error
from ..llm import LLM, engine_config
from ..lora import LoRARequest
from ..templates import load_score_template

ENGINE_KWARGS = frozenset(inspect.signature(LLM.__init__).parameters) - {"self", "model"}


def labels_of(engine) -> list[str]:
    """id2label of the engine's model as a list (``LABEL_i`` where the config has none)."""
    id2label = getattr(engine.hf_config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(engine.num_labels)]


def _kind(batch) -> str:
    if isinstance(batch, dict):
        return "dict"
    module = type(batch).__module__
    if module.startswith("pyarrow") and hasattr(batch, "append_column"):
        return "arrow"
    if module.startswith("pandas") and hasattr(batch, "assign"):
        return "pandas"
    raise TypeError(f"a batch must be a dict of arrays, a pandas DataFrame or a pyarrow Table, "
                    f"got {type(batch).__name__}")


def _names(batch, kind) -> list[str]:
    return list(batch.keys()) if kind == "dict" else list(batch.column_names if kind == "arrow" else batch.columns)


def _column(batch, kind, name):
    if name not in _names(batch, kind):
        raise ValueError(f"the batch has no column {name!r}; its columns are {_names(batch, kind)}")
    if kind == "arrow":
        return batch.column(name).to_pylist()
    return batch[name] if kind == "dict" else batch[name].to_numpy()


def _texts(values, name) -> list[str]:
    out = []
    for i, x in enumerate(values):
        if not isinstance(x, str) or not x:
            raise ValueError(f"column {name!r}, row {i} of this batch: expected a non-empty string, got {x!r:.60}")
        out.append(str(x))  # np.str_ -> str
    return out


def _images(values, name, root) -> list:
    """PIL images from a column of paths (relative ones under ``root``)."""
    from PIL import Image

    out = []
    for i, p in enumerate(_texts(values, name)):
        path = p if root is None or os.path.isabs(p) else os.path.join(root, p)
        try:
            img = Image.open(path)
            img.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"column {name!r}, row {i} of this batch: cannot read image {path!r}: {e}") from None
        out.append(img)
    return out


def _token_ids(values, name) -> list[dict]:
    out = []
    for i, x in enumerate(values):
        a = np.asarray(x) if x is not None else None
        if a is None or a.ndim != 1 or a.size == 0 or a.dtype.kind not in "iu":
            raise ValueError(f"column {name!r}, row {i} of this batch: expected a non-empty list of token ids, "
                             f"got {x!r:.60}")
        out.append({"prompt_token_ids": a.tolist()})
    return out


class PyEngineClassifier:
    """A callable class for ``Dataset.map_batches`` that adds the engine's outputs as columns.

    Input, one of: ``text_column`` (default "text") of strings; ``text_column`` and
    ``pair_column`` of strings, scored as text pairs (needs a cross-encoder, num_labels 1);
    or ``token_ids_column`` of non-empty int lists (prompts already tokenised). With a
    vision-language model, ``image_column`` (with ``text_column``) holds one image path per
    row (relative paths under ``image_root``); each row's text then carries its image's
    placeholder, as in ``LLM.classify``; or ``pair_image_column`` (with ``text_column``) holds
    the image path of each row's document, scored against its text with ``LLM.score`` (a
    vision-language reranker such as jina-reranker-m0).
    Output columns, each name prefixed by ``output_prefix``: ``probs`` (num_labels floats,
    raw logits with ``use_activation=False``) and ``label`` (id2label of the argmax); for
    pairs ``score``. Every input column is kept, rows in their order. A batch may be a dict
    of numpy arrays (Ray's default), a pandas DataFrame or a pyarrow Table.
    ``truncate_prompt_tokens``, ``truncation_side`` and ``use_activation`` are as in
    ``LLM.classify``; ``score_template`` (pairs only) as in ``LLM.score`` (else the model's
    own); ``lora_path``: a
    PEFT LoRA adapter directory every row runs with (turns ``enable_lora`` on); every other
    keyword goes to ``LLM(model, ...)``.
    """

    def __init__(self, model, *, text_column=None, pair_column=None, token_ids_column=None, output_prefix="",
                 truncate_prompt_tokens=None, truncation_side=None, use_activation=None, lora_path=None,
                 score_template=None, image_column=None, image_root=None, pair_image_column=None,
                 **engine_kwargs):
        unknown = sorted(set(engine_kwargs) - ENGINE_KWARGS)
        if unknown:
            raise TypeError(f"PyEngineClassifier got unknown keyword(s) {unknown}; "
                            f"the engine takes {sorted(ENGINE_KWARGS)}")
        if token_ids_column is not None and (text_column is not None or pair_column is not None):
            raise ValueError("give token_ids_column alone, or text_column (with an optional pair_column)")
        if token_ids_column is None and text_column is None:
            text_column = "text"
        for what, v in (("text_column", text_column), ("pair_column", pair_column),
                        ("token_ids_column", token_ids_column), ("output_prefix", output_prefix)):
            if v is not None and not isinstance(v, str):
                raise TypeError(f"{what} must be a str, got {type(v).__name__}")
        if pair_column is not None and pair_column == text_column:
            raise ValueError(f"text_column and pair_column are both {pair_column!r}")
        if image_column is not None and pair_image_column is not None:
            raise ValueError("give image_column (an image in each prompt) or pair_image_column (an image document "
                             "to score each text against), not both")
        image_col = image_column if image_column is not None else pair_image_column
        if image_col is not None:
            what = "image_column" if image_column is not None else "pair_image_column"
            if not isinstance(image_col, str):
                raise TypeError(f"{what} must be a str, got {type(image_col).__name__}")
            if pair_column is not None or token_ids_column is not None:
                raise ValueError(f"{what} goes with text_column alone (no pair_column or token_ids_column)")
            if image_col == text_column:
                raise ValueError(f"text_column and {what} are both {image_col!r}")
            try:
                import PIL.Image  # noqa: F401
            except ImportError:
                raise ValueError(f"{what} needs pillow to read the images: pip install pillow") from None
        if use_activation is not None and not isinstance(use_activation, bool):
            raise TypeError(f"use_activation must be a bool or None, got {use_activation!r}")
        outputs = ("score",) if pair_column is not None or pair_image_column is not None else ("probs", "label")
        self.output_columns = tuple(output_prefix + c for c in outputs)
        clash = [c for c in (text_column, pair_column, token_ids_column, image_col) if c in self.output_columns]
        if clash:
            raise ValueError(f"input column {clash[0]!r} is also an output column's name; pass output_prefix=... "
                             "to name the outputs")
        if lora_path is not None:
            engine_kwargs.setdefault("enable_lora", True)
        self.llm = LLM(model, **engine_kwargs)
        engine = self.llm.engine
        # Bad values and adapters fail here, not per batch.
        pairs = pair_column if pair_column is not None else pair_image_column
        engine.inputs._limit(truncate_prompt_tokens, truncation_side,
                             len(engine.inputs.score_suffix) if pairs is not None else 0)
        lora = None if lora_path is None else LoRARequest("adapter", 1, os.fspath(lora_path))
        engine.lora_adapters(lora, 1)
        if image_col is not None and engine.inputs.images is None:
            raise ValueError(f"{what} needs a vision-language model; {engine.arch} takes text only")
        self.image_column, self.image_root = image_column, None if image_root is None else os.fspath(image_root)
        self.pair_image_column = pair_image_column
        if pairs is not None and engine.num_labels != 1:
            raise ValueError(f"{'pair_column' if pair_column is not None else 'pair_image_column'} needs a "
                             f"cross-encoder (num_labels == 1); this model has num_labels={engine.num_labels}")
        if score_template is not None and pairs is None:
            raise ValueError("score_template renders pairs; it needs pair_column or pair_image_column")
        # Compiled once here, so a bad template fails before any batch.
        self.score_template = None if score_template is None else load_score_template(score_template)
        self.text_column, self.pair_column, self.token_ids_column = text_column, pair_column, token_ids_column
        self.options = dict(truncate_prompt_tokens=truncate_prompt_tokens, truncation_side=truncation_side,
                            use_activation=use_activation, use_tqdm=False, lora_request=lora)
        self.labels = labels_of(engine)

    @contextlib.contextmanager
    def _rows_named(self):
        """The engine's input errors ("prompts[3] has ...", "pairs[3] ...") as this class
        names a bad row: by its columns and its row in the batch."""
        try:
            yield
        except ValueError as e:
            found = prompt_error(str(e))
            if found is None:
                raise
            cols = [c for c in (self.token_ids_column, self.text_column, self.image_column, self.pair_column,
                                self.pair_image_column) if c is not None]
            names = ", ".join(repr(c) for c in cols)
            raise ValueError(f"column{'s' if len(cols) > 1 else ''} {names}, row {found[0]} of this batch: "
                             f"{found[1]}") from None

    def predict(self, batch) -> dict[str, np.ndarray]:
        """The output columns alone for ``batch``, each an array of its length."""
        kind = _kind(batch)
        taken = [c for c in self.output_columns if c in _names(batch, kind)]
        if taken:
            raise ValueError(f"the batch already has column(s) {taken}; pass output_prefix=... to name the outputs")
        if self.token_ids_column is not None:
            prompts = _token_ids(_column(batch, kind, self.token_ids_column), self.token_ids_column)
        else:
            prompts = _texts(_column(batch, kind, self.text_column), self.text_column)
        if self.image_column is not None:
            images = _images(_column(batch, kind, self.image_column), self.image_column, self.image_root)
            prompts = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(prompts, images)]
        if self.pair_column is not None or self.pair_image_column is not None:
            if self.pair_column is not None:
                pairs = _texts(_column(batch, kind, self.pair_column), self.pair_column)
            else:
                pairs = [{"type": "image_pil", "image_pil": im} for im in _images(
                    _column(batch, kind, self.pair_image_column), self.pair_image_column, self.image_root)]
            with self._rows_named():
                scores = [o.outputs.score for o in self.llm.score(prompts, pairs, score_template=self.score_template,
                                                                  **self.options)] if prompts else []
            return {self.output_columns[0]: np.asarray(scores, dtype=np.float32)}
        probs = np.empty(len(prompts), dtype=object)  # one float32 array per row: Arrow list<float>
        labels = np.empty(len(prompts), dtype=object)
        if prompts:
            with self._rows_named():
                outs = self.llm.encode(prompts, **self.options)
            data = np.stack([o.outputs.data.numpy() for o in outs])
            for i, (row, best) in enumerate(zip(data, data.argmax(axis=1))):
                probs[i], labels[i] = row, self.labels[best]
        return dict(zip(self.output_columns, (probs, labels)))

    def __call__(self, batch):
        out = self.predict(batch)
        kind = _kind(batch)
        if kind == "dict":
            return {**batch, **out}
        if kind == "pandas":
            return batch.assign(**out)
        import pyarrow as pa

        for name, values in out.items():
            batch = batch.append_column(name, pa.array(list(values)))
        return batch


def serve_app(model, *, num_replicas=1, num_gpus=1, num_cpus=1, served_model_name=None,
              max_inputs_per_request=1024, max_request_bytes=64 << 20, deployment_options=None, lora_modules=None,
              chat_template=None, api_keys=None, trust_request_chat_template=False, **engine_kwargs):
    """A Ray Serve application of pyengine's HTTP server (pyengine.serve), ``num_replicas``
    replicas of ``num_gpus`` GPU each; Ray Serve's proxy spreads requests over them.

        from ray import serve
        serve.run(serve_app("/models/reranker", num_replicas=8), route_prefix="/")

    Every replica loads the model from ``model``, a path that must exist on its node.
    ``deployment_options`` go to ``serve.deployment`` (e.g. ``max_ongoing_requests``, or
    ``autoscaling_config``, which then replaces ``num_replicas``). ``lora_modules``: {name:
    LoRA adapter directory} served as extra model names (turns ``enable_lora`` on);
    ``chat_template``: as the server's ``--chat-template`` (Jinja source, or a file on
    every node); ``api_keys``: as its ``--api-key`` (a list of bearer tokens);
    ``trust_request_chat_template``: as its ``--trust-request-chat-template``.
    """
    from ray import serve

    unknown = sorted(set(engine_kwargs) - ENGINE_KWARGS)
    if unknown:
        raise TypeError(f"serve_app got unknown keyword(s) {unknown}; the engine takes {sorted(ENGINE_KWARGS)}")
    for what, v in (("num_replicas", num_replicas), ("max_inputs_per_request", max_inputs_per_request),
                    ("max_request_bytes", max_request_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if chat_template is not None and not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be Jinja source or a file's path, got {type(chat_template).__name__}")
    if not isinstance(trust_request_chat_template, bool):
        raise TypeError(f"trust_request_chat_template must be a bool, got {trust_request_chat_template!r}")
    # The engine's keywords are checked here, not first in every replica: a device this
    # node lacks (a CPU-only head node) is the replicas' to have, so only its name is read.
    device = engine_kwargs.get("device", "auto")
    if device not in (None, "auto"):
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r}: {e}") from None
    engine_config(model, **{**engine_kwargs, "device": "cpu"})
    names = served_names(served_model_name, model)
    api_keys = _as_names(api_keys, "api_keys", "key")
    if lora_modules is not None:
        if not isinstance(lora_modules, dict) or not all(isinstance(k, str) for k in lora_modules):
            raise TypeError(f"lora_modules must be a dict of name -> adapter directory, got {lora_modules!r}")
        engine_kwargs.setdefault("enable_lora", True)

    class PyEngineServer:
        """One replica: an engine core and the server's FastAPI app over it."""

        def __init__(self):
            # Absolute imports: Ray pickles this class by value, without its package.
            from pyengine.engine import EngineCore
            from pyengine.llm import engine_config
            from pyengine.serve import Server

            core = EngineCore(engine_config(model, **engine_kwargs))
            self.server = Server(core, names, max_inputs_per_request, max_request_bytes, lora_modules,
                                 chat_template=chat_template, api_keys=api_keys,
                                 trust_request_chat_template=trust_request_chat_template)

        def __serve_build_asgi_app__(self):
            # Called by Ray Serve after __init__; the app's lifespan starts the engine thread.
            return self.server.build_app()

    options = {"name": "pyengine", "num_replicas": num_replicas,
               "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus}}
    if deployment_options is not None and not isinstance(deployment_options, dict):
        raise TypeError(f"deployment_options must be a dict, got {type(deployment_options).__name__}")
    deployment_options = dict(deployment_options or {})
    if "autoscaling_config" in deployment_options:
        del options["num_replicas"]  # Serve refuses both
    actor = deployment_options.pop("ray_actor_options", None) or {}
    if not isinstance(actor, dict):
        raise TypeError(f"deployment_options['ray_actor_options'] must be a dict, got {type(actor).__name__}")
    # merged, not replaced: a runtime_env given there keeps num_gpus / num_cpus (its own win)
    options["ray_actor_options"].update(actor)
    options.update(deployment_options)
    return serve.deployment(serve.ingress()(PyEngineServer), **options).bind()


def _as_names(value, what, one):
    """A list of non-empty strings from one string (a number, as ``serve run`` may read
    one) or a list of them; None stays None."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        value = [value if isinstance(value, str) else str(value)]
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be a {one} or a list of non-empty {one}s, got {value!r}")
    return list(value)


def served_names(served_model_name, model) -> list[str]:
    """The names a served app answers to: ``served_model_name`` (one name, as ``serve run
    ... served_model_name=NAME`` passes it, or a list), else the model path."""
    return _as_names(served_model_name, "served_model_name", "name") or [str(model)]


# serve_app's options whose values are text (served_model_name and api_keys may be lists)
_TEXT_OPTIONS = frozenset({"model", "tokenizer", "dtype", "device", "kernel_backend", "convert", "runner", "task",
                           "chat_template", "served_model_name", "api_keys"})


def build_app(args: dict):
    """Builder for Ray Serve's CLI and config files:
    ``serve run pyengine.integrations.ray:build_app model=/models/x num_replicas=8``.
    A value given as a string is read as JSON where it parses (``8``, ``0.5``, ``true``,
    ``{...}``) and kept as the string otherwise, except the options that are text (paths,
    names, keys, templates: ``2.10`` stays "2.10"), where only a JSON list is read."""
    def value(k, v):
        if not isinstance(v, str):
            return v
        try:
            parsed = json.loads(v)
        except ValueError:
            return v
        if k in _TEXT_OPTIONS and not isinstance(parsed, list):
            return v
        return parsed

    args = {k: value(k, v) for k, v in args.items()}
    if "model" not in args:
        raise ValueError("build_app needs model=DIR")
    return serve_app(**args)
