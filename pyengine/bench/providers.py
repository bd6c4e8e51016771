"""Benchmark providers: one setup function each, returning ``run(prompts)`` that
classifies a whole list of token-id prompts and returns (N, num_labels) fp32
probabilities on the host, in input order.

Every provider starts from the same Python lists of token ids, so the cost of
turning them into tensors (padded for transformers, packed for pyengine) is inside
the timing for all of them.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from itertools import chain
from typing import Callable

import numpy as np
import torch

from ..ops import _available

HF_NAMES = ("hf-b32", "hf-sorted-b64", "hf-sorted-b256", "hf-single")
PYENGINE_BACKENDS = ("torch", "triton", "cuda")
# pyengine's default kernels without CUDA graphs: what the graphs gain, in one run; and
# with a LoRA adapter on every prompt: what an adapter costs.
PYENGINE_NAMES = tuple(f"pyengine-{b}" for b in PYENGINE_BACKENDS) + ("pyengine-eager", "pyengine-lora")
LORA_RANK = 16
ALL_NAMES = HF_NAMES + PYENGINE_NAMES


@dataclass
class Context:
    model_dir: str
    device: torch.device
    dtype: torch.dtype
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 256
    max_model_len: int | None = None


@dataclass
class Provider:
    name: str
    label: str
    kind: str          # "baseline" or "pyengine"
    setup: Callable    # setup(ctx) -> run(prompts) -> (N, L) fp32 tensor; run.close(), if set, frees what it holds
    sampled: bool = False  # runs on a sample of the prompts only (slow one-at-a-time)


def hf_activation(config) -> str:
    """The activation transformers users apply to these logits (as the design's
    classify semantics): identity for regression, sigmoid for multi-label or one
    label, softmax otherwise."""
    problem = getattr(config, "problem_type", None)
    if problem == "regression":
        return "identity"
    if problem == "multi_label_classification" or config.num_labels < 2:
        return "sigmoid"
    return "softmax"


def _act(logits, kind):
    x = logits.float()
    return x if kind == "identity" else torch.sigmoid(x) if kind == "sigmoid" else torch.softmax(x, -1)


def load_hf(model_dir, dtype, device):
    """transformers' model with SDPA attention, or its own (eager) attention for the
    architectures that have no SDPA path (DeBERTa)."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="sdpa", dtype=dtype)
    except ValueError as e:
        if "scaled_dot_product_attention" not in str(e):
            raise
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager",
                                                                   dtype=dtype)
    return model.to(device).eval()


def hf_setup(ctx: Context, batch_size: int, sort: bool):
    """transformers with SDPA (where the architecture has it): batches of ``batch_size``
    prompts, right-padded, in arrival order or sorted by length (outputs put back in input
    order)."""
    model = load_hf(ctx.model_dir, ctx.dtype, ctx.device)
    pad = model.config.pad_token_id
    if pad is None:  # decoders pick the last non-pad token; the synthetic ids never include 0
        pad = model.config.pad_token_id = 0
    act = hf_activation(model.config)
    num_labels = model.config.num_labels

    @torch.inference_mode()
    def run(prompts):
        n = len(prompts)
        order = sorted(range(n), key=lambda i: len(prompts[i])) if sort else list(range(n))
        out = torch.empty(n, num_labels)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            # The padded batch built in a few numpy calls (row by row in torch it cost
            # ~85 ms of host time per pass of 2048 prompts, all of it outside the GPU's work).
            lens = np.fromiter((len(prompts[i]) for i in idx), dtype=np.int64, count=len(idx))
            mask = np.arange(int(lens.max())) < lens[:, None]
            ids = np.full(mask.shape, pad, dtype=np.int64)
            ids[mask] = np.fromiter(chain.from_iterable(prompts[i] for i in idx), dtype=np.int64,
                                    count=int(lens.sum()))
            logits = model(input_ids=torch.from_numpy(ids).to(ctx.device),
                           attention_mask=torch.from_numpy(mask.astype(np.int64)).to(ctx.device)).logits
            out[idx] = _act(logits, act).cpu()
        return out

    return run


