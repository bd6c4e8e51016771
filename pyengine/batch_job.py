"""Score a JSONL or Parquet file into a JSONL or Parquet file: ``python -m pyengine.batch``.

    python -m pyengine.batch --model DIR --input in.jsonl --output out.parquet --text-column text
        [--pair-column text_2 | --image-column img | --pair-image-column page | --token-ids-column ids]
        [--ray-address local|auto|HOST:PORT] [--num-replicas N]

Without --ray-address one process streams the file through one engine, a shard at a
time (the next shard is read while this one runs), with bounded memory. With it the
shards run on Ray Data, one engine per replica; the driver reads the input and writes
the output, so both need only exist on the machine that runs this command (the model
directory must exist on every node). Output rows keep the input order and carry every
input column plus ``probs`` and ``label`` (or ``score`` for pairs). Interrupted and run
again with the same arguments, the job skips finished shards (see pyengine.batch_io).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from .batch_io import ShardReader, ShardStore, file_format, scan_input
from .inputs import prompt_error
from .integrations.ray import PyEngineClassifier
from .templates import read_template


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyengine.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--input", required=True, help="a .jsonl / .ndjson / .json or .parquet / .pq file")
    p.add_argument("--output", required=True, help="a .jsonl / .ndjson / .json or .parquet / .pq file (its format from its extension)")
    p.add_argument("--text-column", default=None, help="column of texts (default: text)")
    p.add_argument("--pair-column", default=None, help="column of second texts: score pairs with a cross-encoder")
    p.add_argument("--score-template", default=None, metavar="FILE",
                   help="render each pair with this Jinja score template (LLM-as-reranker models); needs "
                        "--pair-column or --pair-image-column")
    p.add_argument("--token-ids-column", default=None, help="column of token-id lists, instead of texts")
    p.add_argument("--image-column", default=None,
                   help="column of image paths (relative to the input file's directory) for a vision-language "
                        "model; each row's text holds the image's placeholder")
    p.add_argument("--pair-image-column", default=None,
                   help="column of image paths (relative to the input file's directory): each row's document, "
                        "scored against its text by a vision-language reranker")
    p.add_argument("--output-prefix", default="", help="prefix of the output columns' names")
    p.add_argument("--shard-size", type=int, default=4096, help="rows per shard: the unit of work and of resuming")
    p.add_argument("--overwrite", action="store_true", help="discard a finished output or other job's shards")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=16384)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--kernel-backend", default="auto")
    g.add_argument("--convert", default="auto")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--lora", default=None, metavar="DIR", help="a PEFT LoRA adapter every row runs with")
    g.add_argument("--max-lora-rank", type=int, default=16)
    g.add_argument("--hf-overrides", type=json.loads, default=None, help="JSON object")
    g.add_argument("--pooler-config", type=json.loads, default=None, help="JSON object")
    g.add_argument("--mm-processor-kwargs", type=json.loads, default=None,
                   help="JSON object: image and video preprocessing of a vision-language model (Qwen-VL: min_pixels, "
                        "max_pixels, fps; "
                        "Nemotron VL: min_dynamic_patch, max_dynamic_patch, dynamic_image_size)")
    g.add_argument("--truncate-prompt-tokens", type=int, default=None, help="-1: the model's maximum")
    g.add_argument("--truncation-side", choices=("left", "right"), default=None)
    g.add_argument("--no-activation", action="store_true", help="write raw logits as probs")
    r = p.add_argument_group("ray")
    r.add_argument("--ray-address", default=None, help="'local' starts a local cluster; 'auto' or HOST:PORT joins one")
    r.add_argument("--num-replicas", type=int, default=None, help="engines (default: one per GPU, or 1)")
    r.add_argument("--num-gpus-per-replica", type=float, default=None, help="default: 1 where the cluster has GPUs")
    r.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    r.add_argument("--batch-size", type=int, default=1024, help="rows per engine call on Ray")
    return p


def _check_args(a):
    """Argument errors, before any file is read or model loaded."""
    if a.token_ids_column is not None and (a.text_column is not None or a.pair_column is not None):
        raise ValueError("--token-ids-column replaces --text-column/--pair-column; give one or the other")
    if a.token_ids_column is None and a.text_column is None:
        a.text_column = "text"
    for flag in ("shard_size", "batch_size", "num_replicas"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    formats = {file_format(a.input, "--input"), file_format(a.output, "--output")}
    need = (["pyarrow"] if "parquet" in formats else []) + (["ray", "ray.data", "pyarrow"] if a.ray_address else [])
    for module in dict.fromkeys(need):
        try:
            importlib.import_module(module)
        except ImportError as e:
            why = "--ray-address needs Ray Data" if module.startswith("ray") else "Parquet needs pyarrow"
            raise ValueError(f"{why}: pip install 'ray[data]' pyarrow ({e})") from None
    if os.path.abspath(a.input) == os.path.abspath(a.output):
        raise ValueError("--output must not be the --input file")
    if a.score_template is not None and a.pair_column is None and a.pair_image_column is None:
        raise ValueError("--score-template renders pairs; it needs --pair-column or --pair-image-column")
    for flag in ("image_column", "pair_image_column"):
        if getattr(a, flag) is not None and (a.pair_column is not None or a.token_ids_column is not None):
            raise ValueError(f"--{flag.replace('_', '-')} goes with --text-column alone")
    if a.image_column is not None and a.pair_image_column is not None:
        raise ValueError("give --image-column or --pair-image-column, not both")
    for flag in ("hf_overrides", "pooler_config", "mm_processor_kwargs"):
        if getattr(a, flag) is not None and not isinstance(getattr(a, flag), dict):
            raise ValueError(f"--{flag.replace('_', '-')} must be a JSON object")


def classifier_kwargs(a) -> dict:
    """PyEngineClassifier's keywords from the parsed arguments."""
    kw = dict(model=os.path.abspath(a.model), text_column=a.text_column, pair_column=a.pair_column,
              token_ids_column=a.token_ids_column, output_prefix=a.output_prefix,
              truncate_prompt_tokens=a.truncate_prompt_tokens, truncation_side=a.truncation_side,
              use_activation=False if a.no_activation else None, dtype=a.dtype, device=a.device,
              max_model_len=a.max_model_len, max_num_batched_tokens=a.max_num_batched_tokens,
              max_num_seqs=a.max_num_seqs, hf_overrides=a.hf_overrides, pooler_config=a.pooler_config,
              kernel_backend=a.kernel_backend, convert=a.convert, enforce_eager=a.enforce_eager)
    if a.lora is not None:
        kw.update(lora_path=os.path.abspath(a.lora), max_lora_rank=a.max_lora_rank)
    if a.score_template is not None:
        # The template's text, not its path: it is part of what makes two runs the same job.
        kw["score_template"] = read_template(a.score_template, "--score-template")
    if a.tokenizer is not None:
        kw["tokenizer"] = os.path.abspath(a.tokenizer)
    if a.image_column is not None:
        kw.update(image_column=a.image_column, image_root=os.path.dirname(os.path.abspath(a.input)))
    if a.pair_image_column is not None:
        kw.update(pair_image_column=a.pair_image_column, image_root=os.path.dirname(os.path.abspath(a.input)))
    if a.mm_processor_kwargs is not None:
        kw["mm_processor_kwargs"] = a.mm_processor_kwargs
    return kw


