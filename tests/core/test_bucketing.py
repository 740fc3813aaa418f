"""``length_buckets``: the one batcher of the encoder, the index builder and training.

Pins its behaviour on fixed inputs (order, cuts by tokens, rows and padding waste, quadratic
for packed attention and linear for a padded forward) and checks its bounds on random lengths.
"""

from __future__ import annotations

import random

import pytest

from onegen_core.model.attention import MAX_PAD_WASTE
from onegen_core.model.bucketing import length_buckets

LENGTHS = [5, 40, 12, 40, 3, 25, 7]


def test_pinned_buckets():
    # attention waste (the encoder and index builder): 40+40 > 60 tokens, 2 x 25^2 > 1.5 x (25^2 + 12^2),
    # 3 x 12^2 > 1.5 x (12^2 + 7^2 + 5^2), while 2 x 5^2 <= 1.5 x (5^2 + 3^2)
    assert length_buckets(LENGTHS, max_tokens=60, max_rows=3) == [[1], [3], [5], [2, 6], [0, 4]]
    assert length_buckets(LENGTHS) == [[1, 3, 5], [2, 6], [0, 4]]
    assert length_buckets(LENGTHS, max_rows=2) == [[1, 3], [5], [2, 6], [0, 4]]
    # a padded forward (training): 4 x 40 <= 1.5 x 117, 5 x 40 > 1.5 x 124
    assert length_buckets(LENGTHS, power=1) == [[1, 3, 5, 2], [6, 0, 4]]
    # ties keep the input order; a row over the token budget gets a bucket of its own
    assert length_buckets([7, 7, 7]) == [[0, 1, 2]]
    assert length_buckets([50, 3], max_tokens=10) == [[0], [1]]
    assert length_buckets([]) == []


@pytest.mark.parametrize("power", [1, 2])
def test_every_row_once_longest_first_within_every_bound(power):
    rng = random.Random(power)
    lengths = [rng.choice([rng.randint(200, 320), rng.randint(1, 140)]) for _ in range(200)]
    buckets = length_buckets(lengths, power=power, max_tokens=2000, max_rows=16)
    assert sorted(r for b in buckets for r in b) == list(range(len(lengths)))
    flat = [lengths[r] for b in buckets for r in b]
    assert flat == sorted(lengths, reverse=True)
    assert len(buckets) > 1
    for b in buckets:
        if len(b) == 1:
            continue
        n = [lengths[r] for r in b]
        assert len(b) <= 16 and sum(n) <= 2000
        assert len(b) * max(n) ** power <= MAX_PAD_WASTE * sum(x ** power for x in n)
