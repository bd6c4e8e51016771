"""Token-budget packing: which waiting sequences run together."""
from __future__ import annotations


def pack(lengths, max_num_batched_tokens, max_num_seqs):
    """Cut sequences, shortest first, into batches under both budgets.

    lengths: list[int]. Returns a list of batches, each a list of indices into
    ``lengths``. Sorting first keeps sequences of like length together, which keeps
    the longest-sequence bound of each batch tight for attention.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches, cur, tokens = [], [], 0
    for i in order:
        n = lengths[i]
        if n > max_num_batched_tokens:
            raise ValueError(f"sequence {i} has {n} tokens, more than max_num_batched_tokens="
                             f"{max_num_batched_tokens}")
        if cur and (tokens + n > max_num_batched_tokens or len(cur) == max_num_seqs):
            batches.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += n
    if cur:
        batches.append(cur)
    return batches


def next_batch(lengths, max_num_batched_tokens, max_num_seqs):
    """The first batch :func:`pack` would cut: indices of the sequences to run now."""
    return pack(lengths, max_num_batched_tokens, max_num_seqs)[0] if lengths else []
