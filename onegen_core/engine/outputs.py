"""What the engine hands back: per-request events and the final result.

``Engine.step()`` returns a list of events; a server routes them by ``request_id``
to per-request queues. Order per request: ``TokenDelta`` / ``RetrievalEvent`` as they
happen, then exactly one ``Finished``. A search request (``Engine.add_search``: queries
encoded by the scheduler, then searched) ends with exactly one ``SearchDone``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..retrieval.retriever import RetrievalHit  # what a search returns, defined with the retrievers

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class RetrievalRecord:
    """One retrieval of a request: where it happened and what it found."""

    query_token: str
    action: str  # "insert" | "annotate"
    output_token_index: int  # index of the query token among the request's generated tokens
    output_text_offset: int  # character offset in the output text where the query token was emitted
    hits: list[RetrievalHit] = field(default_factory=list)
    inserted_tokens: int = 0
    search_ms: float = 0.0
    mode: str = "dense"  # "hybrid": hits are the dense and BM25 rankings fused, scores the fused ones
    bm25_query: str | None = None  # the text BM25 searched (hybrid only)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated tokens (query RET tokens included)
    retrieved_tokens: int = 0  # inserted passage tokens
    cached_tokens: int = 0  # of prompt_tokens, those whose K/V came from the prefix cache instead of a prefill

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens + self.retrieved_tokens


@dataclass
class TokenDelta:
    request_id: str
    token_ids: list[int]
    text: str  # text newly decodable (may be empty while a multi-byte character is incomplete)
    logprobs: list[float] | None = None


@dataclass
class RetrievalEvent:
    request_id: str
    record: RetrievalRecord


@dataclass
class Finished:
    request_id: str
    reason: FinishReason
    result: GenerationResult


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]  # generated tokens (no inserted passages)
    finish_reason: FinishReason
    usage: Usage
    retrievals: list[RetrievalRecord]
    logprobs: list[float] | None = None
    error: str | None = None
    # timings (seconds, monotonic clock)
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass
class SearchDone:
    """The end of a search request: hits per query (or only vectors), or the error that failed it."""

    request_id: str
    hits: list[list[RetrievalHit]] | None = None  # None when only vectors were asked for, or on error
    vectors: Any = None  # [n, d] float32 numpy array of the query vectors, in the request's order
    error: str | None = None
    encode_ms: float = 0.0  # from the request's arrival to its last query vector
    search_ms: float = 0.0


EngineEvent = TokenDelta | RetrievalEvent | Finished | SearchDone
