"""Hybrid retrieval's two rules: how the dense and BM25 rankings become one, and which text BM25 searches.

**Reciprocal-rank fusion** (Cormack, Clarke and Büttcher, SIGIR 2009). A document's fused score is the sum,
over the rankings that hold it, of ``1 / (k + rank)``, ranks counted from 1, ``k = 60``; a ranking that does
not hold the document adds nothing, and a document repeated within one ranking counts at its first rank only.
Scores themselves are ignored, so BM25's unbounded scores and the dense inner products need no common scale.
The fused order is: higher fused score first, compared exactly (as fractions, so that sums that are equal
in exact arithmetic tie whatever the float rounding), then the better best rank, then the ranking given
first (hybrid search passes dense before BM25). A ranking holds a document once, so no two documents are
still tied after that: the order depends on the rankings alone, the same on every run and every replica.
Each retriever is asked for ``fusion_depth(k)`` candidates (at least ``FUSION_DEPTH``), so that a document
ranked just outside one top k can still win on the other; the fused list is cut to ``k``. A fused hit carries
the fused score.

**What BM25 sees during one-pass generation** (``bm25_query_text``): when the model emits the query token,
the BM25 query is the last user turn followed by what the model has generated since the last passage was
inserted (all of its output so far when none was). The inserted passage itself is left out (BM25 would find
that passage again), and so are earlier turns. The dense half keeps its own query, the hidden state of the
query token.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import replace
from fractions import Fraction
from typing import TypeVar

from .retriever import RetrievalHit

RRF_K = 60  # the constant of Cormack et al.; larger flattens the difference between top and lower ranks
FUSION_DEPTH = 20  # candidates each retriever contributes at least

K = TypeVar("K", bound=Hashable)


def fusion_depth(k: int) -> int:
    """How many candidates each retriever contributes to a fused top ``k``."""
    return max(k, FUSION_DEPTH)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[K]], *, k: int = RRF_K,
                           limit: int | None = None) -> list[tuple[K, float]]:
    """Fuse rankings of keys (best first) into ``(key, fused score)`` pairs, best first, at most ``limit``."""
    if k < 1:
        raise ValueError(f"the fusion constant k must be >= 1, got {k}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fused: dict[K, Fraction] = {}
    best: dict[K, tuple[int, int]] = {}  # key -> (best rank, index of the ranking that gave it)
    for list_index, ranking in enumerate(rankings):
        seen: set[K] = set()
        for rank, key in enumerate(ranking, start=1):
            if key in seen:
                continue
            seen.add(key)
            fused[key] = fused.get(key, Fraction(0)) + Fraction(1, k + rank)
            best[key] = min(best.get(key, (rank, list_index)), (rank, list_index))
    order = sorted(fused, key=lambda key: (-fused[key], best[key]))
    return [(key, float(fused[key])) for key in order[:limit]]


def fuse_hits(rankings: Sequence[Sequence[RetrievalHit]], *, k: int = RRF_K,
              limit: int | None = None) -> list[RetrievalHit]:
    """Reciprocal-rank fusion of one query's hit lists (dense first, then BM25), documents keyed by ``doc_id``.

    Each fused hit is the first list's copy of the document with ``score`` set to its fused score.
    """
    first: dict[str, RetrievalHit] = {}
    for hits in rankings:
        for hit in hits:
            first.setdefault(hit.doc_id, hit)
    fused = reciprocal_rank_fusion([[h.doc_id for h in hits] for hits in rankings], k=k, limit=limit)
    return [replace(first[doc_id], score=score) for doc_id, score in fused]


def bm25_query_text(last_user_text: str, generated_since_passage: str) -> str:
    """The text BM25 searches when the model retrieves: the last user turn, then the output since the last
    inserted passage (a line apart; either may be empty)."""
    return "\n".join(part.strip() for part in (last_user_text, generated_since_passage) if part.strip())
