"""Where one engine pass spends its time: host vs GPU, and the top kernels.

usage: python scripts/profile_engine.py [--preset bert-base,qwen3-0.6b] [--backend auto]
       [--num-prompts 2048] [--top 12] [--enforce-eager]

For each preset (random weights, DESIGN's mixed workload, bf16 on CUDA) it times one
warm LLM.classify pass, then profiles another with torch.profiler and prints: the wall
time, the summed GPU kernel time (GPU busy share = kernel time / wall), and the top
kernels and host ops by self time. A busy share well under 1 says the pass is
host-bound (launches, syncs, Python).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from pyengine import LLM
from pyengine.bench import presets as P
from pyengine.bench.workloads import synthetic


def profile(name, backend, num_prompts, top, cache_dir, enforce_eager=False):
    config = P.preset_config(name)
    path = P.build_checkpoint(name, config, cache_dir, torch.bfloat16, "cuda")
    facts = P.model_facts(config)
    work = synthetic("mixed", num_prompts, 0, config.vocab_size, facts["ends"], facts["special_ids"],
                     min(facts["max_len"], 16384))
    llm = LLM(path, dtype="bfloat16", device="cuda", kernel_backend=backend, enforce_eager=enforce_eager)
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    llm.classify(prompts, use_tqdm=False)  # compiles, warms the allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.classify(prompts, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        llm.classify(prompts, use_tqdm=False)
        torch.cuda.synchronize()
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    gpu_us = sum(getattr(e, dev_attr) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    graphs = llm.engine.graphs
    print(f"\n== {name} backend={backend} ops={llm.engine.ops.describe()} CUDA graphs: "
          + ("off" if graphs is None else f"{len(graphs.graphs)} captured, {graphs.disabled or 'on'}"))
    print(f"{num_prompts} prompts, {work.num_tokens} tokens: {wall * 1e3:.1f} ms wall "
          f"({num_prompts / wall:.0f} seq/s); GPU kernels {gpu_us / 1e3:.1f} ms "
          f"(busy {gpu_us / 1e3 / (wall * 1e3):.0%} of an unprofiled pass)")
    print(events.table(sort_by=dev_attr, row_limit=top, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    del llm
    torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bert-base,qwen3-0.6b")
    p.add_argument("--backend", default="auto")
    p.add_argument("--num-prompts", type=int, default=2048)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    cache = os.environ.get("PYENGINE_BENCH_CACHE") or os.path.join(tempfile.gettempdir(), "pyengine-bench")
    for name in a.preset.split(","):
        profile(name, a.backend, a.num_prompts, a.top, cache, a.enforce_eager)


if __name__ == "__main__":
    sys.exit(main())
