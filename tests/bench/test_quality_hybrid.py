"""bench/quality.py's hybrid retrieval row (issue #20 item 5): the fused rankings of hand-made OneGen and BM25
rankings, their recall@5 beside both, and the target that hybrid recall@5 reach the better of the two."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import quality  # noqa: E402
import quality_metrics as qm  # noqa: E402


def test_hybrid_rankings_fuse_dense_and_bm25():
    dense = [["a", "b", "c", "d", "e", "f"], ["p1", "p2"]]
    bm25 = [["f", "a", "g"], ["q1", "q2"]]
    # a: 1/61 + 1/62 > f: 1/66 + 1/61 > b: 1/62 > c and g: 1/63 each, c from the list given first (dense)
    fused = quality.rank_hybrid(dense, bm25, k=5)
    assert fused[0] == ["a", "f", "b", "c", "g"]
    assert fused[1] == ["p1", "q1", "p2", "q2"]  # disjoint lists interleave, dense first


def test_hybrid_row_and_its_target():
    positives = [["f"], ["g"], ["a"]]
    dense = [["a", "b", "c", "d", "e", "f"], ["a", "b", "c", "d", "e"], ["a"]]  # finds f at 6 and a
    bm25 = [["f", "x"], ["g", "y"], ["z"]]  # finds f and g at 1
    hybrid = quality.rank_hybrid(dense, bm25)
    r5 = {name: qm.retrieval_summary(r, positives)["recall@5"]
          for name, r in (("onegen", dense), ("bm25", bm25), ("hybrid", hybrid))}
    assert r5 == {"onegen": 1 / 3, "bm25": 2 / 3, "hybrid": 1.0}
    retrieval = {k: {"recall@5": v} for k, v in {**r5, "minilm": 0.0}.items()}
    hybrid_target = next(t for t in quality.core_targets(retrieval, {}, {}) if t["target"].startswith("hybrid"))
    assert hybrid_target["pass"] is True and hybrid_target["threshold"] == 2 / 3
