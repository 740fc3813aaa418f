"""Blocking calls for scripts, benchmarks and tests: queue work, step until it is done, return the results.

``Engine`` takes these from ``BlockingCalls``. They use nothing but the engine's
stepping API — ``add_request`` / ``add_search`` to queue, ``step()`` to advance, the
``Finished`` / ``SearchDone`` events it returns — so they behave exactly as a server
that steps the engine would, and other requests in the engine advance meanwhile. A
server never calls them: its worker thread steps the engine itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .inputs import RequestInput
from .outputs import Finished, GenerationResult, RetrievalHit, SearchDone
from .params import RetrievalParams, SamplingParams

if TYPE_CHECKING:
    from ..retrieval.retriever import Retriever


class BlockingCalls:
    """Mixed into ``Engine``, whose ``add_request``, ``add_search``, ``step`` and ``retriever`` these use."""

    retriever: Retriever | None

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        retrieval: RetrievalParams | None = None,
        *,
        messages: list[list[dict[str, str]]] | None = None,
    ) -> list[GenerationResult]:
        """Generate for each prompt (then each chat of ``messages``); results in input order. ``sampling``: one
        for all, or one per input."""
        if isinstance(prompts, str):
            prompts = [prompts]
        inputs = [RequestInput(prompt=p) for p in prompts or []] + [RequestInput(messages=m) for m in messages or []]
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(inputs)
        ids = [self.add_request(given, sampling=sp, retrieval=retrieval)
               for given, sp in zip(inputs, params, strict=True)]
        results: dict[str, GenerationResult] = {}
        while len(results) < len(ids):
            for ev in self.step():
                if isinstance(ev, Finished):
                    results[ev.request_id] = ev.result
        return [results[i] for i in ids]

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        """Queries -> [n, d] float32 unit vectors, encoded by the scheduler exactly as ``/retrieve`` does."""
        return self._run_search(list(queries), 0, False).vectors

    def search(self, queries: list[str], k: int, return_text: bool = False) -> list[list[RetrievalHit]]:
        """Encode queries with the model (query template + query RET token) and search the index."""
        if self.retriever is None:
            raise ValueError("no index is loaded: start the engine with an index directory")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self._run_search(list(queries), k, return_text).hits

    def _run_search(self, queries: list[str], k: int, return_text: bool) -> SearchDone:
        """Queue a search and step until it is done."""
        rid = self.add_search(queries, k=k, return_text=return_text)
        while True:
            for ev in self.step():
                if isinstance(ev, SearchDone) and ev.request_id == rid:
                    if ev.error is not None:
                        raise RuntimeError(ev.error)
                    return ev
