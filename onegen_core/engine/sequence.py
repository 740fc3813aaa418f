"""Per-request state. The scheduler and the model runner read these fields and keep none of their own.

``token_ids`` is the whole sequence as the model sees it: prompt, generated tokens,
and inserted passages, each token with its role. ``num_cached_tokens`` counts the
tokens whose K/V are in the cache; everything after it is scheduled next (a decode
token, a prompt chunk, or an inserted passage as an *extend*). At admission it starts
after the blocks found in the prefix cache (``kv_cache.py``): ``block_hashes`` holds the
chained hashes of the sequence's full blocks, and ``num_cached_prompt_tokens`` how many
prompt tokens its first admission found cached (its ``Usage.cached_tokens``).

A query to encode (``/retrieve``) is a ``Sequence`` too, with ``search`` set: it is
prefilled in chunks like a prompt, under the same token budget as everything else,
and once its last token (the query RET token) has run, its hidden state is the query
vector and it finishes without sampling. ``SearchRequest`` gathers the vectors of one
request's queries and is searched when the last arrives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..formats.roles import Role
from ..retrieval.fusion import bm25_query_text
from ..text.detokenizer import IncrementalDetokenizer
from .outputs import FinishReason, GenerationResult, RetrievalRecord, Usage
from .params import RetrievalParams, SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SearchRequest:
    """Queries encoded by the scheduler, then searched together (``Engine.add_search``)."""

    request_id: str
    k: int  # 0: return the vectors only, no search
    return_text: bool
    vectors: list[torch.Tensor | None]  # one [d] float32 unit vector per query, as they complete
    index: str | None = None  # the named index searched (resolved by the engine: None only when there is none)
    bm25_texts: list[str] | None = None  # hybrid: each query's BM25 text (its string); None: dense
    sequences: list[Sequence] = field(default_factory=list)  # one per query, in order
    next_query: int = 0  # sequences[:next_query] have been handed to the scheduler
    queued_tokens: int = 0  # tokens of those not encoded yet
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def complete(self) -> bool:
        return all(v is not None for v in self.vectors)


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    roles: list[Role]
    sampling: SamplingParams
    retrieval: RetrievalParams  # k / max_retrievals / index / mode resolved against the engine's defaults
    detok: IncrementalDetokenizer | None  # None for a query encode
    generator: torch.Generator | None = None  # per-request RNG when a seed is given
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, in order (kv_cache.block_hash)
    num_cached_prompt_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    output_ids: list[int] = field(default_factory=list)  # generated tokens (query RET tokens included)
    logprobs: list[float] | None = None
    num_retrieved_tokens: int = 0
    pending_query: int | None = None  # sampled query token id awaiting its forward + search
    forced_next: int | None = None  # token to append instead of sampling (annotate follow-up)
    trace: list[RetrievalRecord] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    search: SearchRequest | None = None  # set for a query encode: this sequence's last hidden state is a vector
    search_slot: int = 0  # which of ``search``'s queries
    user_text: str = ""  # the last user turn (or the raw prompt): what a hybrid retrieval's BM25 query starts with

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        if self.sampling.logprobs:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncached(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def num_retrievals(self) -> int:
        return len(self.trace)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append(self, ids: list[int], role: Role) -> None:
        self.token_ids.extend(ids)
        self.roles.extend([role] * len(ids))

    def bm25_query(self) -> str:
        """The text BM25 searches at this query token in hybrid mode (``fusion.bm25_query_text``): the last user
        turn, then the output since the last inserted passage (the whole output when none was)."""
        since = max((r.output_text_offset for r in self.trace if r.inserted_tokens), default=0)
        return bm25_query_text(self.user_text, self.detok.text[since:] if self.detok is not None else "")

    def may_retrieve(self) -> bool:
        return self.retrieval.enabled and self.num_retrievals < (self.retrieval.max_retrievals or 0)

    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, len(self.output_ids), self.num_retrieved_tokens,
                     cached_tokens=self.num_cached_prompt_tokens)

    def result(self) -> GenerationResult:
        return GenerationResult(
            request_id=self.request_id,
            text=self.detok.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason or "abort",
            usage=self.usage(),
            retrievals=list(self.trace),
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            error=self.error,
            arrival_time=self.arrival_time,
            first_scheduled_time=self.first_scheduled_time,
            first_token_time=self.first_token_time,
            finish_time=self.finish_time,
        )
