"""Output objects shaped like vLLM's, so downstream code ports unchanged: the task
outputs are PoolingRequestOutput subclasses built from one by ``from_base``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

_O = TypeVar("_O")


@dataclass(eq=False)
class PoolingOutput:
    data: torch.Tensor  # (num_labels,) fp32 on the host

    def __eq__(self, other):
        # as vLLM's: equal tensors (a dataclass's field compare would ask a tensor for one bool)
        if not isinstance(other, PoolingOutput):
            return NotImplemented
        return self.data.shape == other.data.shape and bool(torch.equal(self.data, other.data))


@dataclass
class ClassificationOutput:
    probs: list[float]

    @staticmethod
    def from_base(out: PoolingOutput) -> ClassificationOutput:
        if out.data.dim() != 1:
            raise ValueError(f"a classification needs a 1-D vector of label outputs, got shape {tuple(out.data.shape)}")
        return ClassificationOutput(out.data.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float

    @staticmethod
    def from_base(out: PoolingOutput) -> ScoringOutput:
        if out.data.numel() != 1:
            raise ValueError(f"a score needs one output per pair, got {out.data.numel()}")
        return ScoringOutput(float(out.data.item()))


@dataclass
class PoolingRequestOutput(Generic[_O]):
    """vLLM's field order: request_id, outputs, prompt_token_ids, num_cached_tokens
    (always 0: there is no prefix cache), finished."""
    request_id: str
    outputs: _O
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    finished: bool = True


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    @staticmethod
    def from_base(out: PoolingRequestOutput) -> ClassificationRequestOutput:
        return ClassificationRequestOutput(out.request_id, ClassificationOutput.from_base(out.outputs),
                                           out.prompt_token_ids, out.num_cached_tokens, out.finished)


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    @staticmethod
    def from_base(out: PoolingRequestOutput) -> ScoringRequestOutput:
        return ScoringRequestOutput(out.request_id, ScoringOutput.from_base(out.outputs), out.prompt_token_ids,
                                    out.num_cached_tokens, out.finished)
