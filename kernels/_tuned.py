"""Launch configs measured on one GPU model, read from JSON; launchers given no config
take their entry here before their built-in choice.

A file maps a backend/op and a shape key to a config:

    {"format": 1, "device": "NVIDIA H200", "measured": {...},
     "ops": {"triton/varlen_attention": {"bfloat16/d128/causal/r2": {"config": [64, 32, 4, 3, 2], ...}},
             "cuda/pooled_norm": {"bfloat16/h1024/mean/layer": {"config": {"variant": "slices", ...}}}}}

``python -m pyengine.bench kernels --attn-sweep --op-sweep --write-configs F`` writes one
from its sweeps (a config only where it beat the built-in choice). Which file applies:
``PYENGINE_KERNEL_CONFIGS`` (a path, on every device, CPU tensors in the interpreter
included; ``off`` for none), else on a CUDA device ``configs/<device name>.json`` beside
this module (``NVIDIA H200`` -> ``NVIDIA_H200.json``), else none. Keys name what a config
was measured on (dtype and the sizes that set the kernel's tiles): a shape with no entry
keeps the built-in choice. Nothing is read at import time; the variable and the file are
read at the first launch and again when an engine starts (:func:`check`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

ENV = "PYENGINE_KERNEL_CONFIGS"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FORMAT = 1
_OFF = ("", "0", "off", "none")

_UNSET = object()
_env = _UNSET                        # PYENGINE_KERNEL_CONFIGS as last read
_files: dict[Path, dict] = {}        # path -> {"backend/op": {key: config}}
_device_files: dict[int, Path | None] = {}
_by_device: dict[torch.device, dict] = {}   # device -> its file's tables
_disabled = 0


def device_file_name(device_name: str) -> str:
    """The bundled file's name for a device name: ``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3.json``."""
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") + ".json"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bad(path, msg):
    return ValueError(f"tuned kernel configs {path}: {msg}")


# The ops that read a tuned config, each with the check of a config's own rules (the
# launcher's, whatever the shape): (module, function), imported when a file is read.
CHECKS = {
    "triton/varlen_attention": ("pyengine.kernels.varlen_attention", "check_config"),
    "triton/gated_act": ("pyengine.kernels.gated_act", "check_config"),
    "triton/qk_norm_rotary": ("pyengine.kernels.qk_norm_rotary", "check_config"),
    "triton/gather_pooled": ("pyengine.kernels.gather_pooled", "check_config"),
    "triton/pooled_norm": ("pyengine.kernels.pooled_norm", "check_config"),
    "triton/expert_matmul": ("pyengine.kernels.expert_matmul", "check_config"),
    "cuda/pooled_norm": ("pyengine.cuda_ops", "_pooled_norm_config"),
}
_KEY_DTYPES = ("float16", "bfloat16", "float32")


def _check_entry(path, op, key, cfg):
    """An entry's op, key and config, as the launcher would find them: a name typed wrong
    would be read and never used, a config against the op's rules fail mid-run."""
    import importlib

    if op not in CHECKS:
        raise _bad(path, f"unknown op {op!r}; the ops with tuned configs are {sorted(CHECKS)}")
    if not isinstance(key, str) or key.split("/")[0] not in _KEY_DTYPES:
        raise _bad(path, f"{op} {key!r}: a shape key starts with the dtype, one of {', '.join(_KEY_DTYPES)}")
    module, name = CHECKS[op]
    try:
        getattr(importlib.import_module(module), name)(cfg)
    except ValueError as e:
        raise _bad(path, f"{op} {key}: {e}") from None


