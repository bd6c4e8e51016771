"""The ragged batch: sequences packed back to back, no padding anywhere."""
from __future__ import annotations

from itertools import chain, repeat

import numpy as np
import torch

# Rows of the staging buffer start on 64-byte boundaries (8 int64), so every tensor the
# model sees is as aligned as a fresh allocation (vectorised loads, Triton's
# divisible-by-16 pointer specialisation).
_ALIGN = 8


class RaggedBatch:
    """Packed tokens of B sequences, T tokens in all.

    input_ids: (T,) int64; positions: (T,) int64, restarting at 0 for every sequence;
    token_type_ids: (T,) int64 (zeros where the model has none); cu_seqlens: (B+1,) int32
    = (0, l0, l0+l1, ...); max_seqlen: int; seq_lens: list[int] on the host.
    """

    __slots__ = ("input_ids", "positions", "token_type_ids", "cu_seqlens", "max_seqlen", "seq_lens")

    def __init__(self, input_ids, positions, token_type_ids, cu_seqlens, max_seqlen, seq_lens):
        self.input_ids = input_ids
        self.positions = positions
        self.token_type_ids = token_type_ids
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.seq_lens = seq_lens

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, token_ids, token_type_ids=None, device="cpu"):
        """token_ids: list of B non-empty int sequences; token_type_ids: None, or a list of
        B entries each an int sequence of its prompt's length or None (all zeros).

        The four index tensors are filled in one host buffer (pinned on CUDA) and reach
        the device in one non_blocking copy, which overlaps with earlier GPU work; on the
        device they are views of that one allocation.
        """
        device = torch.device(device)
        seq_lens = [len(t) for t in token_ids]
        B = len(seq_lens)
        lens = np.array(seq_lens, dtype=np.int64)
        T = int(lens.sum())
        row = -(-T // _ALIGN) * _ALIGN  # int64 elements per row, T rounded up
        cu_bytes = 4 * (B + 1)
        nbytes = 8 * 3 * row + cu_bytes
        pin = device.type == "cuda"
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        buf = host.numpy()
        rows = buf[:8 * 3 * row].view(np.int64).reshape(3, row)
        cu = buf[8 * 3 * row:].view(np.int32)
        cu[0] = 0
        np.cumsum(lens, out=cu[1:], dtype=np.int32)
        # Flattening the Python lists is the one per-token loop left; fromiter over a chain
        # runs it in C without building an intermediate list.
        rows[0, :T] = np.fromiter(chain.from_iterable(token_ids), dtype=np.int64, count=T)
        # positions = token index - start of its sequence, without one arange per sequence.
        np.subtract(np.arange(T, dtype=np.int64), np.repeat(cu[:-1].astype(np.int64), lens), out=rows[1, :T])
        if token_type_ids is not None and any(t is not None for t in token_type_ids):
            flat = chain.from_iterable(repeat(0, n) if t is None else t for t, n in zip(token_type_ids, seq_lens))
            rows[2, :T] = np.fromiter(flat, dtype=np.int64, count=T)
        else:
            rows[2, :T] = 0
        if device.type != "cpu":
            host = host.to(device, non_blocking=pin)
        ints = host[:8 * 3 * row].view(torch.int64)
        return cls(ints[:T], ints[row:row + T], ints[2 * row:2 * row + T],
                   host[8 * 3 * row:].view(torch.int32), int(lens.max()), seq_lens)


if __name__ == "__main__":
    # `python -m pyengine.batch` is the batch command (pyengine.batch_job); this module
    # keeps its name because the engine imports the ragged batch from here.
    import sys

    from pyengine.batch_job import main

    sys.exit(main())
