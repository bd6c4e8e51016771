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
    = (0, l0, l0+l1, ...); max_seqlen: int; seq_lens: list[int] on the host; mm: the
    batch's images (a multimodal.MMBatch) for a vision-language model, else None.
    """

    __slots__ = ("input_ids", "positions", "token_type_ids", "cu_seqlens", "max_seqlen", "seq_lens", "mm")

    def __init__(self, input_ids, positions, token_type_ids, cu_seqlens, max_seqlen, seq_lens, mm=None):
        self.input_ids = input_ids
        self.positions = positions
        self.token_type_ids = token_type_ids
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.seq_lens = seq_lens
        self.mm = mm

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, token_ids, token_type_ids=None, device="cpu"):
        """token_ids: list of B non-empty int sequences (lists, or int64 arrays); token_type_ids: None, or a list of
        B entries each an int sequence of its prompt's length or None (all zeros).

        The four index tensors are filled in one host buffer (pinned on CUDA) and reach
        the device in one non_blocking copy, which overlaps with earlier GPU work; on the
        device they are views of that one allocation.
        """
        device = torch.device(device)
        host, seq_lens, T = _pack(token_ids, token_type_ids, None, None, pin=device.type == "cuda")
        if device.type != "cpu":
            host = host.to(device, non_blocking=device.type == "cuda")
        return cls._views(host, seq_lens, T, max(seq_lens))

    @classmethod
    def build_padded(cls, token_ids, token_type_ids, num_tokens, num_seqs, max_seqlen, buffer):
        """The batch padded to exactly ``num_tokens`` tokens and ``num_seqs`` sequences, as
        views of ``buffer`` (a uint8 device tensor of at least :meth:`padded_nbytes`
        bytes), so that one shape always lands at the same addresses (a CUDA graph's
        inputs). The B real sequences come first; then ``num_seqs - B`` padding
        sequences (token id 0) share the ``num_tokens - T`` spare tokens, at least one
        each and at most ``max_seqlen``, so every row is written and belongs to a
        sequence and every tensor keeps the contract of :meth:`build`. max_seqlen: int,
        the bound the kernels see (a graph bakes it in, so it is the bucket's bound, not
        this batch's). seq_lens holds the real sequences' lengths only.
        """
        host, seq_lens, _ = _pack(token_ids, token_type_ids, num_tokens, num_seqs, pin=buffer.is_cuda,
                                  max_len=max_seqlen)
        dev = buffer[:host.numel()]
        dev.copy_(host, non_blocking=buffer.is_cuda)
        batch = cls._views(dev, seq_lens, num_tokens, max_seqlen)
        batch.seq_lens = seq_lens[:len(token_ids)]
        return batch

    @staticmethod
    def padded_nbytes(num_tokens, num_seqs) -> int:
        """Bytes of the packed buffer of a batch of num_tokens tokens and num_seqs sequences."""
        return 8 * 3 * _row(num_tokens) + 4 * (num_seqs + 1)

    @classmethod
    def _views(cls, buf, seq_lens, T, max_seqlen):
        row = _row(T)
        ints = buf[:8 * 3 * row].view(torch.int64)
        return cls(ints[:T], ints[row:row + T], ints[2 * row:2 * row + T],
                   buf[8 * 3 * row:8 * 3 * row + 4 * (len(seq_lens) + 1)].view(torch.int32), int(max_seqlen),
                   seq_lens)


def _row(T):
    """int64 elements per row of the packed buffer: T rounded up to the alignment."""
    return -(-T // _ALIGN) * _ALIGN


def _padding_lengths(spare_tokens, spare_seqs, max_len):
    """Lengths of the padding sequences: spare_tokens split as evenly as possible over
    spare_seqs sequences of 1 to max_len tokens each (short sequences keep the padding's
    attention cost small)."""
    if spare_seqs < 1 or not spare_seqs <= spare_tokens <= spare_seqs * max_len:
        raise ValueError(f"cannot pad with {spare_tokens} tokens over {spare_seqs} sequences: "
                         f"each padding sequence needs at least one token and at most {max_len}")
    q, r = divmod(spare_tokens, spare_seqs)
    return [q + 1] * r + [q] * (spare_seqs - r)


def _pack(token_ids, token_type_ids, num_tokens, num_seqs, pin, max_len=None):
    """Fill the host buffer: rows of input_ids, positions and token types (int64), then
    cu_seqlens (int32). With num_tokens/num_seqs, padding sequences of at most max_len
    tokens follow the real ones (see RaggedBatch.build_padded); their ids and types are 0.
    Returns (uint8 buffer, every sequence's length, tokens in all)."""
    seq_lens = [len(t) for t in token_ids]
    T = sum(seq_lens)
    if num_tokens is not None and (num_tokens, num_seqs) != (T, len(seq_lens)):
        seq_lens = seq_lens + _padding_lengths(num_tokens - T, num_seqs - len(seq_lens), max_len)
    B = len(seq_lens)
    lens = np.array(seq_lens, dtype=np.int64)
    total = int(lens.sum())
    row = _row(total)
    host = torch.empty(8 * 3 * row + 4 * (B + 1), dtype=torch.uint8, pin_memory=pin)
    buf = host.numpy()
    rows = buf[:8 * 3 * row].view(np.int64).reshape(3, row)
    cu = buf[8 * 3 * row:].view(np.int32)
    cu[0] = 0
    np.cumsum(lens, out=cu[1:], dtype=np.int32)
    if T and all(isinstance(t, np.ndarray) for t in token_ids):
        np.concatenate(token_ids, out=rows[0, :T])  # the checked prompts' int64 views
    else:
        # Python lists: fromiter over a chain flattens them in C without building an
        # intermediate list.
        rows[0, :T] = np.fromiter(chain.from_iterable(token_ids), dtype=np.int64, count=T)
    rows[0, T:total] = 0
    # positions = token index - start of its sequence, without one arange per sequence.
    np.subtract(np.arange(total, dtype=np.int64), np.repeat(cu[:-1].astype(np.int64), lens), out=rows[1, :total])
    if token_type_ids is not None and any(t is not None for t in token_type_ids):
        flat = chain.from_iterable(repeat(0, n) if t is None else t for t, n in zip(token_type_ids, seq_lens))
        rows[2, :T] = np.fromiter(flat, dtype=np.int64, count=T)
        rows[2, T:total] = 0
    else:
        rows[2, :total] = 0
    return host, seq_lens, total

if __name__ == "__main__":
    # `python -m pyengine.batch` is the batch command (pyengine.batch_job); this module
    # keeps its name because the engine imports the ragged batch from here.
    import sys

    from pyengine.batch_job import main

    sys.exit(main())
