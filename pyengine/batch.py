"""The ragged batch: sequences packed back to back, no padding anywhere."""
from __future__ import annotations

import torch


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
        """token_ids: list of B non-empty int lists; token_type_ids: same shape or None.

        The host tensors are filled in pinned memory on CUDA and copied with
        non_blocking, so the copy overlaps with the previous batch's GPU work.
        """
        device = torch.device(device)
        lens = [len(t) for t in token_ids]
        T = sum(lens)
        pin = device.type == "cuda"
        host = torch.empty((3, T), dtype=torch.int64, pin_memory=pin)
        flat = [i for t in token_ids for i in t]
        host[0] = torch.tensor(flat, dtype=torch.int64)
        host[1] = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens])
        if token_type_ids is not None:
            host[2] = torch.tensor([i for t in token_type_ids for i in t], dtype=torch.int64)
        else:
            host[2].zero_()
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32, pin_memory=pin)
        cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
        if pin:
            host = host.to(device, non_blocking=True)
            cu = cu.to(device, non_blocking=True)
        return cls(host[0], host[1], host[2], cu, max(lens), lens)


if __name__ == "__main__":
    # `python -m pyengine.batch` is the batch command (pyengine.batch_job); this module
    # keeps its name because the engine imports the ragged batch from here.
    import sys

    from pyengine.batch_job import main

    sys.exit(main())
