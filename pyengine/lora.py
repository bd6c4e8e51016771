"""LoRA adapters on a loaded classifier: PEFT checkpoints, applied unmerged per batch.

An adapter is a directory as PEFT's ``save_pretrained`` writes it:
``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``alpha_pattern``,
``modules_to_save``, ...) and ``adapter_model.safetensors`` (or ``adapter_model.bin``)
holding ``base_model.model.<module>.lora_A.weight`` (r, in) and ``lora_B.weight``
(out, r) per adapted linear layer, plus whole weights for the modules it saves (the
classifier head of a sequence-classification adapter).

The backbone's weights stay as loaded and are shared by every adapter. For each fused
linear of a layer (qkv, o, gate|up, down) an adapter keeps one pair A (R, in),
B (out, R), with the scale folded into B and R the summed ranks of the modules packed
into that weight, so a batch with an adapter pays ``(x @ A^T) @ B^T`` on top of each
adapted matmul. The head (fp32, a few rows) is merged instead: the adapter carries its
own copy of each head parameter it changes.

A batch may mix adapters: the waiting queue keeps each adapter's sequences together
(see ``pyengine.scheduler.WaitingQueue``), so each adapter's delta applies to one block
of rows (:class:`LoRABatch`). On a GPU a batch with one adapter for all its sequences
replays a CUDA graph of its own (per bucket and adapter, see ``pyengine.cuda_graph``); a
batch that mixes adapters, or adapters and the base model, runs eagerly.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections import OrderedDict, deque
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

# No adapter, or a layer the adapter leaves alone: every lookup gives None.
NO_DELTAS = MappingProxyType({})

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
# Configuration that changes what the weights mean, which this engine does not run.
_UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "lora_bias": "lora_bias", "layer_replication": "layer_replication",
                "target_parameters": "target_parameters", "alora_invocation_tokens": "aLoRA",
                "trainable_token_indices": "trainable_token_indices", "use_qalora": "QALoRA",
                # variants whose saved tensors or forward differ from a plain B @ A
                "velora_config": "VeLoRA (velora_config)", "monteclora_config": "MonteCLoRA (monteclora_config)",
                "kasa_config": "KaSA (kasa_config)", "use_bdlora": "BD-LoRA (use_bdlora)",
                "arrow_config": "Arrow routing (arrow_config)"}


@dataclass(frozen=True)
class LoRARequest:
    """The adapter a request runs with, as vLLM's class of that name.

    lora_name: a name for messages and the server's model list; lora_int_id: an int >= 1
    that identifies the adapter in the engine's cache; lora_path: a local PEFT adapter
    directory."""
    lora_name: str
    lora_int_id: int
    lora_path: str | os.PathLike

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty str, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)):
            raise TypeError(f"LoRARequest.lora_path must be a path, got {type(self.lora_path).__name__}")


class LoRAAdapter:
    """One adapter, loaded for one model.

    layers: per layer, {weight name ("qkv_w", "o_w", "up_w", "down_w"): (A (R, in), B
    (out, R))} in the model's dtype and device, scale folded into B; head: {head
    parameter name: fp32 tensor} replacing the model's own; rank: the largest module rank;
    key: an int >= 1 no other adapter of its engine has, even one loaded later under the
    same lora_int_id (the waiting queue's batch group), set by :class:`LoRAManager`."""

    __slots__ = ("name", "id", "path", "rank", "layers", "head", "key")

    def __init__(self, name, id, path, rank, layers, head):
        self.name, self.id, self.path, self.rank = name, id, path, rank
        self.layers, self.head = layers, head
        self.key = None

    def __repr__(self):
        return f"LoRAAdapter({self.name!r}, id={self.id}, rank={self.rank}, path={self.path!r})"


class Deltas:
    """One weight's LoRA deltas in one batch: ``runs`` of (token rows, sequence rows, A,
    B), ranges as (lo, hi). A linear over every token of the batch (num_tokens rows) takes
    the token ranges; one over the pooled rows (one per sequence) the sequence ranges."""

    __slots__ = ("num_tokens", "runs")

    def __init__(self, num_tokens, runs):
        self.num_tokens, self.runs = num_tokens, runs

    def rows(self, n):
        """(lo, hi, A, B) per run for an input of n rows."""
        tok = n == self.num_tokens  # where tokens == sequences the two ranges coincide
        return [(*(t if tok else s), a, b) for t, s, a, b in self.runs]


class LoRABatch:
    """The adapters of one ragged batch: runs of consecutive sequences sharing one
    (the waiting queue keeps an adapter's sequences together).

    runs: [(adapter, (first seq, end seq), (first token, end token))] for the sequences
    with an adapter; the others run on the base weights alone."""

    __slots__ = ("runs", "num_tokens")

    def __init__(self, runs, num_tokens):
        self.runs, self.num_tokens = runs, num_tokens

    @classmethod
    def build(cls, loras, seq_lens):
        """loras: per sequence a LoRAAdapter or None; seq_lens: per sequence its tokens.
        None when no sequence has an adapter."""
        runs, tok = [], 0
        for i, (lora, n) in enumerate(zip(loras, seq_lens)):
            if lora is not None:
                if runs and runs[-1][0] is lora and runs[-1][1][1] == i:
                    a, (s0, _), (t0, _) = runs[-1]
                    runs[-1] = (a, (s0, i + 1), (t0, tok + n))
                else:
                    runs.append((lora, (i, i + 1), (tok, tok + n)))
            tok += n
        return cls(runs, tok) if runs else None

    @classmethod
    def whole(cls, adapter, num_seqs, num_tokens):
        """One adapter for every row of a batch of num_seqs sequences and num_tokens tokens
        (a padded graph batch: the bounds stay the bucket's whatever the real batch)."""
        return cls([(adapter, (0, num_seqs), (0, num_tokens))], num_tokens)

    def single(self, num_seqs):
        """The one adapter of every sequence of a batch of num_seqs, or None (a mixed
        batch, or one with base-model sequences)."""
        if len(self.runs) == 1 and self.runs[0][1] == (0, num_seqs):
            return self.runs[0][0]
        return None

    def layer(self, i):
        """Layer i's {weight name: Deltas}."""
        out = {}
        for adapter, seqs, toks in self.runs:
            for leaf, (a, b) in adapter.layers[i].items():
                out.setdefault(leaf, []).append((toks, seqs, a, b))
        return {leaf: Deltas(self.num_tokens, runs) for leaf, runs in out.items()}

    def heads(self):
        """(first seq, end seq, {head parameter: tensor}) for the runs whose adapter has
        a head of its own."""
        return [(s0, s1, adapter.head) for adapter, (s0, s1), _ in self.runs if adapter.head]


def with_heads(head, pooled, lora):
    """head(pooled, {}) (the model's head over pooled (B, H) rows), with each adapter's
    own head parameters (head(rows, params)) for its sequences where it has them."""
    runs = lora.heads() if lora is not None else []
    if len(runs) == 1 and runs[0][:2] == (0, pooled.shape[0]):
        return head(pooled, runs[0][2])
    logits = head(pooled, {})
    for lo, hi, params in runs:
        logits[lo:hi] = head(pooled[lo:hi], params)
    return logits


def layer_deltas(lora, i):
    """Layer i's {weight name: Deltas} under ``lora`` (a LoRABatch or None)."""
    return NO_DELTAS if lora is None else lora.layer(i)


def linear(x, w, b, deltas=None, part=None):
    """``F.linear(x, w[part], b[part])`` plus the LoRA deltas of the rows that have one.

    x: (N, in), N the batch's tokens or its sequences (pooled rows); w: (out, in); b:
    (out,) or None; deltas: None or a :class:`Deltas`; part: a slice of the output rows
    (one piece of a fused weight) or None -> (N, out')."""
    if part is not None:
        w, b = w[part], (None if b is None else b[part])
    y = F.linear(x, w, b)
    if deltas is not None:
        n = x.shape[0]
        for lo, hi, a, bm in deltas.rows(n):
            bm = bm if part is None else bm[part]
            if lo == 0 and hi == n:
                y.addmm_(F.linear(x, a), bm.t())
            else:
                y[lo:hi].addmm_(F.linear(x[lo:hi], a), bm.t())
    return y


def _read_adapter(path, what):
    """(adapter_config dict, {key: tensor}) of a PEFT adapter directory."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: adapter directory {path!r} does not exist")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{what}: {path!r} has no adapter_config.json (not a PEFT adapter)")
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: cannot read {cfg_file}: {e}") from e
    st, pt = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file

            tensors = load_file(st, device="cpu")
        elif os.path.isfile(pt):
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{what}: {path!r} has no adapter_model.safetensors or adapter_model.bin")
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors and torch.load raise many types on bad files
        raise ValueError(f"{what}: corrupt or unreadable adapter weights in {path!r}: {type(e).__name__}: {e}") from e
    return cfg, tensors


def _check_config(cfg, what):
    if not isinstance(cfg, dict):
        raise ValueError(f"{what}: adapter_config.json is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{what}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, label in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"{what}: {label} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{what}: bias={cfg['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{what}: adapter_config.json {key}={v!r} is not a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key) or {}
        if not isinstance(v, dict):
            raise ValueError(f"{what}: adapter_config.json {key} must be an object of pattern -> number, got "
                             f"{type(v).__name__}")
        for pattern, n in v.items():
            if not isinstance(n, (int, float)) or isinstance(n, bool) or n <= 0:
                raise ValueError(f"{what}: adapter_config.json {key}[{pattern!r}]={n!r} is not a positive number")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{what}: adapter_config.json {key} key {pattern!r} is not a regular expression: "
                                 f"{e}") from None


def _alpha(cfg, module):
    """The module's lora_alpha: the first alpha_pattern key that matches the end of its
    dotted name (as PEFT matches them), else the config's lora_alpha."""
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return alpha
    return cfg["lora_alpha"]


def load_adapter(request: LoRARequest, model, max_rank: int) -> LoRAAdapter:
    """Read a PEFT LoRA adapter for ``model`` (a pyengine model with ``param_targets``,
    ``lora_weights`` and ``head_params``), checking every weight against the model
    before anything is kept. Raises FileNotFoundError / ValueError naming the adapter
    and what is wrong."""
    what = f"LoRA adapter {request.lora_name!r}"
    cfg, tensors = _read_adapter(request.lora_path, what)
    _check_config(cfg, what)
    pairs, saved = _split_keys(tensors, what)
    head = {}

    def head_param(param, key):
        if param not in model.head_params:
            raise ValueError(f"{what}: {key} changes {param}, which is not part of the classifier head; only "
                             "the head may be saved whole (modules_to_save)")
        if param not in head:
            base = getattr(model, param, None)
            if base is None:
                raise ValueError(f"{what}: {key} changes {param}, which this model does not have")
            # Built on the host with the adapter's tensors; moved to the model's device at the end.
            head[param] = base.detach().float().cpu().clone()
        return head[param]

    for key, t in saved.items():
        targets = model.param_targets(key)
        if not targets:
            raise ValueError(f"{what}: saved weight {key} has no counterpart in this model")
        for param, rows, _ in targets:
            dst = head_param(param, key)
            dst = dst if rows is None else dst[rows]
            if dst.shape != t.shape:
                raise ValueError(f"{what}: {key} has shape {tuple(t.shape)}, the model's {param} is "
                                 f"{tuple(dst.shape)} (an adapter for another model or label count?)")
            dst.copy_(t.float())
    pieces, rank = {}, 0  # (layer, weight) -> [(rows, A, scaled B)]
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            have = next(iter(ab))
            raise ValueError(f"{what}: {module} has lora_{have} but not lora_{'B' if have == 'A' else 'A'}")
        a, b = ab["A"], ab["B"]
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
            raise ValueError(f"{what}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do "
                             "not make a rank-r product")
        if r > max_rank:
            raise ValueError(f"{what}: {module} has rank {r}, over max_lora_rank={max_rank}")
        rank = max(rank, r)
        scale = _alpha(cfg, module) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        targets = model.param_targets(module + ".weight")
        if not targets:
            raise ValueError(f"{what}: {module} is not a linear layer of this model")
        for param, rows, how in targets:
            # A Conv1D's ("t") LoRA pair is stored as a Linear's, so only row picks apply.
            src = (b[how[1]] if isinstance(how, tuple) else b).float() * scale
            layer, _, leaf = param.removeprefix("layers.").partition(".")
            if param.startswith("layers.") and not int(layer) < len(model.layers):
                raise ValueError(f"{what}: {module} adapts layer {layer}, but this model has {len(model.layers)} "
                                 "layers (an adapter for a deeper model?)")
            full = getattr(model, param, None) if "." not in param else model.get_parameter(param)
            if full is None:
                raise ValueError(f"{what}: {module} adapts {param}, which this model does not have")
            if param not in model.head_params and (not param.startswith("layers.") or leaf not in model.lora_weights):
                raise ValueError(f"{what}: {module} adapts {param}, which does not take LoRA here (supported: "
                                 f"{', '.join(model.lora_weights)} of each layer and the head)")
            n_out = full.shape[0] if rows is None else rows.stop - rows.start
            if a.shape[1] != full.shape[1] or src.shape[0] != n_out:
                raise ValueError(f"{what}: {module} maps ({a.shape[1]} -> {src.shape[0]}), the model's layer is "
                                 f"({full.shape[1]} -> {n_out}) (an adapter for another model?)")
            if param in model.head_params:
                dst = head_param(param, module)
                (dst if rows is None else dst[rows]).add_((src.double() @ a.double()).float())
                continue
            pieces.setdefault((int(layer), leaf), []).append((rows, a, src))
    device = model.layers[0].qkv_w.device
    return LoRAAdapter(request.lora_name, request.lora_int_id, os.fspath(request.lora_path), rank,
                       _pack(pieces, model), MappingProxyType({k: v.to(device) for k, v in head.items()}))


def _split_keys(tensors, what):
    """Adapter weights -> ({module: {"A": (r, in), "B": (out, r)}}, {name: tensor saved whole}),
    names without PEFT's prefixes."""
    pairs, saved = {}, {}
    for key, t in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
            raise ValueError(f"{what}: {name} is not supported (LoRA on embeddings and DoRA are not)")
        m = _LORA_KEY.fullmatch(name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        else:  # a module saved whole (modules_to_save), maybe under PEFT's wrapper names
            saved[re.sub(r"\.modules_to_save(\.default)?\.", ".", name)] = t
    if not pairs and not saved:
        raise ValueError(f"{what}: the adapter holds no weights")
    return pairs, saved


def _pack(pieces, model):
    """{(layer, weight name): [(rows, A (r, in), scaled B (rows, r))]} -> per layer
    {weight name: (A (R, in), B (out, R))}, the pieces' ranks side by side and each B
    block on its rows (zeros elsewhere), in the model's dtype and device."""
    ref = model.layers[0].qkv_w
    layers = [{} for _ in model.layers]
    for (i, leaf), parts in pieces.items():
        a_cat = torch.cat([a for _, a, _ in parts])
        b_full = torch.zeros(getattr(model.layers[i], leaf).shape[0], a_cat.shape[0], dtype=torch.float32)
        col = 0
        for rows, a, b in parts:
            b_full[rows if rows is not None else slice(None), col:col + a.shape[0]] = b
            col += a.shape[0]
        layers[i][leaf] = (a_cat.to(device=ref.device, dtype=ref.dtype), b_full.to(device=ref.device, dtype=ref.dtype))
    return layers


class LoRAManager:
    """Adapters by ``lora_int_id``, at most ``max_loras`` kept loaded (least recently
    used dropped first). A dropped adapter stays alive for the requests that hold it.

    ``dropped``: keys of the adapters dropped since the engine last looked, for the
    thread that steps the engine to free what it holds of them (their CUDA graphs); a
    deque, as appending and popping it are safe across threads."""

    def __init__(self, model, max_loras: int, max_lora_rank: int):
        self.model, self.max_loras, self.max_lora_rank = model, max_loras, max_lora_rank
        self._cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._keys = itertools.count(1)
        self.dropped: deque[int] = deque()

    def get(self, request: LoRARequest) -> LoRAAdapter:
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        hit = self._cache.get(request.lora_int_id)
        if hit is not None:
            if (hit.name, hit.path) != (request.lora_name, os.fspath(request.lora_path)):
                raise ValueError(f"lora_int_id {request.lora_int_id} is already used by adapter {hit.name!r} at "
                                 f"{hit.path!r}; give {request.lora_name!r} another id")
            self._cache.move_to_end(request.lora_int_id)
            return hit
        adapter = load_adapter(request, self.model, self.max_lora_rank)
        # Not the id: once this adapter is dropped, another may be loaded under its id
        # while requests holding this one still wait, and the two must not share a batch.
        adapter.key = next(self._keys)
        self._cache[request.lora_int_id] = adapter
        while len(self._cache) > self.max_loras:
            self.dropped.append(self._cache.popitem(last=False)[1].key)
        return adapter

    def drop(self, lora_int_id: int):
        """Forget the adapter loaded under ``lora_int_id``, if any (requests holding it
        still run with it)."""
        adapter = self._cache.pop(lora_int_id, None)
        if adapter is not None:
            self.dropped.append(adapter.key)

    def holds(self, adapter: LoRAAdapter) -> bool:
        """Whether ``adapter`` is still loaded (not dropped since a request took it)."""
        return self._cache.get(adapter.id) is adapter

    def loaded(self) -> list[LoRAAdapter]:
        return list(self._cache.values())
