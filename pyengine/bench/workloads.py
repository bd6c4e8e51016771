"""Benchmark workloads: lists of token-id prompts, identical for every provider.

"mixed" is the design's workload: lengths round(exp(N(ln 120, 0.8))) clipped to
[8, 512], drawn from a seeded torch generator (mean about 159 tokens for 2048
prompts at seed 0). "fixed:N" gives every prompt N tokens. Synthetic prompts are
random ids in [lo, hi) (lo = 1000 where the vocabulary allows; hi stops below the
first special id above lo, so no id is a pad or end token), wrapped in the model's
begin/end ids for encoders ([CLS] ... [SEP]). A dataset file is tokenised once with
the model's tokenizer.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

MIXED_MEDIAN, MIXED_SIGMA, MIXED_MIN, MIXED_MAX = 120, 0.8, 8, 512


@dataclass
class Workload:
    name: str                  # "mixed", "fixed:128" or "dataset:<file name>"
    prompts: list[list[int]]   # token ids per prompt, ends included
    seed: int | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def summary(self) -> dict:
        lens = self.lengths
        return {"name": self.name, "seed": self.seed, "num_prompts": len(lens), "num_tokens": sum(lens),
                "mean_len": sum(lens) / len(lens), "min_len": min(lens), "max_len": max(lens)}


def parse_workload(spec: str) -> tuple[str, int | None]:
    """"mixed" -> ("mixed", None); "fixed:N" -> ("fixed", N). ValueError otherwise."""
    if spec == "mixed":
        return "mixed", None
    kind, _, n = str(spec).partition(":")
    if kind == "fixed":
        try:
            length = int(n)
        except ValueError:
            length = None
        if length is None or length < 2:
            raise ValueError(f"workload {spec!r}: fixed:N needs an integer N >= 2 (tokens per prompt)")
        return "fixed", length
    raise ValueError(f"unknown workload {spec!r}; expected 'mixed' or 'fixed:N'")


def mixed_lengths(n: int, seed: int = 0, max_len: int = MIXED_MAX) -> list[int]:
    """n lengths round(exp(N(ln 120, 0.8))) clipped to [8, min(512, max_len)]."""
    if n < 1:
        raise ValueError(f"number of prompts must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * MIXED_SIGMA + math.log(MIXED_MEDIAN)
    return x.exp().round().clamp(MIXED_MIN, min(MIXED_MAX, max_len)).long().tolist()


def id_range(vocab_size: int, special_ids=()) -> tuple[int, int]:
    """[lo, hi) of the random ids: no special id falls inside it."""
    lo = 1000 if vocab_size > 2000 else vocab_size // 2
    above = [s for s in special_ids if s is not None and s >= lo]
    hi = min([vocab_size] + above)
    if hi - lo < 2:
        raise ValueError(f"vocabulary of {vocab_size} ids leaves no room for random prompt ids")
    return lo, hi


def synthetic(spec: str, num_prompts: int, seed: int, vocab_size: int, ends=None, special_ids=(),
              max_len: int = MIXED_MAX) -> Workload:
    """num_prompts token-id prompts of the lengths ``spec`` gives. ends: (first_id,
    last_id) wrapped around every prompt (encoders) or None; special_ids: ids never
    drawn; max_len: the model's limit (mixed lengths are clipped to it, fixed:N must
    fit it)."""
    kind, fixed = parse_workload(spec)
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"number of prompts must be a positive int, got {num_prompts!r}")
    if kind == "fixed":
        if fixed > max_len:
            raise ValueError(f"workload {spec!r}: {fixed} tokens exceed the model's maximum of {max_len}")
        lengths = [fixed] * num_prompts
    else:
        lengths = mixed_lengths(num_prompts, seed, max_len)
    lo, hi = id_range(vocab_size, list(special_ids) + list(ends or ()))
    n_ends = 2 if ends else 0
    g = torch.Generator().manual_seed(seed + 1)  # its own stream: lengths stay those of mixed_lengths
    flat = torch.randint(lo, hi, (sum(lengths) - n_ends * num_prompts,), generator=g).tolist()
    prompts, at = [], 0
    for n in lengths:
        body = flat[at:at + n - n_ends]
        at += n - n_ends
        prompts.append([ends[0], *body, ends[1]] if ends else body)
    return Workload(spec, prompts, seed)


def _read_records(path):
    """Texts of a file: one per non-empty line, or JSONL objects with "text" and an
    optional "text_pair". Returns a list of (text, text_pair or None)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [(i + 1, line.rstrip("\n")) for i, line in enumerate(f) if line.strip()]
    if not lines:
        raise ValueError(f"dataset {path!r} has no non-empty line")
    jsonl = path.endswith(".jsonl") or lines[0][1].lstrip().startswith("{")
    if not jsonl:
        return [(text, None) for _, text in lines]
    out = []
    for no, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset {path!r} line {no}: not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise ValueError(f"dataset {path!r} line {no}: expected an object with a string 'text'")
        pair = rec.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise ValueError(f"dataset {path!r} line {no}: 'text_pair' must be a string")
        out.append((rec["text"], pair))
    return out


def read_dataset(path: str, tokenizer, max_len: int, num_prompts: int | None = None) -> Workload:
    """Tokenise the first ``num_prompts`` records of ``path`` (all when None),
    truncated to ``max_len`` tokens. Pairs keep only their ids: prompt_token_ids
    carry no token types, so neither provider gets any (all zero)."""
    records = _read_records(path)
    if num_prompts is not None:
        records = records[:num_prompts]
    prompts = []
    for i, (text, pair) in enumerate(records):
        ids = tokenizer(text, pair, truncation=True, max_length=max_len)["input_ids"]
        if not ids:
            raise ValueError(f"dataset {path!r} record {i} tokenises to no tokens")
        prompts.append(list(ids))
    return Workload(f"dataset:{os.path.basename(path)}", prompts, None)
