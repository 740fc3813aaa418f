"""Length bucketing: which rows share one forward, for the encoder, the index builder and training.

Rows are sorted longest first (ties in input order) and cut into consecutive buckets so that
padding every row of a bucket to its longest wastes little: a bucket's padded cost,
``rows x longest**power``, stays within ``max_waste`` x its real cost, the sum of
``length**power``. ``power=2`` measures attention, quadratic in length and the only part of
a packed (unpadded) forward that pads: the encoder's attention runs a bucket as one padded
call under the same threshold (``onegen_core.model.attention.MAX_PAD_WASTE``), else one call
per sequence. ``power=1`` measures a dense right-padded forward, where every layer pads
(training). ``max_tokens`` and ``max_rows`` cap a bucket's real tokens and its rows; a row
longer than ``max_tokens`` gets a bucket of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from .attention import MAX_PAD_WASTE


def length_buckets(lengths: Sequence[int], *, power: int = 2, max_waste: float = MAX_PAD_WASTE,
                   max_tokens: int | None = None, max_rows: int | None = None) -> list[list[int]]:
    """Indices into ``lengths``, grouped: every index once, longest first, each bucket within the bounds."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    buckets: list[list[int]] = []
    bucket: list[int] = []
    tokens = cost = 0
    for k in order:
        n = lengths[k]
        if bucket:
            fits = ((max_tokens is None or tokens + n <= max_tokens)
                    and (max_rows is None or len(bucket) < max_rows)
                    and (len(bucket) + 1) * lengths[bucket[0]] ** power <= max_waste * (cost + n ** power))
            if not fits:
                buckets.append(bucket)
                bucket, tokens, cost = [], 0, 0
        bucket.append(k)
        tokens += n
        cost += n ** power
    if bucket:
        buckets.append(bucket)
    return buckets