def _columns(a) -> list[str]:
    """The input columns the job reads."""
    return [c for c in (a.text_column, a.pair_column, a.token_ids_column, a.image_column, a.pair_image_column)
            if c is not None]


def _identity(a, kw) -> dict:
    """What makes two runs the same job: their shards may be mixed."""
    st = os.stat(a.input)
    # These do not change results; but for the token budget where it may set the length
    # limit (max_model_len defaults to at most the budget) and prompts are cut to that limit.
    speed_only = ("device", "max_num_seqs", "kernel_backend", "enforce_eager")
    if a.truncate_prompt_tokens != -1 or a.max_model_len is not None:
        speed_only += ("max_num_batched_tokens",)
    same = {k: v for k, v in kw.items() if k not in speed_only}
    return {"input": os.path.abspath(a.input), "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns,
            "shard_size": a.shard_size, **same}


class _ShardClassifier(PyEngineClassifier):
    """On Ray: returns the outputs and where they go (shard, row), not the prompts.
    shard_size: the job's, so that an error names the input row."""

    def __init__(self, shard_size, **kw):
        super().__init__(**kw)
        self.shard_size = shard_size

    def __call__(self, batch):
        import numpy as np

        shards, rows = batch["__shard"], batch["__i"]
        try:
            outputs = self.predict(batch)
        except (ValueError, TypeError) as e:
            # An input error goes back as data: Ray would retry the task, and the driver
            # gets its exception only as text inside Ray's own.
            msg = _name_row(str(e), lambda j: (int(shards[j]), int(shards[j]) * self.shard_size + int(rows[j])))
            return {"__shard": shards[:1], "__i": rows[:1], "__error": np.array([msg], dtype=object)}
        return {"__shard": shards, "__i": rows, **outputs}


