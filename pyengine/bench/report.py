"""Environment, matmul peak, timing and the printed table of the model benchmark."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def environment(device: torch.device) -> dict:
    """Device name and library versions of this run."""
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .. import __version__

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, " \
               f"{torch.get_num_threads()} torch threads)"
    from ..kernels import _tuned

    tuned = _tuned.source(device)
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "pyengine": __version__,
            "kernel_configs": str(tuned) if tuned else "built-in",
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def output_path_error(path: str) -> str | None:
    """Why ``path`` cannot be written as an output file (a directory, a missing or
    read-only folder, a read-only file), or None; checked before a run, so that its end
    is not lost."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path!r} is a directory, not a file"
    if not os.path.isdir(parent):
        return f"{path!r}: directory {parent!r} does not exist"
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        return f"{path!r} cannot be written (no write permission)"
    return None


def parse_device(parser, spec: str, choices: str = "cpu, cuda or cuda:N") -> torch.device:
    """``spec`` as a torch device this benchmark runs on (cpu or an available cuda), or a
    parser error naming what is wrong, before any work."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        parser.error(f"--device {spec!r} is not a device; use {choices}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {spec!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {spec}: torch sees no CUDA device")
    return device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of fn() with the device synchronised on both ends."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def matmul_peak(device: torch.device) -> dict:
    """Measured matmul throughput: bf16 8192^3 on a GPU, fp32 1024^3 on CPU (labelled:
    a CPU has no fast bf16 path). Best of several timed products, in FLOP/s."""
    if device.type == "cuda":
        n, dtype, reps, label = 8192, torch.bfloat16, 10, "bf16 matmul 8192^3"
    else:
        n, dtype, reps, label = 1024, torch.float32, 3, "fp32 matmul 1024^3 (CPU)"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.matmul(a, b)  # warm-up: library init and kernel choice

    def products():
        for _ in range(reps):
            torch.matmul(a, b, out=out)

    best = min(timed(products, device)[0] for _ in range(3)) / reps
    del a, b, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"label": label, "flops_per_s": 2.0 * n ** 3 / best}


def median(xs):
    return statistics.median(xs) if xs else None


def _fmt(x, spec, none="n/a"):
    return none if x is None else format(x, spec)


def _mem(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def format_table(report: dict) -> str:
    """The human-readable report: one block per preset, then the peak and environment."""
    lines = []
    for res in report["results"]:
        head = f"== {res['preset']}"
        if res.get("status") == "skipped":
            lines += [f"{head}: skipped: {res['reason']}", ""]
            continue
        w = res["workload"]
        lines.append(f"{head} ({res['architecture']}, {res['layers']} layers, hidden {res['hidden_size']}) | "
                     f"{w['name']}: {w['num_prompts']} prompts, {w['num_tokens']} tokens "
                     f"(mean {w['mean_len']:.1f}, {w['min_len']}..{w['max_len']}) | {res['dtype']} on "
                     f"{res['device']} | median of {res['repeats']} timed pass(es)")
        cols = f"{'provider':<42}{'seq/s':>10}{'tok/s':>12}{'median s':>10}{'cpu s':>9}{'%peak':>8}" \
               f"{'peak mem':>11}{'max|dprob|':>12}{'argmax':>8}"
        lines += [cols, "-" * len(cols)]
        for p in res["providers"]:
            label = p["label"] + (f" [{p['num_prompts']} sampled]" if p.get("sampled") else "")
            if p["status"] != "ok":
                lines.append(f"{label:<42}  {p['status']}: {p['reason']}")
                continue
            frac = None if p["frac_peak"] is None else 100 * p["frac_peak"]
            agree = None if p["argmax_agree"] is None else 100 * p["argmax_agree"]
            dp = "ref" if p["name"] == res["reference"] else _fmt(p["max_abs_dprob"], ".2e")
            lines.append(f"{label:<42}{p['seq_per_s']:>10.1f}{p['tok_per_s']:>12.0f}{p['median_s']:>10.3f}"
                         f"{p['cpu_s']:>9.2f}"
                         f"{_fmt(frac, '.2f'):>7}%{_mem(p['peak_mem_bytes']):>11}{dp:>12}"
                         f"{'ref' if dp == 'ref' else _fmt(agree, '.1f') + '%':>8}")
        ratios = res["ratios"]
        if ratios:
            bases = list(next(iter(ratios.values())))
            lines.append("")
            lines.append(f"{'pyengine speed-up (seq/s ratio)':<42}" + "".join(f"{b:>16}" for b in bases))
            for name, row in ratios.items():
                lines.append(f"{name:<42}" + "".join(f"{row[b]:>15.2f}x" for b in bases))
        if res.get("baseline_to_beat"):
            best = res["best_pyengine"]
            lines.append(f"baseline to beat: {res['baseline_to_beat']} (better of the sorted ones); "
                         f"{best}: {ratios[best][res['baseline_to_beat']]:.2f}x")
        if res.get("reference"):
            lines.append(f"max|dprob|, argmax agreement: against {res['reference_label']} ({res['reference']}), "
                         "same prompts")
        lines += [f"note: {p['note']}" for p in res["providers"] if p.get("note")]
        ok = [p for p in res["providers"] if p["status"] == "ok"]
        if res["device"] == "cpu" and ok:
            # Wall time on a machine shared with other work runs long; CPU time shows it.
            use = sum(p["cpu_s"] for p in ok) / sum(p["median_s"] for p in ok)
            lines.append(f"note: the timed passes kept {use:.2f} of {res['torch_threads']} torch threads busy "
                         "on average (well below means the machine was shared and the times are inflated)")
        lines.append("cpu s: process CPU time of the median pass, all threads (on a GPU: the host's share)")
        lines.append("")
    pk = report["peak"]
    unit = "TFLOP/s" if pk["flops_per_s"] > 1e12 else "GFLOP/s"
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    lines.append(f"%peak: nominal model matmul FLOPs (2 x linear params x tokens + attention, every layer on every "
                 f"real token, padding not counted) per second, over the {pk['label']} measured in this run: "
                 f"{pk['flops_per_s'] / scale:.1f} {unit}; work an engine skips (a last layer run for pooled rows "
                 "only) still counts, so shallow models can read high")
    env = report["env"]
    lines.append(f"environment: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
                 f"transformers {env['transformers']} | pyengine {env['pyengine']} | "
                 f"python {env['python']} | kernel configs {env.get('kernel_configs', 'built-in')} | {env['date']}")
    return "\n".join(lines)
