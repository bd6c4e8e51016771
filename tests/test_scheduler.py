"""Token-budget packing."""
import random

import pytest

from pyengine.scheduler import next_batch, pack


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
