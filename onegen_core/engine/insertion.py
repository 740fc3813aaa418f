"""Retrieval inside the decode loop: search with a step's query vectors, then insert or annotate.

Every sequence that reached a query RET token in the same step is searched at once (one
batched dense search per index; ``retrieval.hybrid.search``, which also runs BM25 and fuses for
the sequences in hybrid mode, with ``Sequence.bm25_query`` as their text). An ``insert`` token gets the passages that fit the
context, rendered ``open + passage + close`` and appended as CTX: the scheduler prefills
them next as an *extend*, and sampling resumes after the last one. An ``annotate`` token
records its hits and inserts nothing, optionally forcing a follow-up token. Each
retrieval goes on the sequence's trace and comes back as a ``RetrievalEvent``.

Nothing here touches the scheduler. What ends a sequence is set on it — ``finish_reason``
``"length"`` when no passage fits the context, ``"error"`` (with ``error``) when the
search failed — and the engine finishes it.
"""

from __future__ import annotations

import logging
import time

import torch

from ..formats.checkpoint import SpecialTokenIds
from ..formats.roles import Role
from ..retrieval import hybrid
from ..retrieval.bm25 import BM25UnavailableError
from ..retrieval.registry import LoadedIndex
from ..text.rendering import Renderer
from .outputs import RetrievalEvent, RetrievalHit, RetrievalRecord
from .sequence import Sequence

log = logging.getLogger(__name__)


class PassageInserter:
    def __init__(self, renderer: Renderer, token_ids: SpecialTokenIds, max_model_len: int):
        self.renderer = renderer
        self.token_ids = token_ids
        self.max_model_len = max_model_len

    def retrieve(self, seqs: list[Sequence], queries: torch.Tensor, index: LoadedIndex | None
                 ) -> list[RetrievalEvent]:
        """Search ``index`` with each sequence's query vector ([n, d], the normalised final-layer hidden state at
        its query token), batched, in each sequence's mode, and insert or annotate what was found. A failed
        search (FAISS, a corrupt docstore row, a hybrid search of a version without BM25) fails its batch only:
        those sequences end with ``finish_reason="error"``."""
        if not seqs:
            return []
        assert index is not None
        if index.bm25 is None and any(s.retrieval.mode == "hybrid" for s in seqs):
            # the version swapped in since these were admitted has no BM25 side index: fail them, not the rest
            keep = [i for i, s in enumerate(seqs) if s.retrieval.mode != "hybrid"]
            self._fail([s for s in seqs if s.retrieval.mode == "hybrid"], BM25UnavailableError(index.no_bm25_message()))
            seqs, queries = [seqs[i] for i in keep], queries[torch.tensor(keep, dtype=torch.long)]
            if not seqs:
                return []
        texts = [s.bm25_query() if s.retrieval.mode == "hybrid" else None for s in seqs]
        t0 = time.perf_counter()
        try:
            all_hits = hybrid.search(index, queries, [s.retrieval.k for s in seqs], texts)
        except Exception as e:  # noqa: BLE001 - a failed search fails its batch, never the engine
            self._fail(seqs, e)
            return []
        search_ms = (time.perf_counter() - t0) * 1000.0
        return [RetrievalEvent(seq.request_id, self._apply(seq, hits, search_ms, text))
                for seq, hits, text in zip(seqs, all_hits, texts, strict=True)]

    def _apply(self, seq: Sequence, hits: list[RetrievalHit], search_ms: float, bm25_query: str | None
               ) -> RetrievalRecord:
        """Insert (or annotate) one sequence's hits at its pending query token and record the retrieval."""
        qid = seq.pending_query
        qdef = self.token_ids.query[qid]
        seq.pending_query = None
        record = RetrievalRecord(
            query_token=qdef.token, action=qdef.action, output_token_index=len(seq.output_ids) - 1,
            output_text_offset=len(seq.detok.text), search_ms=search_ms,
            mode=seq.retrieval.mode or "dense", bm25_query=bm25_query,
        )
        if qdef.action == "insert":
            inserted: list[int] = []
            kept: list[RetrievalHit] = []
            room = self.max_model_len - seq.num_tokens - 1  # leave room to generate at least one token
            for h in hits:
                ids = self.renderer.passage(h.text or "", h.title)
                if len(inserted) + len(ids) > room:
                    break
                inserted.extend(ids)
                kept.append(h)
            if hits and not kept:
                seq.finish_reason = "length"  # no passage fits the remaining context
            seq.append(inserted, Role.CTX)
            seq.num_retrieved_tokens += len(inserted)
            record.inserted_tokens = len(inserted)
            hits = kept
        elif qid in self.token_ids.follow_up:
            seq.forced_next = self.token_ids.follow_up[qid]
        record.hits = [
            RetrievalHit(h.doc_id, h.score, h.vector_id, h.title,
                         h.text if seq.retrieval.return_passages else None, h.metadata)
            for h in hits
        ]
        seq.trace.append(record)
        return record

    def _fail(self, seqs: list[Sequence], error: Exception) -> None:
        """End every sequence of a failed search with ``finish_reason="error"``; ``GenerationResult.error`` says
        what failed, for the server to report."""
        ids = [s.request_id for s in seqs]
        log.error("retrieval failed for %d request(s) %s: %s: %s", len(seqs), ids, type(error).__name__, error,
                  exc_info=error)
        for seq in seqs:
            seq.pending_query = None
            seq.error = f"retrieval failed: {type(error).__name__}: {error}"
            seq.finish_reason = "error"
