"""Configuration dataclasses, validated when built."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class PoolerConfig:
    """How pooled logits become outputs.

    pooling_type: None (the model's own), "CLS", "LAST" or "MEAN"; seq_pooling_type is
    vLLM's newer name for it.
    use_activation: apply the activation by default (a request may override it); None
    is True, as vLLM's default.
    logit_bias / logit_scale: outputs are act((logits - logit_bias) * logit_scale).
    """
    pooling_type: str | None = None
    use_activation: bool = True
    logit_bias: float | None = None
    logit_scale: float | None = None
    seq_pooling_type: str | None = None

    def __post_init__(self):
        if self.seq_pooling_type is not None:
            if self.pooling_type is not None and str(self.pooling_type).upper() != str(self.seq_pooling_type).upper():
                raise ValueError(f"PoolerConfig: pooling_type={self.pooling_type!r} and seq_pooling_type="
                                 f"{self.seq_pooling_type!r} (its vLLM name) disagree")
            self.pooling_type = self.seq_pooling_type
        if self.pooling_type is not None:
            p = str(self.pooling_type).upper()
            if p not in ("CLS", "LAST", "MEAN"):
                raise ValueError(f"PoolerConfig.pooling_type must be CLS, LAST or MEAN, got {self.pooling_type!r}")
            self.pooling_type = self.seq_pooling_type = p
        if self.use_activation is None:
            self.use_activation = True
        if not isinstance(self.use_activation, bool):
            raise TypeError(f"PoolerConfig.use_activation must be a bool, got {self.use_activation!r}")
        for name in ("logit_bias", "logit_scale"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise TypeError(f"PoolerConfig.{name} must be a number, got {type(v).__name__}")
            if v is not None and not math.isfinite(v):
                raise ValueError(f"PoolerConfig.{name} must be finite, got {v!r}")
        if self.logit_scale == 0:
            raise ValueError("PoolerConfig.logit_scale must not be 0 (every output would be act(0))")


def use_activation_of(use_activation, activation=None, softmax=None):
    """use_activation, else vLLM's older names for it (activation, then softmax)."""
    if use_activation is not None:
        return use_activation
    return activation if activation is not None else softmax


@dataclass
class PoolingParams:
    """One request's pooling options, as vLLM's class of that name.

    truncate_prompt_tokens: None (an over-long prompt is an error), -1 (the model's
    maximum) or k > 0; use_activation: None takes the engine's default (``softmax`` and
    ``activation``, vLLM's older names, are read where it is None); task: None,
    "classify" or "score"; dimensions and normalize (embedding models), step_tag_id and
    returned_token_ids (step reward models) must stay None, as vLLM refuses them for
    classification; extra_kwargs (vLLM's plugin poolers) None or empty.
    """
    truncate_prompt_tokens: int | None = None
    use_activation: bool | None = None
    dimensions: int | None = None
    task: str | None = None
    softmax: bool | None = field(default=None, kw_only=True)
    activation: bool | None = field(default=None, kw_only=True)
    normalize: bool | None = field(default=None, kw_only=True)
    step_tag_id: int | None = field(default=None, kw_only=True)
    returned_token_ids: list | None = field(default=None, kw_only=True)
    extra_kwargs: dict | None = field(default=None, kw_only=True)

    def clone(self) -> "PoolingParams":
        """A deep copy (vLLM's method of that name)."""
        return copy.deepcopy(self)

    def __post_init__(self):
        self.use_activation = use_activation_of(self.use_activation, self.activation, self.softmax)
        k = self.truncate_prompt_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or (k < 1 and k != -1)):
            raise ValueError(f"PoolingParams.truncate_prompt_tokens must be None, -1 or a positive int, got {k!r}")
        if self.use_activation is not None and not isinstance(self.use_activation, bool):
            raise TypeError(f"PoolingParams.use_activation must be a bool or None, got {self.use_activation!r}")
        for name, kind in (("dimensions", "embedding"), ("normalize", "embedding"), ("step_tag_id", "step reward"),
                           ("returned_token_ids", "step reward")):
            if getattr(self, name) is not None:
                raise ValueError(f"PoolingParams.{name} applies to {kind} models; this engine serves classifiers")
        if self.extra_kwargs:
            raise ValueError(f"PoolingParams.extra_kwargs {sorted(map(str, self.extra_kwargs))}: they go to vLLM's "
                             "plugin poolers, which this engine does not have")
        if self.task not in (None, "classify", "score"):
            raise ValueError(f"PoolingParams.task={self.task!r} is not supported; this engine serves "
                             "'classify' and 'score'")