def _name_row(message, where) -> str:
    """An engine error about prompts[j] (or pairs[j]) of one call, restated for the
    input file: where(j) -> (shard, input row)."""
    found = prompt_error(message)
    if found is not None:
        k, row = where(found[0])
        return f"input row {row} (shard {k}): {found[1]}"
    m = re.match(r"(columns? '[^']*'(?:, '[^']*')*), row (\d+) of this batch:? ?", message)  # PyEngineClassifier's
    if m is None:
        return message
    k, row = where(int(m[2]))
    return f"input row {row} (shard {k}): {m[1]}: {message[m.end():]}"



class ShardCollector:
    """Regroups output rows that arrive in any order, any number of times (Ray retries
    tasks), into whole shards, each handed out once. Holds only the outputs."""

    def __init__(self, plan):
        self.plan = plan
        self.partial = {}  # shard -> (filled flags, {output column: values})
        self.finished = set()

    def add(self, shards, rows, outputs: dict):
        """Rows (shard k, row i of it) with their ``outputs`` columns. Returns (the number
        of rows not seen before, [(k, {column: values}) for each shard now complete])."""
        new, touched = 0, set()
        for j, (k, i) in enumerate(zip(shards, rows)):
            if k in self.finished:
                continue
            if k not in self.partial:
                start, stop = self.plan.shard_rows(k)
                self.partial[k] = ([False] * (stop - start), {c: [None] * (stop - start) for c in outputs})
            filled, vals = self.partial[k]
            if not filled[i]:
                filled[i] = True
                new += 1
                for c in outputs:
                    vals[c][i] = outputs[c][j]
            touched.add(k)
        done = [k for k in sorted(touched) if all(self.partial[k][0])]
        self.finished.update(done)
        return new, [(k, self.partial.pop(k)[1]) for k in done]


class _PromptReader:
    """On Ray: shard numbers -> that shard's prompt columns, tagged with (shard, row)."""

    def __init__(self, plan, columns):
        self.reader, self.columns = ShardReader(plan), columns

    def __call__(self, batch):
        import numpy as np

        out = {c: [] for c in ("__shard", "__i", *self.columns)}
        for k in batch["shard"].tolist():
            cols = self.reader.prompts(k, self.columns)
            n = len(cols[self.columns[0]])
            out["__shard"] += [k] * n
            out["__i"] += range(n)
            for c in self.columns:
                out[c] += cols[c]
        arrays = {c: np.asarray(out[c], dtype=np.int64) for c in ("__shard", "__i")}
        for c in self.columns:  # object arrays keep ragged token-id lists as lists
            arrays[c] = np.empty(len(out[c]), dtype=object)
            arrays[c][:] = out[c]
        return arrays


def _run_local(a, plan, store, pending, kw, bar, on_shard_done):
    reader = ShardReader(plan)
    clf = PyEngineClassifier(**kw)
    cols = _columns(a)
    with ThreadPoolExecutor(1, thread_name_prefix="pyengine-read") as pool:
        ahead = pool.submit(reader.rows, pending[0]) if pending else None
        for j, k in enumerate(pending):
            rows = ahead.result()
            if j + 1 < len(pending):  # read the next shard while this one runs
                ahead = pool.submit(reader.rows, pending[j + 1])
            batch = {c: [r[c] for r in rows] for c in cols} if isinstance(rows, list) else rows.select(cols)
            try:
                outputs = clf.predict(batch)
            except (ValueError, TypeError) as e:
                start = plan.shard_rows(k)[0]
                raise ValueError(_name_row(str(e), lambda j: (k, start + j))) from e
            store.write(k, rows, outputs)
            bar.update(len(rows))
            if on_shard_done is not None:
                on_shard_done(k)


