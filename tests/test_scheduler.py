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
    # The oldest (index 0, 50 tokens) waited too long: the batch starts from it.
    assert next_batch(lens, 100, 8, first=0) == [0]
    assert next_batch(lens, 120, 8, first=0) == [0, 5]
    assert next_batch([], 10, 2) == []


@pytest.mark.parametrize("groups", [
    1,  # no adapters: every item in group 0
    3,  # items of three LoRA adapters: a batch holds the oldest item's group only
])
def test_waiting_queue_picks_what_next_batch_picks(groups):
    # Random adds, removals and anchored or plain pops against next_batch over the
    # waiting items of the oldest item's group, in arrival order.
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
            order = [r for r in ref if group[r] == group[next(iter(ref))]] if ref else []
            want = [order[i] for i in next_batch([ref[r] for r in order], budget, seqs, 0 if anchored else None)]
            got = q.pop_batch(budget, seqs, anchored)
            assert got == [("item", r) for r in want], step
            for r in want:
                del ref[r]
        assert list(q) == list(ref) and len(q) == len(ref)
        assert q.oldest() == (("item", next(iter(ref))) if ref else None)
    with pytest.raises(ValueError, match="already queued"):
        q.add("x", 1, None) or q.add("x", 1, None)


def test_waiting_queue_rejects_a_sequence_over_budget_and_keeps_it():
    q = WaitingQueue()
    q.add("a", 9, "a")
    with pytest.raises(ValueError, match="request 'a' has 9 tokens, more than max_num_batched_tokens=8"):
        q.pop_batch(8, 4)
    assert list(q) == ["a"] and q.pop_batch(9, 4) == ["a"] and not q
