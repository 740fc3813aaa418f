"""bench/quality_metrics.py: the pure metric functions of the quality benchmark, on tiny inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import quality_metrics as qm  # noqa: E402


def test_normalize_answer_is_squad_style():
    assert qm.normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert qm.normalize_answer("An apple; the end.") == "apple end"
    assert qm.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1():
    assert qm.exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert qm.exact_match("Eiffel", "Eiffel tower") == 0.0
    assert qm.token_f1("Eiffel tower", "Eiffel tower") == 1.0
    # pred {paris, france}, ref {paris}: p = 1/2, r = 1 -> f1 = 2/3
    assert qm.token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert qm.token_f1("London", "Paris") == 0.0
    assert qm.token_f1("", "") == 1.0
    assert qm.token_f1("the", "Paris") == 0.0  # normalises to empty
    assert qm.token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # counts, not sets


def test_strip_generated_drops_inserted_passages_and_markers():
    text = "[RQ]<paragraph>Paris\nParis is the capital.</paragraph>Paris is the capital of France."
    assert qm.strip_generated(text, markers=["[RQ]"]) == "Paris is the capital of France."
    assert qm.strip_generated("Answer <paragraph>cut off", markers=[]) == "Answer"
    assert qm.strip_generated("  plain  answer ") == "plain answer"


def test_top_unique_dedupes_units_of_one_passage():
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.95])
    ids = ["a", "a", "b", "c", "d"]
    assert qm.top_unique(scores, ids, 3) == ["d", "a", "b"]
    assert qm.top_unique(scores, ids, 10) == ["d", "a", "b", "c"]
    assert qm.top_unique(scores, [], 3) == []


def test_top_unique_widens_when_the_head_is_one_passage():
    n = 100
    scores = np.linspace(1.0, 0.0, n)
    ids = ["x"] * 90 + [f"p{i}" for i in range(10)]  # the 90 best units all belong to one passage
    assert qm.top_unique(scores, ids, 3) == ["x", "p0", "p1"]


def test_top_unique_ties_are_stable():
    assert qm.top_unique(np.zeros(5), ["e", "d", "c", "b", "a"], 2) == ["e", "d"]


def test_rank_all_and_summary():
    docs = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0, 0], [0, 0.2, 1], [0, 1, 0.5]], dtype=np.float32)
    ranked = qm.rank_all(queries, docs, ["d0", "d1", "d2"], 3, batch=2)
    assert [r[0] for r in ranked] == ["d0", "d2", "d1"]
    summary = qm.retrieval_summary(ranked, [["d0"], ["d1"], ["d2"]], kinds=["fact", "fact", "cloze"])
    assert summary["n"] == 3
    assert summary["recall@1"] == pytest.approx(1 / 3)
    assert summary["recall@5"] == 1.0
    assert summary["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert summary["per_kind"]["fact"]["n"] == 2
    assert summary["per_kind"]["cloze"]["recall@1"] == 0.0


def test_recall_and_mrr_cut_at_k():
    ranked = ["a", "b", "c", "d", "e", "f"]
    assert qm.recall_at_k(ranked, {"f"}, 5) == 0.0
    assert qm.recall_at_k(ranked, {"e"}, 5) == 1.0
    assert qm.mrr_at_k(ranked, {"c"}, 10) == pytest.approx(1 / 3)
    assert qm.first_hit_rank(ranked, {"zz"}) is None


def test_answer_summary_and_relative_change():
    s = qm.answer_summary(["Paris", "Rome"], ["Paris", "Berlin"])
    assert s == {"n": 2, "em": 0.5, "f1": 0.5}
    assert qm.answer_summary([], [])["n"] == 0
    assert qm.relative_change(2.1, 2.0) == pytest.approx(5.0)
    assert qm.relative_change(0.0, 0.0) == 0.0


def test_seeded_order_is_a_reproducible_permutation():
    a = qm.seeded_order(50, 3)
    assert sorted(a) == list(range(50))
    assert a == qm.seeded_order(50, 3)
    assert a != qm.seeded_order(50, 4)
