"""Token-budget packing: which waiting sequences run together."""
from __future__ import annotations

from bisect import bisect_left


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
    sequence ``first`` and going on to longer ones, then, where those do not fill it,
    down to shorter ones (so a long request that has waited too long runs next instead
    of yielding forever to shorter arrivals, in a full batch)."""
    if not lengths:
        return []
    if first is None:
        return pack(lengths, max_num_batched_tokens, max_num_seqs)[0]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i != first))
    at = order.index(first)
    take, tokens = [], 0
    for run in (order[at:], order[:at][::-1]):
        for i in run:
            if len(take) == max_num_seqs or (take and tokens + lengths[i] > max_num_batched_tokens):
                break
            take.append(i)
            tokens += lengths[i]
    return take


class WaitingQueue:
    """Items waiting to be scheduled, by id in arrival order, with a length-sorted index
    kept from step to step.

    :meth:`pop_batch` takes the batch :func:`next_batch` would choose over the waiting
    items in arrival order (``oldest_first`` is ``first=0``), but without re-sorting and
    re-packing the whole queue every step: that per-step O(n log n) becomes O(n^2 log n)
    over a pass of n requests. Here a step costs O(batch + log n), amortised.

    Each item has a key ``group << 80 | length << 40 | arrival number``: sorting the
    keys sorts by group, then by length, ties by arrival, as ``next_batch``'s stable sort
    does. A group is a LoRA adapter's key (0 for none): a batch is one run of the sorted
    keys, so it keeps each group's items next to each other, and it starts in the oldest
    waiting item's group, so no group waits behind a stream of another's.
    """

    _SEQ_BITS = 40
    _SEQ_MASK = (1 << _SEQ_BITS) - 1
    _GROUP_SHIFT = 2 * _SEQ_BITS

    def __init__(self):
        self._keys: dict[str, int] = {}  # id -> key, in arrival order
        self._by_key: dict[int, tuple[str, object]] = {}  # key -> (id, item), live items only
        # Keys ascending, except an unsorted tail of keys added since the last pop (sorted
        # lazily: one sort of an almost-sorted list is a merge). May hold removed keys;
        # they are skipped, and purged once they are half the list.
        self._sorted: list[int] = []
        self._dirty = False
        self._dead = 0
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __contains__(self, item_id) -> bool:
        return item_id in self._keys

    def __iter__(self):
        """Ids in arrival order."""
        return iter(self._keys)

    def get(self, item_id, default=None):
        key = self._keys.get(item_id)
        return default if key is None else self._by_key[key][1]

    def oldest(self):
        """The item that arrived first, or None when empty."""
        for key in self._keys.values():
            return self._by_key[key][1]
        return None

    def add(self, item_id: str, length: int, item, group: int = 0):
        """group: a non-negative int; a batch keeps a group's items next to each other."""
        if item_id in self._keys:
            raise ValueError(f"id {item_id!r} is already queued")
        key = (group << self._GROUP_SHIFT) | (length << self._SEQ_BITS) | self._next_seq
        self._next_seq = (self._next_seq + 1) & self._SEQ_MASK
        self._keys[item_id] = key
        self._by_key[key] = (item_id, item)
        if self._sorted and key < self._sorted[-1]:
            self._dirty = True
        self._sorted.append(key)

    def remove(self, item_id):
        """Drop ``item_id``; returns its item, or None if it was not queued."""
        key = self._keys.pop(item_id, None)
        if key is None:
            return None
        item = self._by_key.pop(key)[1]
        self._dead += 1
        if self._dead > 32 and 2 * self._dead > len(self._sorted):
            by_key = self._by_key
            self._sorted = [k for k in self._sorted if k in by_key]
            self._dead = 0
        return item

    def pop_batch(self, max_num_batched_tokens: int, max_num_seqs: int, oldest_first: bool = False,
                  target_tokens: int | None = None) -> list:
        """Remove and return the items of the next batch, as many as fit under both
        budgets: from the start of the oldest item's group on, by group then length, then
        round to the groups before it; with ``oldest_first``, from the oldest item itself
        on and then down from it to shorter items, with no wrap (so an item that has waited
        too long runs next, in a batch as full as the others).
        target_tokens: fill batches to this many tokens only (at most
        max_num_batched_tokens); an item longer than that still runs, alone."""
        target = max_num_batched_tokens if target_tokens is None else min(target_tokens, max_num_batched_tokens)
        if not self._keys:
            return []
        keys = self._sorted
        if self._dirty:
            keys.sort()
            self._dirty = False
        oldest = next(iter(self._keys.values()))
        start = bisect_left(keys, oldest if oldest_first else oldest >> self._GROUP_SHIFT << self._GROUP_SHIFT)
        by_key, items = self._by_key, []
        tokens = dead = 0

        def walk(i, stop, step=1):
            """Take items from keys[i], keys[i + step], ... up to stop (not included);
            returns (the index it stopped at, whether the batch is full)."""
            nonlocal tokens, dead
            while i != stop:
                if len(items) == max_num_seqs:
                    return i, True
                entry = by_key.get(keys[i])
                if entry is None:  # removed since it was indexed
                    dead += 1
                    i += step
                    continue
                length = (keys[i] >> self._SEQ_BITS) & self._SEQ_MASK
                if length > max_num_batched_tokens:
                    raise ValueError(f"request {entry[0]!r} has {length} tokens, more than "
                                     f"max_num_batched_tokens={max_num_batched_tokens}")
                if items and tokens + length > target:
                    return i, True
                items.append(entry)
                tokens += length
                i += step
            return i, False

        end, full = walk(start, len(keys))
        wrap = 0
        if not full and not oldest_first and start > 0:
            wrap, _ = walk(0, start)
        elif oldest_first and start > 0 and len(items) < max_num_seqs:
            # Shorter items fill what the oldest and the longer ones left (all of it where
            # prompts came longest first, the oldest then being the longest left); the
            # batch is still one run of the sorted keys.
            below, _ = walk(start - 1, -1, -1)
            start = below + 1
        # The batch is one run of the sorted keys (removed keys aside), or two when it
        # wrapped: keys[start:end] and keys[:wrap].
        del keys[start:end]
        del keys[:wrap]
        self._dead -= dead
        for item_id, _ in items:
            del by_key[self._keys.pop(item_id)]
        return [item for _, item in items]
