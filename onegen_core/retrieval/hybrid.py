"""A search of one named index in either retrieval mode: what the engine runs at query tokens and for ``/retrieve``.

A request retrieves in one of two modes (``RetrievalParams.mode``, the engine's default
``EngineConfig.retrieval_mode``):

* ``dense`` — the query vector (the normalised hidden state at the query token) against the index's
  vectors, top k: what OneGen does and what the engine always did.
* ``hybrid`` — the same dense search taken ``fusion_depth(k)`` deep, BM25 over the query's *text* as deep
  (the index's BM25 side index, ``bm25.py``), and the two rankings fused by reciprocal rank down to k
  (``fusion.fuse_hits``: dense first, so ties go to it). ``fusion.py`` states the rule and the text BM25
  searches: at a query token while generating, the last user turn plus the output since the last
  inserted passage (``Sequence.bm25_query``); for ``/retrieve``, the query string itself. A hit carries the
  fused score.

``search`` takes one batch of rows that may mix both modes and different k: the dense half is one batched
search as deep as the deepest row needs, each row keeping its own top (the engine batched rows of different
k this way before hybrid retrieval existed), and the BM25 half one call over the hybrid rows' texts. Both
come from the same ``LoadedIndex``, one version of the index, so a reload can never fuse one version's
dense hits with another's BM25 hits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .fusion import fuse_hits, fusion_depth
from .registry import LoadedIndex
from .retriever import RetrievalHit


def search(entry: LoadedIndex, vectors: torch.Tensor | np.ndarray, ks: Sequence[int],
           bm25_texts: Sequence[str | None]) -> list[list[RetrievalHit]]:
    """Row ``i``: the top ``ks[i]`` hits for ``vectors[i]`` ([n, d] unit vectors), dense when ``bm25_texts[i]``
    is None, else hybrid with BM25 searching ``bm25_texts[i]``. ``BM25UnavailableError`` when a row is hybrid
    and the index has no BM25 side index."""
    if not len(ks) == len(bm25_texts) == len(vectors):
        raise ValueError(f"{len(vectors)} query vectors, {len(ks)} k and {len(bm25_texts)} BM25 texts")
    if not len(ks):
        return []
    hybrid_rows = [i for i, text in enumerate(bm25_texts) if text is not None]
    lexical = entry.require_bm25() if hybrid_rows else None
    depth = max(fusion_depth(k) if text is not None else k for k, text in zip(ks, bm25_texts, strict=True))
    dense = entry.retriever.search(vectors, depth)
    if len(dense) != len(ks):
        raise RuntimeError(f"the retriever returned {len(dense)} hit lists for {len(ks)} queries")
    out = [hits[:k] for hits, k in zip(dense, ks, strict=True)]
    if lexical is not None:
        bm25_depth = max(fusion_depth(ks[i]) for i in hybrid_rows)
        bm25_hits = lexical.search([bm25_texts[i] for i in hybrid_rows], bm25_depth)
        for i, hits in zip(hybrid_rows, bm25_hits, strict=True):
            d = fusion_depth(ks[i])  # each ranking contributes this row's depth, whatever the batch's
            out[i] = fuse_hits([dense[i][:d], hits[:d]], limit=ks[i])
    return out
