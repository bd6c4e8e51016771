"""Output objects shaped like vLLM's, so downstream code ports unchanged."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PoolingOutput:
    data: torch.Tensor  # (num_labels,) fp32 on the host


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ClassificationRequestOutput:
    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True

    @classmethod
    def from_pooling(cls, out: PoolingRequestOutput):
        return cls(out.request_id, ClassificationOutput(out.outputs.data.tolist()), out.prompt_token_ids)


@dataclass
class ScoringRequestOutput:
    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True

    @classmethod
    def from_pooling(cls, out: PoolingRequestOutput):
        data = out.outputs.data
        if data.numel() != 1:
            raise ValueError(f"a score needs one output per pair, got {data.numel()}")
        return cls(out.request_id, ScoringOutput(float(data.item())), out.prompt_token_ids)
