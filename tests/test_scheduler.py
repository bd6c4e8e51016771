"""Token-budget packing."""
import random

import pytest

from pyengine.scheduler import WaitingQueue, next_batch, pack


@pytest.mark.parametrize("n,budget,seqs", [(50, 64, 8), (200, 1000, 256), (7, 10, 1)])
def test_pack_respects_budgets_and_loses_nothing(n, budget, seqs):
    rng = random.Random(n)
    lens = [rng.randint(1, 10) for _ in range(n)]
    batches = pack(lens, budget, seqs)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    for b in batches:
        assert len(b) <= seqs and sum(lens[i] for i in b) <= budget
    # Sorted by length across batches: like lengths run together.
    assert [lens[i] for i in flat] == sorted(lens)


def test_pack_rejects_sequence_over_budget():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than max_num_batched_tokens=8"):
        pack([3, 9], 8, 4)


def test_next_batch_anchored_on_an_old_request():
    lens = [50, 1, 2, 3, 4, 60]
    assert next_batch(lens, 100, 8) == [1, 2, 3, 4, 0]
    # The oldest (index 0, 50 tokens) waited too long: the batch starts from it, takes
    # the longer ones, then fills up with the shorter ones, longest first.
    assert next_batch(lens, 100, 8, first=0) == [0, 4, 3, 2, 1]
    assert next_batch(lens, 58, 8, first=0) == [0, 4, 3]
    assert next_batch(lens, 115, 8, first=0) == [0, 5, 4]
    assert next_batch(lens, 120, 2, first=0) == [0, 5]
    assert next_batch([], 10, 2) == []


def _grouped_batch(ref, group, budget, seqs, anchored):
    """The batch of items sorted by (group, length, arrival), from the oldest item's group
    on and round to the groups before it (anchored: from the oldest item itself on, then
    back down from it), cut under both budgets."""
    order = sorted(ref, key=lambda r: (group[r], ref[r], int(r)))
    oldest = next(iter(ref))
    start = order.index(oldest) if anchored else next(j for j, r in enumerate(order) if group[r] == group[oldest])
    take, tokens = [], 0
    runs = (order[start:], order[:start][::-1]) if anchored else (order[start:] + order[:start],)
    for run in runs:  # anchored: the second run goes on even where the first stopped short
        for r in run:
            if len(take) == seqs or (take and tokens + ref[r] > budget):
                break
            take.append(r)
            tokens += ref[r]
    return take


@pytest.mark.parametrize("groups", [
    1,  # no adapters: every item in group 0; the reference is next_batch
    3,  # items of three LoRA adapters: each group's items stay together, the batch wraps round
])
def test_waiting_queue_picks_what_next_batch_picks(groups):
    # Random adds, removals and anchored or plain pops against next_batch over the
    # waiting items in arrival order (one group), or the grouped order.
    rng = random.Random(groups)
    q, ref, group, ids = WaitingQueue(), {}, {}, iter(range(10 ** 6))
    for step in range(3000):
        op = rng.random()
        if op < 0.5:
            rid = str(next(ids))
            n, g = rng.randint(1, 12), rng.randrange(groups)
            q.add(rid, n, ("item", rid), g)
            ref[rid], group[rid] = n, g
        elif op < 0.7 and ref:
            rid = rng.choice(list(ref) + ["missing"])
            assert q.remove(rid) == (None if rid == "missing" else ("item", rid))
            ref.pop(rid, None)
        else:
            budget, seqs, anchored = rng.randint(12, 40), rng.randint(1, 6), rng.random() < 0.3
            if groups == 1:
                order = list(ref)
                want = [order[i] for i in next_batch([ref[r] for r in order], budget, seqs, 0 if anchored else None)]
            else:
                want = _grouped_batch(ref, group, budget, seqs, anchored) if ref else []
            got = q.pop_batch(budget, seqs, anchored)
            assert got == [("item", r) for r in want], step
            for r in want:
                del ref[r]
        assert list(q) == list(ref) and len(q) == len(ref)
        assert q.oldest() == (("item", next(iter(ref))) if ref else None)
    with pytest.raises(ValueError, match="already queued"):
        q.add("x", 1, None) or q.add("x", 1, None)


def test_anchored_batches_stay_full_when_prompts_come_longest_first():
    # Every prompt of one long call is as old as the others: once the oldest has waited
    # past the limit each batch is anchored on it, and with prompts given longest first
    # it is the longest left; the shorter ones fill the batch as an unanchored one would.
    rng = random.Random(0)
    lens = sorted((rng.randint(8, 512) for _ in range(3000)), reverse=True)
    counts = {}
    for anchored in (False, True):
        q = WaitingQueue()
        for i, n in enumerate(lens):
            q.add(str(i), n, n)
        batches = []
        while q:
            batches.append(q.pop_batch(16384, 256, anchored))
        assert sorted(x for b in batches for x in b) == sorted(lens)
        counts[anchored] = len(batches)
    assert counts[True] == counts[False], counts


def test_waiting_queue_rejects_a_sequence_over_budget_and_keeps_it():
    q = WaitingQueue()
    q.add("a", 9, "a")
    with pytest.raises(ValueError, match="request 'a' has 9 tokens, more than max_num_batched_tokens=8"):
        q.pop_batch(8, 4)
    assert list(q) == ["a"] and q.pop_batch(9, 4) == ["a"] and not q


def test_waiting_queue_fills_batches_to_a_target_below_the_budget():
    # The CPU engine's batches: filled to target_tokens; an item longer than the target
    # (but within max_num_batched_tokens) runs alone; one beyond the budget is refused.
    q = WaitingQueue()
    for name, n in (("a", 3), ("b", 3), ("c", 4), ("d", 9), ("e", 2)):
        q.add(name, n, name)
    batches = []
    while q:
        batches.append(q.pop_batch(16, 8, target_tokens=6))
    assert batches == [["e", "a"], ["b"], ["c"], ["d"]]
    assert all(sum({"a": 3, "b": 3, "c": 4, "d": 9, "e": 2}[x] for x in b) <= 6 or len(b) == 1 for b in batches)
    q.add("f", 17, "f")
    with pytest.raises(ValueError, match="has 17 tokens, more than max_num_batched_tokens=16"):
        q.pop_batch(16, 8, target_tokens=6)
    # a target above the budget is the budget
    for name, n in (("g", 9), ("h", 9)):
        q.add(name, n, name)
    q.remove("f")
    assert q.pop_batch(16, 8, target_tokens=100) == ["g"]