def pyengine_setup(ctx: Context, backend: str, enforce_eager: bool = False, lora_rank: int | None = None):
    """pyengine's LLM.classify on token-id prompts with kernel backend ``backend``
    (CUDA graphs on a GPU unless ``enforce_eager``); with ``lora_rank``, every prompt runs
    with a LoRA adapter of that rank on every projection (see :func:`write_blank_adapter`)."""
    from ..llm import LLM
    from ..lora import LoRARequest

    llm = LLM(ctx.model_dir, dtype=ctx.dtype, device=str(ctx.device), kernel_backend=backend,
              max_num_batched_tokens=ctx.max_num_batched_tokens, max_num_seqs=ctx.max_num_seqs,
              max_model_len=ctx.max_model_len, enforce_eager=enforce_eager, enable_lora=lora_rank is not None,
              max_lora_rank=lora_rank or 16)
    lora = None
    if lora_rank is not None:
        lora = LoRARequest("bench", 1, write_blank_adapter(llm.engine.model, ctx.model_dir, lora_rank))

    def run(prompts):
        outs = llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False, lora_request=lora)
        return torch.tensor([o.outputs.probs for o in outs], dtype=torch.float32)

    def close():
        if lora is not None:  # the adapter is read when first used: kept until the provider is done
            shutil.rmtree(lora.lora_path, ignore_errors=True)

    run.close = close
    run.ops = llm.engine.ops.describe() + ("; CUDA graphs" if llm.engine.graphs is not None else "")
    if lora_rank is not None:
        run.ops += f"; LoRA rank {lora_rank} on every projection"
    return run


def write_blank_adapter(model, model_dir, rank):
    """A PEFT LoRA adapter of ``rank`` on every projection ``model`` (a pyengine model
    loaded from ``model_dir``) takes LoRA on, written to a new temporary directory;
    returns that directory, which the caller removes. A is random and B zero (PEFT's own
    initialisation), so outputs equal the base model's while the adapter's matmuls all
    run: the accuracy columns stay comparable and the timing is an adapter's."""
    import json
    import os
    import tempfile

    from safetensors.torch import save_file

    from ..models.loader import iter_weights

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in iter_weights(model_dir):
        targets = model.param_targets(name) if name.endswith(".weight") and t.ndim == 2 else []
        if not any(p.startswith("layers.") and p.rsplit(".", 1)[1] in model.lora_weights for p, _, _ in targets):
            continue
        # A Conv1D weight is stored (in, out); the LoRA pair is a Linear's either way.
        n_in, n_out = t.shape if any(how == "t" for _, _, how in targets) else t.shape[::-1]
        module = "base_model.model." + name[:-len(".weight")]
        tensors[module + ".lora_A.weight"] = torch.randn(rank, n_in, generator=g) * n_in ** -0.5
        tensors[module + ".lora_B.weight"] = torch.zeros(n_out, rank)
    out = tempfile.mkdtemp(prefix=f"pyengine-bench-lora-r{rank}-")
    try:
        save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
        with open(os.path.join(out, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": rank, "lora_alpha": 2 * rank,
                       "target_modules": sorted({k.split(".")[-3] for k in tensors}), "bias": "none"}, f)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def backend_unavailable(backend: str, device: torch.device) -> str | None:
    """Why pyengine's ``backend`` ("eager": the default one without CUDA graphs; "lora":
    the default one with an adapter) cannot be timed on ``device``, or None."""
    if backend in ("torch", "lora"):  # "lora": the default kernels, with an adapter
        return None
    if backend == "eager":
        return "CUDA graphs need a CUDA device: off one every provider runs eagerly" \
            if device.type != "cuda" else None
    if device.type != "cuda":
        return {"cuda": "the CUDA kernels need a CUDA device",
                "triton": "on CPU Triton runs only in its interpreter, which is never timed"}[backend]
    if not _available(backend, device):
        return {"cuda": "the CUDA extension pyengine._C is not built",
                "triton": "triton is not installed"}[backend]
    from ..ops import resolve_ops

    ops = resolve_ops(backend, device)
    if backend not in ops.chosen.values():
        return f"no op has a {backend} implementation yet"
    return None


def providers(single_sampled: bool) -> list[Provider]:
    """Every provider, baselines first. single_sampled: the one-at-a-time baseline
    runs on a sample of the prompts."""
    out = [
        Provider("hf-b32", "transformers b32 arrival order", "baseline", lambda c: hf_setup(c, 32, False)),
        Provider("hf-sorted-b64", "transformers b64 length-sorted", "baseline", lambda c: hf_setup(c, 64, True)),
        Provider("hf-sorted-b256", "transformers b256 length-sorted", "baseline",
                 lambda c: hf_setup(c, 256, True)),
        Provider("hf-single", "transformers one at a time", "baseline", lambda c: hf_setup(c, 1, False),
                 sampled=single_sampled),
    ]
    for b in PYENGINE_BACKENDS:
        label = "pyengine cuda+triton (default)" if b == "cuda" else f"pyengine {b} kernels"
        out.append(Provider(f"pyengine-{b}", label, "pyengine",
                            lambda c, b=b: pyengine_setup(c, b)))
    out.append(Provider("pyengine-eager", "pyengine default, no CUDA graphs", "pyengine",
                        lambda c: pyengine_setup(c, "auto", enforce_eager=True)))
    out.append(Provider("pyengine-lora", f"pyengine default, LoRA r{LORA_RANK} adapter", "pyengine",
                        lambda c: pyengine_setup(c, "auto", lora_rank=LORA_RANK)))
    return out
