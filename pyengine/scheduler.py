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


def next_batch(lengths, max_num_batched_tokens, max_num_seqs, first=None):
    """The indices of the sequences to run now: the first batch :func:`pack` would cut,
    or, when ``first`` is given, a batch cut from the length-sorted order starting at
    sequence ``first`` (so a long request that has waited too long runs next instead
    of yielding forever to shorter arrivals)."""
    if not lengths:
        return []
    if first is None:
        return pack(lengths, max_num_batched_tokens, max_num_seqs)[0]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i != first))
    tail = order[order.index(first):]
    # pack's sort is stable and tail is already sorted, so ``first`` stays in front.
    return [tail[j] for j in pack([lengths[i] for i in tail], max_num_batched_tokens, max_num_seqs)[0]]