def _run_ray(a, plan, store, pending, kw, bar, on_shard_done):
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=a.ray_address)
    try:
        gpus_in_cluster = ray.cluster_resources().get("GPU", 0)
        gpus = a.num_gpus_per_replica if a.num_gpus_per_replica is not None else (1 if gpus_in_cluster else 0)
        replicas = a.num_replicas or (max(1, int(gpus_in_cluster // gpus)) if gpus else 1)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts rows
        # The reader runs on this node: the input need not be on a shared filesystem.
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
        cols = _columns(a)
        ds = ray.data.from_items([{"shard": k} for k in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(_PromptReader, fn_constructor_kwargs={"plan": plan, "columns": cols}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0, label_selector=here)
        ds = ds.map_batches(_ShardClassifier, fn_constructor_kwargs={**kw, "shard_size": plan.shard_size},
                            batch_size=a.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=replicas), num_gpus=gpus,
                            num_cpus=a.num_cpus_per_replica)
        reader, collector = ShardReader(plan), ShardCollector(plan)
        for tbl in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if "__error" in tbl.column_names:
                raise ValueError(tbl.column("__error")[0].as_py())
            # the bookkeeping columns by name: an --output-prefix may start with "__" too
            outs = {c: tbl.column(c).to_pylist() for c in tbl.column_names if c not in ("__shard", "__i")}
            new, finished = collector.add(tbl.column("__shard").to_pylist(), tbl.column("__i").to_pylist(), outs)
            bar.update(new)
            for k, vals in finished:
                store.write(k, reader.rows(k), vals)
                if on_shard_done is not None:
                    on_shard_done(k)
        missing = sorted(set(pending) - collector.finished)
        if missing:
            raise RuntimeError(f"Ray Data finished without all the rows of shard(s) {missing[:10]}")
    finally:
        if started:
            ray.shutdown()


def _vocab_size(config):
    """The model's vocabulary size from its (text) config, or None where it has none."""
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
    except (AttributeError, ValueError):
        text = config
    v = getattr(text, "vocab_size", None)
    return v if isinstance(v, int) and v > 0 else None


def run(a, on_shard_done=None):
    """Run the job of parsed arguments ``a``. ``on_shard_done(k)`` is called after shard k
    is on disk (tests interrupt a run from it). Returns the number of rows scored."""
    _check_args(a)
    kw = classifier_kwargs(a)
    from .models import resolve_architecture
    from .models.loader import load_hf_config

    # A bad model directory fails now, not after scanning the input or starting Ray.
    config = load_hf_config(kw["model"], a.hf_overrides)
    resolve_architecture(config, a.convert)
    pairs = "--pair-column" if a.pair_column else "--pair-image-column" if a.pair_image_column else None
    if pairs is not None and config.num_labels != 1:
        raise ValueError(f"{pairs} needs a cross-encoder (num_labels == 1); {a.model} has "
                         f"num_labels={config.num_labels}")
    kind = "ids" if a.token_ids_column is not None else "text"
    cols = _columns(a)
    outputs = [a.output_prefix + c for c in (("score",) if pairs else ("probs", "label"))]
    plan = scan_input(a.input, a.shard_size, cols, kind, outputs, a.image_column or a.pair_image_column,
                      kw.get("image_root"), _vocab_size(config), file_format(a.output, "--output"))
    store = ShardStore(a.output, _identity(a, kw), plan.num_shards, overwrite=a.overwrite, schema=plan.schema)
    try:
        done = store.done()
        pending = [k for k in range(plan.num_shards) if k not in done]
        skipped = sum(plan.shard_rows(k)[1] - plan.shard_rows(k)[0] for k in done)
        t0 = time.perf_counter()
        with tqdm(total=plan.num_rows, initial=skipped, unit="row", desc="Scoring", disable=a.no_progress) as bar:
            if pending:
                runner = _run_ray if a.ray_address else _run_local
                runner(a, plan, store, pending, kw, bar, on_shard_done)
        n, dt = plan.num_rows - skipped, time.perf_counter() - t0
        store.assemble()
    finally:
        store.close()
    resumed = f" ({len(done)} of {plan.num_shards} shards were already done)" if done else ""
    print(f"scored {n} rows in {dt:.1f}s ({n / max(dt, 1e-9):.1f} rows/s){resumed}; wrote {a.output}",
          file=sys.stderr)
    return n


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:  # the message says it all
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
