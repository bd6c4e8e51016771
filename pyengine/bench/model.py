"""The model benchmark: pyengine against transformers on the same token ids and weights.

``python -m pyengine.bench`` with no argument: on a GPU the four presets on the
"mixed" workload (2048 prompts, bf16, median of 5 timed repeats after a full warm-up
pass); on CPU the tiny preset on 256 prompts (fp32, one timed pass after a 32-prompt
warm-up, the one-at-a-time baseline on 64 of them: a pass of every provider takes
about a minute on two cores).
Per provider: sequences/s and tokens/s (median of the timed repeats),
the fraction of the matmul peak measured in the same run, peak GPU memory, and the
largest probability difference to transformers. The table is printed last;
``--json PATH`` writes every number.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch
from tqdm.auto import tqdm

from . import presets as P
from . import providers as PR
from .report import environment, format_table, matmul_peak, median, output_path_error, parse_device, timed
from .workloads import parse_workload, read_dataset, synthetic

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
CPU_WARMUP_PROMPTS = 32  # CPU kernels need no tuning pass; a short warm-up keeps the run short


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m pyengine.bench", description=__doc__.split("\n\n")[0],
        epilog="Other subcommands: `python -m pyengine.bench kernels ...` (op microbenchmarks), "
               "`python -m pyengine.bench serve ...` (the HTTP server), "
               "`python -m pyengine.bench vision ...` (a vision-language classifier).")
    p.add_argument("--preset", help=f"comma-separated presets ({', '.join(P.PRESETS)}); default "
                                    f"{','.join(P.GPU_PRESETS)} on a GPU, {','.join(P.CPU_PRESETS)} on CPU")
    p.add_argument("--model", metavar="DIR", help="a local checkpoint directory instead of a preset")
    p.add_argument("--layers", type=int, help="override the preset's number of layers (smaller runs)")
    p.add_argument("--workload", help="'mixed' (default) or 'fixed:N' (every prompt N tokens)")
    p.add_argument("--dataset", metavar="FILE", help="one text per line, or JSONL with 'text' and optional "
                                                     "'text_pair'; needs --model DIR for its tokenizer")
    p.add_argument("--num-prompts", type=int, help="prompts in the workload (default 2048 on GPU, 256 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--repeats", type=int, help="timed repeats after the warm-up (default 5 on GPU, 1 on CPU)")
    p.add_argument("--providers", help=f"comma-separated subset of {', '.join(PR.ALL_NAMES)} "
                                       "(or 'hf', 'pyengine'); default all that can run")
    p.add_argument("--single-sample", type=int, help="prompts the one-at-a-time baseline runs, a seeded sample "
                                                     "(0 = all; default 128 on GPU, 64 on CPU)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384,
                   help="pyengine's token budget per batch (default 16384); a prompt must fit one batch, so it also "
                        "caps the prompts' length, for every provider (mixed and dataset prompts are cut to it, "
                        "fixed:N must fit it)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="pyengine's sequences per batch")
    p.add_argument("--cache-dir", help="where preset checkpoints are saved (default $PYENGINE_BENCH_CACHE "
                                       "or ~/.cache/pyengine/bench)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check(args, parser):
    """Validate every argument and fill in the device-dependent defaults, before any work."""
    def need_positive(name, v, zero_ok=False):
        if v is not None and (v < 0 or (v == 0 and not zero_ok)):
            parser.error(f"--{name} must be {'>= 0' if zero_ok else 'a positive integer'}, got {v}")

    for name in ("layers", "num_prompts", "repeats", "threads", "max_num_batched_tokens", "max_num_seqs"):
        need_positive(name.replace("_", "-"), getattr(args, name))
    need_positive("single-sample", args.single_sample, zero_ok=True)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = args.device = parse_device(parser, args.device, "auto, cpu, cuda or cuda:N")
    gpu = device.type == "cuda"
    if args.dtype == "auto":
        args.dtype = torch.bfloat16 if gpu else torch.float32
    elif args.dtype.lower() in _DTYPES:
        args.dtype = _DTYPES[args.dtype.lower()]
    else:
        parser.error(f"--dtype {args.dtype!r}: expected auto, float32, bfloat16 or float16")
    if args.model is not None and args.preset is not None:
        parser.error("--model and --preset exclude each other")
    if args.model is not None:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            parser.error(f"--model {args.model!r} is not a checkpoint directory (no config.json)")
        from ..models.loader import _weight_files

        try:
            _weight_files(args.model)
        except FileNotFoundError as e:
            parser.error(f"--model: {e}")
        if args.layers is not None:
            parser.error("--layers applies to presets only, not to --model")
        args.presets = []
    else:
        names = (args.preset.split(",") if args.preset else list(P.GPU_PRESETS if gpu else P.CPU_PRESETS))
        unknown = [n for n in names if n not in P.PRESETS]
        if unknown:
            parser.error(f"unknown preset {', '.join(unknown)}; presets: {', '.join(P.PRESETS)}")
        args.presets = names
    if args.dataset is not None:
        if args.model is None:
            parser.error("--dataset needs --model DIR (its tokenizer turns the texts into tokens)")
        if args.workload is not None:
            parser.error("--dataset and --workload exclude each other")
        if not os.path.isfile(args.dataset):
            parser.error(f"--dataset {args.dataset!r} does not exist")
        from ..config import EngineConfig
        from ..engine import load_tokenizer

        try:  # the engine's own rules: no tokenizer files, or settings without a vocabulary, are refused
            tok = load_tokenizer(EngineConfig(model=args.model, device="cpu"))
        except ValueError as e:
            parser.error(f"--dataset: {e}")
        if tok is None:
            parser.error(f"--dataset needs a tokenizer: --model {args.model!r} has no tokenizer files")
        args.dataset_tokenizer = tok  # loaded once, here, for _prepare
    if args.max_num_batched_tokens is not None and args.max_num_batched_tokens < 8:
        parser.error(f"--max-num-batched-tokens must be at least 8 (the workloads' shortest prompt), got "
                     f"{args.max_num_batched_tokens}")
    args.workload = args.workload or "mixed"
    try:
        _, fixed = parse_workload(args.workload)
    except ValueError as e:
        parser.error(str(e))
    if fixed is not None:
        _check_fixed_length(args, fixed, parser)
    args.num_prompts = args.num_prompts or (None if args.dataset else 2048 if gpu else 256)
    args.repeats = args.repeats or (5 if gpu else 1)
    args.single_sample = (128 if gpu else 64) if args.single_sample is None else args.single_sample
    groups = {"hf": list(PR.HF_NAMES), "pyengine": list(PR.PYENGINE_NAMES)}
    chosen = []
    for name in (args.providers.split(",") if args.providers else ["hf", "pyengine"]):
        if name not in PR.ALL_NAMES and name not in groups:
            parser.error(f"unknown provider {name!r}; providers: {', '.join(PR.ALL_NAMES)} (or hf, pyengine)")
        chosen += groups.get(name, [name])
    args.providers = [n for n in PR.ALL_NAMES if n in chosen]
    unavailable = {n: PR.backend_unavailable(n.split("-", 1)[1], device)
                   for n in args.providers if n in PR.PYENGINE_NAMES}
    if all(unavailable.get(n) for n in args.providers):
        parser.error(f"no selected provider can run on {device}: "
                     + "; ".join(f"{n}: {why}" for n, why in unavailable.items()))
    if args.json is not None:
        why = output_path_error(args.json)
        if why:
            parser.error(f"--json {why}")
    args.cache_dir = args.cache_dir or os.environ.get("PYENGINE_BENCH_CACHE") or \
        os.path.join(os.path.expanduser("~"), ".cache", "pyengine", "bench")
    if args.presets:  # the presets' checkpoints are written there
        try:
            os.makedirs(args.cache_dir, exist_ok=True)
        except OSError as e:
            parser.error(f"--cache-dir {args.cache_dir!r} cannot be created: {e}")
        if not os.access(args.cache_dir, os.W_OK):
            parser.error(f"--cache-dir {args.cache_dir!r} is not writable")
    return args


def _check_fixed_length(args, length, parser):
    """A fixed:N workload must fit every selected model (or --model) and the token budget,
    whichever is smaller: refused here, before the matmul peak and the checkpoints."""
    from transformers import AutoConfig

    budget = args.max_num_batched_tokens
    for name in args.presets or [None]:
        config = P.preset_config(name, args.layers) if name else AutoConfig.from_pretrained(args.model,
                                                                                           local_files_only=True)
        max_len = P.model_facts(config)["max_len"]
        if length > min(max_len, budget):
            limit = f"--max-num-batched-tokens {budget} (a prompt must fit one batch)" if budget < max_len else \
                f"the maximum length of {f'preset {name}' if name else f'--model {args.model}'}, {max_len} tokens"
            parser.error(f"--workload {args.workload}: {length} tokens per prompt exceed {limit}")


def _log(msg):
    tqdm.write(msg, file=sys.stderr)


def _prepare(args, name):
    """(config, checkpoint dir, workload) of one preset (or of --model when name is None);
    or a reason string when pyengine cannot run it."""
    from transformers import AutoConfig

    if name is None:
        config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    else:
        config = P.preset_config(name, args.layers)
    missing = P.architecture_missing(config)
    if missing:
        return f"pyengine cannot run it yet: {missing}"
    facts = P.model_facts(config)
    limit = min(facts["max_len"], args.max_num_batched_tokens)
    if args.dataset:
        workload = read_dataset(args.dataset, args.dataset_tokenizer, limit, args.num_prompts)
    else:
        workload = synthetic(args.workload, args.num_prompts, args.seed, config.vocab_size, facts["ends"],
                             facts["special_ids"], limit)
    if name is None:
        path = args.model
    else:
        _log(f"[{name}] preparing the random-weight checkpoint under {args.cache_dir}")
        path = P.build_checkpoint(name, config, args.cache_dir, args.dtype, args.device)  # weights: seed 0
    return config, path, workload, facts


def _run_provider(prov, ctx, prompts, repeats, bar):
    """Set up, warm up and time one provider, then close it (run.close(), where it has one,
    also after an error). Returns (wall times, process CPU times, outputs, peak bytes, ops)."""
    dev = ctx.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    run = prov.setup(ctx)
    ops = getattr(run, "ops", None)
    try:
        warm = prompts if dev.type == "cuda" else prompts[:CPU_WARMUP_PROMPTS]
        timed(lambda: run(warm), dev)
        bar.update(1)
        times, cpu, out = [], [], None
        for _ in range(repeats):
            c0 = time.process_time()
            t, out = timed(lambda: run(prompts), dev)
            cpu.append(time.process_time() - c0)
            times.append(t)
            bar.update(1)
    finally:
        if hasattr(run, "close"):
            run.close()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    del run
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return times, cpu, out, peak, ops


def _compare(ok, outs):
    """Fill max_abs_dprob and argmax_agree of every finished provider against the
    reference: transformers one at a time (no padding at all) where it ran, else the
    first transformers baseline. Compared on the reference's prompts. Returns the
    reference row or None."""
    ref = next((r for r in ok if r["name"] == "hf-single"), next((r for r in ok if r["kind"] == "baseline"), None))
    for r in ok:
        r["max_abs_dprob"] = r["argmax_agree"] = None
        if ref is None or r is ref:
            continue
        ref_idx, ref_out = outs[ref["name"]]
        idx, out = outs[r["name"]]
        pos = {i: k for k, i in enumerate(idx)}
        mine = out[[pos[i] for i in ref_idx]]
        r["max_abs_dprob"] = (mine - ref_out).abs().max().item()
        # one label (sigmoid): the decision is the 0.5 threshold
        same = mine.argmax(-1) == ref_out.argmax(-1) if mine.shape[1] > 1 else (mine > 0.5) == (ref_out > 0.5)
        r["argmax_agree"] = same.float().mean().item()
    return ref


def bench_one(args, name, bar) -> dict:
    """Every selected provider on one preset (or --model). Returns its result record."""
    label = name or os.path.basename(os.path.normpath(args.model))
    steps = len(args.providers) * (1 + args.repeats)
    prep = _prepare(args, name)
    if isinstance(prep, str):
        _log(f"[{label}] skipped: {prep}")
        bar.update(steps)
        return {"preset": label, "status": "skipped", "reason": prep}
    config, path, workload, facts = prep
    budget = args.max_num_batched_tokens
    capped = sum(n == budget for n in workload.lengths) if budget < facts["max_len"] else 0
    if capped:
        _log(f"[{label}] note: --max-num-batched-tokens {budget} is below the model's limit of {facts['max_len']} "
             f"tokens: every provider's prompts are capped at {budget} ({capped} of {len(workload.prompts)} reach it)")
    ctx = PR.Context(path, args.device, args.dtype, args.max_num_batched_tokens, args.max_num_seqs,
                     None if facts["max_len"] <= args.max_num_batched_tokens else args.max_num_batched_tokens)
    n = len(workload.prompts)
    sample = list(range(n))
    if 0 < args.single_sample < n:
        g = torch.Generator().manual_seed(args.seed)
        sample = sorted(torch.randperm(n, generator=g)[:args.single_sample].tolist())
    linear = P.linear_params(config)
    flops_all = P.workload_flops(config, workload.lengths, linear)
    rows, outs = [], {}
    for prov in PR.providers(len(sample) < n):
        if prov.name not in args.providers:
            continue
        idx = sample if prov.sampled else list(range(n))
        row = {"name": prov.name, "label": prov.label, "kind": prov.kind, "sampled": prov.sampled,
               "num_prompts": len(idx), "status": "ok", "reason": None, "note": None}
        rows.append(row)
        reason = PR.backend_unavailable(prov.name.split("-", 1)[1], args.device) \
            if prov.kind == "pyengine" else None
        if reason:
            row.update(status="skipped", reason=reason)
            bar.update(1 + args.repeats)
            continue
        bar.set_description(f"{label} {prov.name}")
        prompts = [workload.prompts[i] for i in idx]
        try:
            times, cpu, out, mem, ops = _run_provider(prov, ctx, prompts, args.repeats, bar)
        except Exception as e:  # one broken provider must not lose the others' numbers
            _log(f"[{label}] {prov.name} failed:\n{traceback.format_exc()}")
            row.update(status="failed", reason=f"{type(e).__name__}: {e}"[:200])
            gc.collect()
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        outs[prov.name] = (idx, out)
        t = median(times)
        tokens = sum(len(p) for p in prompts)
        flops = flops_all if len(idx) == n else P.workload_flops(config, [len(p) for p in prompts], linear)
        row.update(times_s=times, median_s=t, seq_per_s=len(idx) / t, tok_per_s=tokens / t,
                   flops=flops, cpu_s=cpu[sorted(range(len(times)), key=times.__getitem__)[(len(times) - 1) // 2]],
                   peak_mem_bytes=mem, ops=ops)  # cpu_s: that of the median pass (the lower of two)
        if prov.sampled:
            row["note"] = (f"{prov.name} ran on a seeded sample of {len(idx)} of {n} prompts; its seq/s and tok/s "
                           "are rates on that sample, taken as the rates of the whole workload")
    ok = [r for r in rows if r["status"] == "ok"]
    ref = _compare(ok, outs)
    bases = [r for r in ok if r["kind"] == "baseline"]
    mine = [r for r in ok if r["kind"] == "pyengine"]
    ratios = {p["name"]: {b["name"]: p["seq_per_s"] / b["seq_per_s"] for b in bases} for p in mine}
    sorted_ok = [r for r in bases if r["name"] in ("hf-sorted-b64", "hf-sorted-b256")]
    beat = max(sorted_ok, key=lambda r: r["seq_per_s"])["name"] if sorted_ok and mine else None
    best = max(mine, key=lambda r: r["seq_per_s"])["name"] if mine else None
    return {"preset": label, "status": "ok", "model_dir": path, "architecture": config.architectures[0],
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size, "num_labels": config.num_labels,
            "dtype": str(args.dtype).replace("torch.", ""), "device": str(args.device),
            "workload": workload.summary(), "repeats": args.repeats,
            "linear_params": linear, "flops_per_pass": flops_all,
            "torch_threads": torch.get_num_threads(),
            "reference": ref["name"] if ref else None, "reference_label": ref["label"] if ref else None,
            "providers": rows, "ratios": ratios, "baseline_to_beat": beat, "best_pyengine": best}


def main(argv=None) -> int:
    parser = build_parser()
    args = _check(parser.parse_args(argv), parser)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-load bars would break up ours
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    _log(f"measuring the matmul peak on {env['device_name']}")
    first = matmul_peak(args.device)
    targets = args.presets or [None]
    total = len(targets) * len(args.providers) * (1 + args.repeats)
    results = []
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=args.no_progress) as bar:
        for name in targets:
            results.append(bench_one(args, name, bar))
    # Measured again at the end, the better of the two taken: a shared or warming
    # machine can make one measurement low, which would inflate every fraction.
    last = matmul_peak(args.device)
    peak = dict(first, flops_per_s=max(first["flops_per_s"], last["flops_per_s"]),
                measured=[first["flops_per_s"], last["flops_per_s"]])
    for res in results:
        for row in res.get("providers", []):
            if row["status"] == "ok":
                row["frac_peak"] = row["flops"] / row["median_s"] / peak["flops_per_s"]
    report = {"env": env, "peak": peak, "args": {k: (v if isinstance(v, (int, float, str, list, type(None)))
                                                     else str(v)) for k, v in vars(args).items()},
              "results": results}
    print(format_table(report))  # first: a JSON write that fails must not lose the table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        _log(f"wrote {args.json}")
    failed = [f"{r['preset']}/{p['name']}" for r in results if r["status"] == "ok"
              for p in r["providers"] if p["status"] == "failed"]
    if failed:
        print(f"failed providers: {', '.join(failed)}", file=sys.stderr)
    if not any(p["status"] == "ok" for r in results for p in r.get("providers", [])):
        why = "every preset was skipped" if all(r["status"] == "skipped" for r in results) else \
            "no provider row was measured (every one failed or was skipped)"
        print(f"nothing was benchmarked: {why}", file=sys.stderr)
        return 1
    return 1 if failed else 0
