"""Reading configs and weights from a local directory or a transformers model."""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch


def load_hf_config(model, hf_overrides=None):
    """The transformers config of ``model`` (a directory or a PreTrainedModel), with
    ``hf_overrides`` applied. Never reaches a hub: a missing directory is an error."""
    from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

    if hasattr(model, "config") and isinstance(model.config, PretrainedConfig):
        config = model.config.__class__.from_dict(model.config.to_dict())
        if isinstance(model, PreTrainedModel):
            # The instance's own class, not what its config was saved as (a model built with
            # from_config names none; one fine-tuned from a base checkpoint names the base).
            config.architectures = [type(model).__name__]
    else:
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {path!r} does not exist (only local checkpoints are loaded)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} has no config.json")
        try:
            config = _remote_code_config(path) or AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=False)
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {os.path.join(path, 'config.json')}: {e}") from e
    _override(config, hf_overrides or {})
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise ValueError(f"the checkpoint is quantized (quantization_config, quant_method={method!r}); pyengine "
                         "loads float weights only (float32, float16, bfloat16): use the unquantized checkpoint")
    return config


def _override(config, overrides):
    """hf_overrides onto ``config``: a dict given for a sub-config (``text_config``) updates
    it key by key, as vLLM applies them; any other value replaces the attribute."""
    from transformers import PretrainedConfig

    for key, value in overrides.items():
        current = getattr(config, key, None)
        if isinstance(value, dict) and isinstance(current, PretrainedConfig):
            _override(current, value)
        else:
            setattr(config, key, value)


# Remote-code model types whose config is a transformers config plus extra keys.
_REMOTE_MODEL_TYPES = {"llama_bidirec": "llama", "internlm2": "llama"}


def _remote_code_config(path):
    """A config whose model_type transformers does not know (remote code such as mGTE's
    "new" or "llama_bidirec"), read without running any remote code: the nearest
    transformers config where one is listed above, else a plain PretrainedConfig, with
    every key of config.json kept as an attribute, and each sub-config (a dict with a
    model_type, such as a vision-language model's ``vision_config`` and ``llm_config``)
    read the same way. None for model types transformers knows."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    mt = raw.get("model_type") if isinstance(raw, dict) else None
    if not mt or mt in CONFIG_MAPPING:
        return None
    return _config_from_dict(raw)


def _config_from_dict(raw):
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = raw.get("model_type")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    base = mt if mt in CONFIG_MAPPING else _REMOTE_MODEL_TYPES.get(mt)
    subs = {k: _config_from_dict(v) for k, v in fields.items()
            if base is None and isinstance(v, dict) and isinstance(v.get("model_type"), str)}
    config = AutoConfig.for_model(base, **fields) if base else PretrainedConfig(**fields)
    kept = config.to_dict()
    for k, v in fields.items():  # keys the config class dropped (e.g. "temperature")
        if k not in kept:
            setattr(config, k, v)
    for k, v in subs.items():
        setattr(config, k, v)
    return config


def _weight_files(path):
    names = os.listdir(path)
    for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
        if index_name in names:
            with open(os.path.join(path, index_name)) as f:
                try:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"corrupt weight index {index_name} in {path!r}: {e}") from e
            missing = [s for s in shards if s not in names]
            if missing:
                raise FileNotFoundError(f"{index_name} in {path!r} names missing shards: {missing}")
            return kind, [os.path.join(path, s) for s in shards]
    st = sorted(n for n in names if n.endswith(".safetensors"))
    if st:
        return "st", [os.path.join(path, n) for n in st]
    bins = sorted(n for n in names if n.startswith("pytorch_model") and n.endswith(".bin"))
    if bins:
        return "bin", [os.path.join(path, n) for n in bins]
    raise FileNotFoundError(f"no weights in {path!r}: expected *.safetensors or pytorch_model*.bin")


def iter_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a checkpoint directory (safetensors or .bin, sharded or
    not) or of a PreTrainedModel instance, on the CPU."""
    if isinstance(model, torch.nn.Module):
        yield from model.state_dict().items()
        return
    kind, files = _weight_files(os.fspath(model))
    for f in files:
        try:
            if kind == "st":
                from safetensors import safe_open

                with safe_open(f, framework="pt", device="cpu") as sf:
                    for name in sf.keys():
                        yield name, sf.get_tensor(name)
            else:
                yield from torch.load(f, map_location="cpu", weights_only=True).items()
        except Exception as e:  # safetensors and torch.load raise many types on bad files
            raise ValueError(f"corrupt or unreadable weight file {f!r}: {type(e).__name__}: {e}") from e


class WeightSink:
    """Collects named parameters of a model being loaded and reports what is missing."""

    def __init__(self, params: dict[str, torch.nn.Parameter | torch.Tensor], what: str):
        self.params = params
        self.seen: set[str] = set()
        self.what = what

    def put(self, name, tensor, rows=None):
        """Copy ``tensor`` into parameter ``name`` (into ``rows`` of dim 0 when given)."""
        if name not in self.params:
            raise ValueError(f"{self.what}: the checkpoint holds a weight for {name!r}, which this model, as its "
                             "config describes it, does not have (a bias the config turns off?)")
        if tensor.is_floating_point() and tensor.element_size() == 1:
            raise ValueError(f"{self.what}: weight {name!r} is stored as {tensor.dtype}; pyengine loads float "
                             "weights only (float32, float16, bfloat16)")
        p = self.params[name]
        dst = p.data if rows is None else p.data[rows]
        if dst.shape != tensor.shape:
            raise ValueError(f"{self.what}: weight {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dst.shape)}")
        dst.copy_(tensor.to(dst.dtype))
        self.seen.add(name if rows is None else f"{name}[{rows}]")

    def check(self, expected: list[str]):
        missing = [n for n in expected if n not in self.seen]
        if missing:
            raise ValueError(f"{self.what}: checkpoint lacks weights for {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}")