@dataclass
class EngineConfig:
    """Everything LLM(...) takes. ``model`` is a local directory or a transformers
    ``PreTrainedModel`` instance. ``enforce_eager``: never run the forward through CUDA
    graphs (see :mod:`pyengine.cuda_graph`); as vLLM's flag of that name.
    ``runner``: "auto" or "pooling" (vLLM's flag; this engine has no other runner).
    ``enable_lora``: accept requests with a LoRA adapter (:mod:`pyengine.lora`), at most
    ``max_loras`` kept loaded at once, each of rank at most ``max_lora_rank``.
    ``mm_processor_kwargs``: image and video preprocessing settings of a vision-language
    model in place of its checkpoint's (Qwen-VL: ``min_pixels``, ``max_pixels``, and
    ``fps``, the rate video frames were sampled at; Nemotron VL: ``min_dynamic_patch``,
    ``max_dynamic_patch``, ``dynamic_image_size``)."""
    model: Any
    tokenizer: Any = None
    dtype: str | torch.dtype = "auto"
    device: str | torch.device = "auto"
    max_model_len: int | None = None
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 256
    hf_overrides: dict | None = None
    pooler_config: PoolerConfig | None = None
    kernel_backend: str = "auto"
    convert: str = "auto"
    runner: str = "auto"
    enforce_eager: bool = False
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    mm_processor_kwargs: dict | None = None
    torch_dtype: torch.dtype = field(init=False)
    torch_device: torch.device = field(init=False)

    def __post_init__(self):
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or
                                               isinstance(self.max_model_len, bool) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be a positive int or None, got {self.max_model_len!r}")
        if self.hf_overrides is not None and not isinstance(self.hf_overrides, dict):
            raise TypeError(f"hf_overrides must be a dict, got {type(self.hf_overrides).__name__}")
        if self.mm_processor_kwargs is not None and not isinstance(self.mm_processor_kwargs, dict):
            raise TypeError(f"mm_processor_kwargs must be a dict, got {type(self.mm_processor_kwargs).__name__}")
        if self.pooler_config is None:
            self.pooler_config = PoolerConfig()
        elif isinstance(self.pooler_config, dict):
            self.pooler_config = PoolerConfig(**self.pooler_config)
        elif not isinstance(self.pooler_config, PoolerConfig):
            raise TypeError(f"pooler_config must be a PoolerConfig or dict, got {type(self.pooler_config).__name__}")
        for name in ("enforce_eager", "enable_lora"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.runner not in ("auto", "pooling"):
            raise ValueError(f"runner={self.runner!r}: this engine runs pooling models only; use 'auto' or 'pooling'")
        from .ops import BACKENDS

        if self.kernel_backend not in (None, "auto", *BACKENDS):  # resolve_ops' own check, before any loading
            raise ValueError(f"unknown kernel backend {self.kernel_backend!r}; expected one of {BACKENDS} or 'auto'")
        if self.convert not in ("auto", "classify", "none"):
            raise ValueError(f"convert must be 'auto', 'classify' or 'none', got {self.convert!r}")
        if self.device in (None, "auto"):
            self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.torch_device = torch.device(self.device)
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} asked for, but torch sees no CUDA device")
        self.torch_dtype = self._resolve_dtype()

    def _resolve_dtype(self) -> torch.dtype:
        d = self.dtype
        if isinstance(d, torch.dtype):
            dtype = d
        elif d in (None, "auto"):
            # bf16 on GPUs that have it, fp32 on CPU (where fp16/bf16 matmuls are slow).
            if self.torch_device.type == "cuda":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.float32
        elif isinstance(d, str) and d.lower() in _DTYPES:
            dtype = _DTYPES[d.lower()]
        else:
            raise ValueError(f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {d!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        if dtype == torch.bfloat16 and self.torch_device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(self.torch_device)}; "
                             "use float16")
        return dtype
