"""Search jobs (``/retrieve``): queries encoded by the scheduler, then searched together.

A job's queries are ``Sequence``s with ``search`` set. They are handed to the scheduler
about one step's token budget at a time, so a big job keeps the engine busy when it is
alone yet takes its turn with the requests that arrive after it (they are queued between
its queries) instead of holding the waiting queue for all of them. Each query's last
hidden state comes back as its vector; when a job's last vector arrives the job is
searched and ends with exactly one ``SearchDone``. A hybrid job (``mode`` hybrid) is searched by
``retrieval.hybrid.search`` with each query string as its BM25 text.

``SearchJobs`` keeps the bookkeeping and never touches the scheduler: each call returns
what the engine must do — the query sequences to queue, the sequences to free, the
``SearchDone`` events to report — and the engine does it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from ..formats.roles import Role
from ..retrieval import hybrid
from ..retrieval.registry import LoadedIndex
from .outputs import SearchDone
from .params import RetrievalParams, SamplingParams
from .sequence import SearchRequest, Sequence

log = logging.getLogger(__name__)


class SearchJobs:
    def __init__(self, step_budget: int, dim: int):
        self.step_budget = step_budget  # tokens of queries queued at a time (the scheduler's step budget)
        self.dim = dim
        self.jobs: dict[str, SearchRequest] = {}
        self.ended: list[SearchDone] = []  # jobs that ended outside a step (empty, aborted): the next step reports them

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def start(self, request_id: str, query_token_ids: list[list[int]], k: int, return_text: bool,
              index: str | None = None, bm25_texts: list[str] | None = None) -> list[Sequence]:
        """Open a job searching the named ``index`` (hybrid when ``bm25_texts``, one per query, are given) -> the
        query sequences to schedule now (the others follow as these are encoded)."""
        job = SearchRequest(request_id, k, return_text, [None] * len(query_token_ids), index=index,
                            bm25_texts=bm25_texts)
        self.jobs[request_id] = job
        if not query_token_ids:
            self.ended.append(self._done(job))
            return []
        no_sampling, no_retrieval = SamplingParams(max_tokens=1), RetrievalParams(enabled=False)
        for i, ids in enumerate(query_token_ids):
            job.sequences.append(Sequence(
                request_id=f"{request_id}/q{i}", token_ids=list(ids), roles=[Role.CTX] * len(ids),
                sampling=no_sampling, retrieval=no_retrieval, detok=None, search=job, search_slot=i))
        return self._feed(job)

    def store(self, seqs: list[Sequence], vectors: torch.Tensor, index_for: Callable[[str | None], LoadedIndex | None]
              ) -> tuple[list[SearchDone], list[Sequence]]:
        """Vectors of encoded queries ([n, d] float32 unit vectors on the host, one per sequence of ``seqs``)
        -> (the ``SearchDone`` of each job this completes, searched in ``index_for(job.index)``: the
        version served when its last vector arrives; the next queries to schedule)."""
        done: list[SearchDone] = []
        to_schedule: list[Sequence] = []
        for seq, vec in zip(seqs, vectors, strict=True):
            job = seq.search
            if job is None or job.request_id not in self.jobs:  # aborted meanwhile
                continue
            job.vectors[seq.search_slot] = vec
            job.queued_tokens -= seq.num_tokens
            if job.complete:
                done.append(self._done(job, index=index_for(job.index)))
            else:
                to_schedule += self._feed(job)
        return done, to_schedule

    def abort(self, request_id: str, error: str) -> list[Sequence]:
        """End a job with ``error`` (reported by the next step) -> its query sequences to free."""
        job = self.jobs[request_id]
        self.ended.append(self._done(job, error=error))
        return [seq for seq in job.sequences if not seq.is_finished]

    def take_ended(self) -> list[SearchDone]:
        ended, self.ended = self.ended, []
        return ended

    def _feed(self, job: SearchRequest) -> list[Sequence]:
        """The job's next queries: about one step's token budget of them, counting those queued and not encoded."""
        out: list[Sequence] = []
        while job.next_query < len(job.sequences):
            seq = job.sequences[job.next_query]
            if job.queued_tokens and job.queued_tokens + seq.num_tokens > self.step_budget:
                break
            job.next_query += 1
            job.queued_tokens += seq.num_tokens
            out.append(seq)
        return out

    def _done(self, job: SearchRequest, error: str | None = None, index: LoadedIndex | None = None) -> SearchDone:
        """Close a job: search its vectors (unless it asked for the vectors only, or failed)."""
        self.jobs.pop(job.request_id, None)
        encode_ms = (time.monotonic() - job.arrival_time) * 1000.0
        if error is not None:
            return SearchDone(job.request_id, error=error, encode_ms=encode_ms)
        vectors = torch.stack(job.vectors).numpy() if job.vectors else np.zeros((0, self.dim), dtype=np.float32)
        if job.k == 0 or not job.vectors:
            return SearchDone(job.request_id, hits=[] if job.k else None, vectors=vectors, encode_ms=encode_ms)
        t0 = time.perf_counter()
        try:
            n = len(vectors)
            hits = hybrid.search(index, vectors, [job.k] * n, job.bm25_texts or [None] * n)
        except Exception as e:  # noqa: BLE001 - a failed search fails its request, never the engine
            log.error("search failed for request %s: %s: %s", job.request_id, type(e).__name__, e, exc_info=e)
            return SearchDone(job.request_id, error=f"retrieval failed: {type(e).__name__}: {e}", encode_ms=encode_ms)
        if not job.return_text:
            for row in hits:
                for h in row:
                    h.text = None
        return SearchDone(job.request_id, hits=hits, vectors=vectors, encode_ms=encode_ms,
                          search_ms=(time.perf_counter() - t0) * 1000.0)
