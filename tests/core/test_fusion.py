"""Hybrid retrieval's rules (``onegen_core.retrieval.fusion``): reciprocal-rank fusion on hand-made rankings whose
fused order is worked out by hand, its tie-breaks, and the text BM25 searches during one-pass generation."""

from __future__ import annotations

from fractions import Fraction

import pytest

from onegen_core.retrieval.fusion import (
    RRF_K,
    bm25_query_text,
    fuse_hits,
    fusion_depth,
    reciprocal_rank_fusion,
)
from onegen_core.retrieval.retriever import RetrievalHit


def _keys(fused):
    return [key for key, _ in fused]


def test_overlapping_lists_sum_reciprocal_ranks():
    """a: 1/61 + 1/62, c: 1/63 + 1/61, b: 1/62, d: 1/63."""
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]])
    assert _keys(fused) == ["a", "c", "b", "d"]
    assert dict(fused) == pytest.approx({"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62, "d": 1 / 63})
    assert RRF_K == 60


def test_disjoint_lists_interleave_dense_first():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["d", "e", "f"]])
    assert _keys(fused) == ["a", "d", "b", "e", "c", "f"]
    assert fused[0][1] == fused[1][1] == pytest.approx(1 / 61)


def test_equal_sums_break_by_list_order():
    fused = reciprocal_rank_fusion([["a", "b"], ["b", "a"]])  # both 1/61 + 1/62, both best rank 1
    assert _keys(fused) == ["a", "b"]  # a's rank 1 is in the first list
    assert _keys(reciprocal_rank_fusion([["b", "a"], ["a", "b"]])) == ["b", "a"]


def test_exact_ties_do_not_depend_on_float_summation_order():
    """x holds ranks 1, 2, 3 and y ranks 3, 1, 2: equal sums, added in different orders; x's rank 1 comes first."""
    rankings = [["x", "w", "y"], ["y", "x", "v"], ["u", "y", "x"]]
    fused = reciprocal_rank_fusion(rankings)
    assert _keys(fused)[:2] == ["x", "y"]
    assert _keys(reciprocal_rank_fusion([rankings[1], rankings[0], rankings[2]]))[:2] == ["y", "x"]
    exact = Fraction(1, 61) + Fraction(1, 62) + Fraction(1, 63)
    assert dict(fused)["x"] == pytest.approx(float(exact))


def test_best_rank_breaks_a_tie_before_list_order():
    """With k = 1, p at ranks 1 and 5 scores 1/2 + 1/6 and q at ranks 2 and 2 scores 1/3 + 1/3: both 2/3. q's
    lists come first, but p's best rank (1) beats q's (2)."""
    rankings = [["s", "q"], ["x", "q"], ["p", "t"], ["a", "b", "c", "d", "p"]]
    fused = reciprocal_rank_fusion(rankings, k=1)
    assert _keys(fused)[:2] == ["p", "q"]
    assert fused[0][1] == fused[1][1] == pytest.approx(2 / 3)


def test_limit_repeats_and_bad_arguments():
    fused = reciprocal_rank_fusion([["a", "b", "a", "c"], ["c"]], limit=2)  # a's repeat does not count
    assert _keys(fused) == ["c", "a"]  # c: 1/64 + 1/61; a: 1/61 (its second place at rank 3 is skipped)
    assert dict(fused)["a"] == pytest.approx(1 / 61)
    assert reciprocal_rank_fusion([[], []]) == []
    assert reciprocal_rank_fusion([["a"]], limit=0) == []
    with pytest.raises(ValueError, match="k must be >= 1"):
        reciprocal_rank_fusion([["a"]], k=0)
    with pytest.raises(ValueError, match="limit must be >= 0"):
        reciprocal_rank_fusion([["a"]], limit=-1)


def test_fuse_hits_keeps_the_first_lists_copy_with_the_fused_score():
    dense = [RetrievalHit("a", 0.9, 0, text="dense a"), RetrievalHit("b", 0.8, 1, text="dense b")]
    bm25 = [RetrievalHit("c", 12.0, 2, text="bm25 c"), RetrievalHit("a", 7.0, 0, text="bm25 a")]
    fused = fuse_hits([dense, bm25], limit=3)
    assert [h.doc_id for h in fused] == ["a", "c", "b"]
    assert [h.text for h in fused] == ["dense a", "bm25 c", "dense b"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62) and fused[0].vector_id == 0
    assert dense[0].score == 0.9  # the inputs are not changed


def test_fusion_depth():
    assert fusion_depth(1) == 20 and fusion_depth(5) == 20 and fusion_depth(50) == 50


@pytest.mark.parametrize(("user", "generated", "expected"), [
    ("Who wrote Odrin?", "", "Who wrote Odrin?"),
    ("Who wrote Odrin?", " Odrin was written by ", "Who wrote Odrin?\nOdrin was written by"),
    ("  ", "the harp player", "the harp player"),
    ("", "", ""),
])
def test_bm25_query_text(user, generated, expected):
    assert bm25_query_text(user, generated) == expected
