"""`python -m pyengine.bench vision`: a vision-language classifier on prompts with
images, pyengine against transformers on the same weights, pixels and token ids.

Workload: N prompts, each one image (its size drawn, seeded, from a few shapes) between
two runs of random text ids (lengths round(exp(N(ln 40, 0.6))) clipped to [4, 256]); with
``--video-frames F`` (Qwen-VL presets but Qwen3-VL) each image is a video of F frames of
that size instead.
Presets: ``qwen2.5-vl-tiny`` (the CPU default), ``qwen2-vl-2b`` and ``qwen2.5-vl-3b``
(their published shapes, random weights; the GPU default is ``qwen2-vl-2b``), and the
Nemotron VL rerankers' ``nemotron-vl-tiny`` and ``nemotron-vl-1b`` (pyengine.bench.nemotron_vl:
each image cut into tiles, at most two and a thumbnail).
Providers: pyengine's ``LLM.classify``; transformers one prompt at a time
(``hf-single``, a seeded sample) and in length-sorted batches of 16, right-padded
(``hf-sorted-b16``), each fed the pixel values pyengine's preprocessing makes (run inside
their timed passes too), so the providers differ in the model run only. Reported: sequences/s, images/s, tokens/s
(median of the timed repeats), peak GPU memory, the largest probability difference to
transformers. The table is printed last; ``--json PATH`` writes every number. With videos,
transformers is given pyengine's rotary positions (transformers 5 places the text after a
video otherwise; see pyengine.multimodal), so the comparison is of the model run alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

from .report import environment, median, output_path_error, parse_device, timed

_SPECIAL = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
# name -> (config class, text config, vision config)
PRESETS = {
    "qwen2.5-vl-tiny": ("Qwen2_5_VLConfig",
                        dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                     "mrope_section": [8, 12, 12]}),
                        dict(depth=4, hidden_size=128, intermediate_size=384, num_heads=2, out_hidden_size=256,
                             window_size=112, fullatt_block_indexes=[1, 3])),
    "qwen2-vl-2b": ("Qwen2VLConfig",
                    dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                 "mrope_section": [16, 24, 24]}),
                    dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536)),
    "qwen2.5-vl-3b": ("Qwen2_5_VLConfig",
                      dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                           num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                   "mrope_section": [16, 24, 24]}),
                      dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
}
VOCAB = 4096  # random text ids below the placeholders; the size does not change the work measured
SHAPES = ((224, 224), (336, 448), (448, 336), (168, 280), (280, 168))


def _all_presets():
    from .nemotron_vl import PRESETS as NEMOTRON

    return list(PRESETS) + list(NEMOTRON)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m pyengine.bench vision", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help=f"one of {', '.join(_all_presets())} (default qwen2-vl-2b on a GPU, "
                                    "qwen2.5-vl-tiny on CPU)")
    p.add_argument("--num-prompts", type=int, help="prompts (default 256 on GPU, 32 on CPU)")
    p.add_argument("--repeats", type=int, help="timed repeats after a warm-up pass (default 3 on GPU, 1 on CPU)")
    p.add_argument("--single-sample", type=int, default=8, help="prompts hf-single runs (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video-frames", type=int, default=0, metavar="F",
                   help="a video of F frames per prompt in place of the image (Qwen2-VL / Qwen2.5-VL presets)")
    p.add_argument("--cache-dir", help="where the checkpoint is saved (default $PYENGINE_BENCH_CACHE or "
                                       "~/.cache/pyengine/bench)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    return p


def _checkpoint(name, dtype, device, cache_dir, seed):
    """The preset saved once with a tokenizer-free config and a score head (built in a
    temporary directory and renamed: model.safetensors is written twice, and a run killed
    in between must not leave one without the score head)."""
    import transformers
    from safetensors.torch import load_file, save_file

    if name not in PRESETS:
        from . import nemotron_vl

        return nemotron_vl.checkpoint(name, VOCAB, dtype, device, cache_dir, seed)
    cls, text, vis = PRESETS[name]
    ids = list(range(VOCAB, VOCAB + len(_SPECIAL)))
    cfg = getattr(transformers, cls)(
        text_config=dict(text, vocab_size=VOCAB + 8, max_position_embeddings=32768), vision_config=vis,
        vision_start_token_id=ids[0], image_token_id=ids[1], vision_end_token_id=ids[2], video_token_id=ids[2] + 1)
    tokens = {"start": ids[0], "image_token_id": ids[1], "end": ids[2], "video_token_id": ids[2] + 1}
    path = os.path.join(cache_dir, f"{name}-{str(dtype).split('.')[-1]}-{seed}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path, tokens
    from .presets import _randomize, building

    gen = getattr(transformers, cls.replace("Config", "ForConditionalGeneration"))
    with building(path, "model.safetensors") as tmp:
        torch.manual_seed(seed)
        with torch.device(device):
            model = gen(cfg).to(dtype)
        _randomize(model, seed)
        model.config.architectures = [cls.replace("Config", "ForSequenceClassification")]
        model.config.num_labels = 2
        model.save_pretrained(tmp)
        del model
        w = load_file(os.path.join(tmp, "model.safetensors"))
        g = torch.Generator().manual_seed(seed + 1)
        w["score.weight"] = (torch.randn(2, text["hidden_size"], generator=g) * text["hidden_size"] ** -0.5).to(dtype)
        save_file(w, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    return path, tokens


def workload(n, seed, image_token_id, start, end, frames=0):
    """n prompts: (token ids with one placeholder, a uint8 image (H, W, 3), or with
    ``frames`` a uint8 video (frames, H, W, 3); ``image_token_id`` is then the video's)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(np.clip(round(math.exp(rng.normal(math.log(40), 0.6))), 4, 256)) for _ in range(2))
        h, w = SHAPES[rng.integers(len(SHAPES))]
        ids = rng.integers(1, VOCAB, a).tolist() + [start, image_token_id, end] + rng.integers(1, VOCAB, b).tolist()
        out.append((ids, rng.integers(0, 256, (frames, h, w, 3) if frames else (h, w, 3), dtype=np.uint8)))
    return out


def _hf(path, dtype, device, cls):
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # score.weight is ours: not a weight it knows
    try:
        model = getattr(transformers, cls.replace("Config", "ForConditionalGeneration")).from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    finally:
        transformers.logging.set_verbosity(level)
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        score = f.get_tensor("score.weight").float().to(device)
    return model, score


def hf_run(model, score, prepared, batch, device, video=False):
    """Probabilities of transformers on prepared (expanded ids, pixels, grid, rotary
    positions) prompts, in length-sorted right-padded batches of ``batch`` (1: one at a
    time). video: the pixels are videos' (the positions are then passed along)."""
    order = sorted(range(len(prepared)), key=lambda i: len(prepared[i][0]))
    out = torch.empty(len(prepared), score.shape[0])
    pad_id = 0
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            width = max(len(prepared[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(idx):
                ids[j, :len(prepared[i][0])] = torch.tensor(prepared[i][0])
                mask[j, :len(prepared[i][0])] = 1
            pix = torch.cat([prepared[i][1] for i in idx]).to(device, model.dtype)
            grid = torch.tensor([prepared[i][2] for i in idx], device=device)
            ids, mask = ids.to(device), mask.to(device)
            if video:
                pos = torch.zeros((3, len(idx), width), dtype=torch.long)
                for j, i in enumerate(idx):
                    pos[:, j, :len(prepared[i][0])] = prepared[i][3]
                kw = dict(pixel_values_videos=pix, video_grid_thw=grid, position_ids=pos.to(device),
                          mm_token_type_ids=2 * (ids == model.config.video_token_id).int())
            else:
                kw = dict(pixel_values=pix, image_grid_thw=grid,
                          mm_token_type_ids=(ids == model.config.image_token_id).int())
            h = model.model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
            last = h[torch.arange(len(idx), device=device), mask.sum(1) - 1].float()
            out[idx] = (last @ score.t()).softmax(-1).cpu()
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(parser, spec, "auto, cpu, cuda or cuda:N")
    gpu = device.type == "cuda"
    preset = args.preset or ("qwen2-vl-2b" if gpu else "qwen2.5-vl-tiny")
    if preset not in _all_presets():
        parser.error(f"unknown preset {preset!r}; presets: {', '.join(_all_presets())}")
    dtypes = {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32, "fp32": torch.float32,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if args.dtype not in dtypes:
        parser.error(f"--dtype must be one of {', '.join(dtypes)}, got {args.dtype!r}")
    dtype = dtypes[args.dtype]
    n = args.num_prompts or (256 if gpu else 32)
    repeats = args.repeats or (3 if gpu else 1)
    for name in ("num_prompts", "repeats", "single_sample"):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    frames = args.video_frames
    if frames < 0 or (frames and (preset not in PRESETS or PRESETS[preset][0].startswith("Qwen3"))):
        parser.error(f"--video-frames takes a positive frame count and a Qwen2-VL or Qwen2.5-VL preset, got "
                     f"{frames} frames on {preset}")
    why = output_path_error(args.json) if args.json is not None else None
    if why:
        parser.error(f"--json {why}")
    cache = args.cache_dir or os.environ.get("PYENGINE_BENCH_CACHE") or os.path.expanduser("~/.cache/pyengine/bench")

    from ..inputs import _image_pool
    from ..llm import LLM
    from ..multimodal import Video

    path, tokens = _checkpoint(preset, dtype, device, cache, args.seed)
    llm = LLM(path, dtype=str(dtype).split(".")[-1], device=str(device))
    proc = llm.engine.inputs.images
    kind = "video" if frames else "image"
    work = workload(n, args.seed, tokens[f"{kind}_token_id"], tokens["start"], tokens["end"], frames)
    prompts = [{"prompt_token_ids": ids, "multi_modal_data": {kind: x}} for ids, x in work]

    def prepare(items):
        """(expanded ids, pixels, grid, positions) per prompt: pyengine's preprocessing on
        its image threads, which the transformers providers also run inside their timed passes."""
        def one(i):
            ids, x = items[i]
            expanded, mm = proc.prompt(ids, [Video(x) if frames else x], f"prompt {i}")
            pix = proc.finish_video(mm.video_values) if frames else proc.finish(mm.pixel_values)
            return expanded, pix, mm.grids[0], mm.rope_positions
        pool = _image_pool()
        return list(pool.map(one, range(len(items))) if pool else map(one, range(len(items))))

    prepared = prepare(work)
    num_tokens = sum(len(p[0]) for p in prepared)
    rows = []

    def measure(name, fn, count):
        fn()  # warm-up: kernel compilation, allocator
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times, out = [], None
        for _ in range(repeats):
            t, out = timed(fn, device)
            times.append(t)
        t = median(times)
        row = {"provider": name, "prompts": count, "seq_per_s": count / t, "images_per_s": count / t,
               "tokens_per_s": sum(len(p[0]) for p in prepared[:count]) / t,
               "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if gpu else None}
        rows.append(row)
        return out

    ours = measure("pyengine", lambda: torch.tensor(
        [o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)]), n)
    ops = llm.engine.ops.describe()
    del llm
    if preset in PRESETS:
        model, score = _hf(path, dtype, device, PRESETS[preset][0])

        def hf(ps, batch):
            return hf_run(model, score, ps, batch, device, video=bool(frames))
    else:
        from .nemotron_vl import Baseline

        hf = Baseline(path, dtype, device).run
    ref = measure("hf-sorted-b16", lambda: hf(prepare(work), 16), n)
    k = min(args.single_sample, n)
    measure("hf-single", lambda: hf(prepare(work[:k]), 1), k)
    diff = float((ours - ref).abs().max())
    env = environment(device)
    report = {"env": env, "preset": preset, "dtype": str(dtype), "num_prompts": n, "num_tokens": num_tokens,
              "images": 0 if frames else n, "videos": n if frames else 0, "video_frames": frames, "ops": ops,
              "max_abs_diff_vs_hf": diff, "rows": rows}
    base = rows[1]["seq_per_s"]
    print(f"\n{env['device_name']} | torch {env['torch']} | triton {env['triton']} | transformers "
          f"{env['transformers']} | {env['date']}")
    media = f"a video of {frames} frames" if frames else "one image"
    print(f"{preset}, {str(dtype).split('.')[-1]}: {n} prompts with {media} each, {num_tokens} tokens; "
          f"pyengine ops: {ops}; max |p - p_hf| = {diff:.2e}")
    print(f"{'provider':<16}{'seq/s':>10}{'videos/s' if frames else 'images/s':>10}{'tokens/s':>12}"
          f"{'vs hf-b16':>11}{'peak GiB':>10}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['provider']:<16}{r['seq_per_s']:>10.1f}{r['images_per_s']:>10.1f}{r['tokens_per_s']:>12.0f}"
              f"{r['seq_per_s'] / base:>10.2f}x{peak:>10}")
    if args.json:  # after the table: a JSON write that fails must not lose it
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