def load(path) -> dict[str, dict]:
    """{"backend/op": {key: config}} from a configs file, checked: format, the op names
    (those in CHECKS), each key's dtype, and each config against its op's own rules (the
    launchers check what depends on the shape when they use it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _bad(path, f"no such file (from {ENV}?)") from None
    except (OSError, ValueError) as e:
        raise _bad(path, f"unreadable: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _bad(path, f"expected a JSON object with \"format\": {FORMAT}")
    ops = data.get("ops", {})
    if not isinstance(ops, dict):
        raise _bad(path, "\"ops\" must be an object of \"backend/op\" -> {shape key: entry}")
    table = {}
    for op, entries in ops.items():
        if not isinstance(op, str) or op.count("/") != 1 or not isinstance(entries, dict):
            raise _bad(path, f"ops entry {op!r} must be named \"backend/op\" and map shape keys to entries")
        table[op] = {}
        for key, entry in entries.items():
            cfg = entry.get("config") if isinstance(entry, dict) else None
            ok = (isinstance(cfg, list) and cfg and all(type(c) is int and c > 0 for c in cfg)) or (
                isinstance(cfg, dict) and cfg and all(isinstance(k, str) and type(v) in (int, str)
                                                      for k, v in cfg.items()))
            if not ok:
                raise _bad(path, f"{op} {key}: expected {{\"config\": [positive ints] or {{name: value}}}}, "
                                 f"got {entry!r}")
            _check_entry(path, op, key, cfg)
            table[op][key] = cfg
    return table


def _read(path: Path) -> dict[str, dict]:
    table = _files.get(path)
    if table is None:
        table = _files[path] = load(path)
    return table


def reset() -> None:
    """Forget what was read: the next launch reads PYENGINE_KERNEL_CONFIGS and its file again."""
    global _env
    _env = _UNSET
    _files.clear()
    _device_files.clear()
    _by_device.clear()


def source(device) -> Path | None:
    """The configs file that applies to launches on ``device`` (see the module doc), or None."""
    global _env
    if _env is _UNSET:
        _env = os.environ.get(ENV)
    env = _env
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env)
    # Fake CUDA tensors (torch.compile's tracing) exist without a GPU: no device, no file.
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_files:
        path = CONFIG_DIR / device_file_name(torch.cuda.get_device_name(index))
        _device_files[index] = path if path.is_file() else None
    return _device_files[index]


def table(device, op: str) -> dict:
    """{shape key: config} for "backend/op" on ``device``; {} with no file, no entry, or
    inside :func:`disabled`. Called on every launch: after the first call for a device it
    is two dict lookups (the environment is read once, until :func:`reset`)."""
    if _disabled:
        return {}
    tables = _by_device.get(device)
    if tables is None:
        path = source(device)
        tables = _by_device[device] = {} if path is None else _read(path)
    return tables.get(op, {})


def lookup(device, op: str, key) -> list | dict | None:
    """The tuned config of "backend/op" for a shape key, or None. ``key`` may be a
    callable returning the key, so that launches with no table never build one."""
    entries = table(device, op)
    if not entries:
        return None
    return entries.get(key() if callable(key) else key)


def check(device) -> None:
    """Read PYENGINE_KERNEL_CONFIGS and the file that applies to ``device`` afresh and
    check it, so that an engine starts with the environment of its start, and a bad file
    fails then, not at the first launch."""
    reset()
    table(device, "")


@contextlib.contextmanager
def disabled():
    """Launchers given no config take their built-in choice inside this block (the
    benchmark's sweeps compare every candidate against that choice)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


# Shape keys. Each names the sizes that fix a kernel's tiles, so that a config applies
# only where it was measured.

def attention_key(dtype, head_dim, causal, group_size, has_window, softcap) -> str:
    """varlen attention: exact head dim (the padding differs off the multiples of 16) and
    the query heads per kv head (GROUP configs must divide it)."""
    return (f"{dtype_name(dtype)}/d{head_dim}/{'causal' if causal else 'bidir'}/r{group_size}"
            + ("/window" if has_window else "") + ("/softcap" if softcap else ""))


def pooled_key(dtype, hidden_size, pooling, norm_kind=None, residual=False) -> str:
    """gather_pooled and pooled_norm: the hidden size padded to a power of two (the tile width)."""
    block_h = 1 << (hidden_size - 1).bit_length() if hidden_size > 0 else 0
    return (f"{dtype_name(dtype)}/h{block_h}/{pooling}" + (f"/{norm_kind}" if norm_kind else "")
            + ("/residual" if residual else ""))
