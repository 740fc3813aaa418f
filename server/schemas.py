"""Request and response bodies of the native routes (/generate, /retrieve, /info), with bounds.

``ResponseShapes`` is what a generating route says about its answer — the body it waits
for, or the server-sent events it streams — and ``GenerateShapes`` is /generate's;
``generation.Generation`` translates the engine's events into them.

Static bounds here are the hard limits of the API; the server's own (configurable)
limits — max_tokens, /retrieve batch size and k — are checked by the routes against
``ServerSettings`` and answered with 422 naming the field. Unknown fields are
rejected (a misspelt option should not be silently ignored).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from onegen_core.engine.outputs import GenerationResult, RetrievalHit, RetrievalRecord, TokenDelta

MAX_SEED = 2**63 - 1
StopString = Annotated[str, Field(min_length=1, max_length=512)]
Stop = StopString | Annotated[list[StopString], Field(max_length=16)] | None
QueryString = Annotated[str, Field(max_length=100_000)]
IndexName = Annotated[str, Field(min_length=1, max_length=64)]
RetrievalMode = Literal["dense", "hybrid"]


class _Strict(BaseModel):
    """Unknown fields and loose types (``0`` for ``false``, ``"3"`` for ``3``) are refused, as the schema says."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class RetrievalOptions(_Strict):
    enabled: bool = Field(True, description="let the model retrieve when it emits a query token")
    k: int | None = Field(None, ge=1, le=1000, description="passages per retrieval (default: the checkpoint's)")
    max_retrievals: int | None = Field(
        None, ge=0, le=1024, description="retrievals per request (default: the checkpoint's)"
    )
    return_passages: bool = Field(False, description="include the passage text in the retrieval trace")
    index: IndexName | None = Field(None, description="the named index to search (see /info; default: the "
                                    "server's default index)")
    mode: RetrievalMode | None = Field(
        None, description="dense: the model's query vector; hybrid: that and BM25 fused by reciprocal rank, BM25 "
        "searching the last user turn plus what was generated since the last inserted passage (needs the index's "
        "BM25 side index, see /info; default: the server's --retrieval-mode)")


class GenerateRequest(_Strict):
    prompt: str | None = Field(None, max_length=1_000_000, description="raw prompt (or give messages)")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=1024, description="chat messages, rendered with the chat template"
    )
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="generated tokens (passages excluded)")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off")
    stop: Stop = Field(None, description="stop strings (not included in the text); at most 16")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    logprobs: bool = Field(False, description="log-probability of each generated token")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    stream: bool = Field(False, description="server-sent events: token, retrieval, final, then [DONE]")


class Hit(BaseModel):
    doc_id: str
    score: float
    title: str | None = None
    text: str | None = None
    metadata: dict | None = None

    @classmethod
    def of(cls, h: RetrievalHit) -> Hit:
        return cls(doc_id=h.doc_id, score=float(h.score), title=h.title, text=h.text, metadata=h.metadata)


class Retrieval(BaseModel):
    """One retrieval made while generating: where, with which token, what it found."""

    query_token: str
    action: str
    output_token_index: int
    output_text_offset: int = Field(description="character offset in the output text where the query token was")
    hits: list[Hit] = Field(description="best first; in hybrid mode the fused ranking, score the fused score")
    inserted_tokens: int
    search_ms: float
    mode: RetrievalMode = Field("dense", description="how it searched (retrieval.mode)")

    @classmethod
    def of(cls, r: RetrievalRecord) -> Retrieval:
        return cls(
            query_token=r.query_token, action=r.action, output_token_index=r.output_token_index,
            output_text_offset=r.output_text_offset, hits=[Hit.of(h) for h in r.hits],
            inserted_tokens=r.inserted_tokens, search_ms=float(r.search_ms), mode=r.mode,
        )


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    retrieved_tokens: int
    total_tokens: int
    cached_tokens: int = Field(0, description="prompt tokens whose KV came from the prefix cache (not prefilled)")


class Timings(BaseModel):
    queue_s: float | None = Field(None, description="arrival to first scheduling")
    time_to_first_token_s: float | None = None
    e2e_s: float | None = Field(None, description="arrival to finish")
    inter_token_s: float | None = Field(None, description="mean time per generated token after the first")


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: str
    usage: UsageOut
    retrievals: list[Retrieval]
    logprobs: list[float] | None = None
    timings: Timings


def usage_of(result: GenerationResult) -> UsageOut:
    u = result.usage
    return UsageOut(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
        retrieved_tokens=u.retrieved_tokens, total_tokens=u.total_tokens, cached_tokens=u.cached_tokens,
    )


def timings_of(result: GenerationResult) -> Timings:
    t0 = result.arrival_time

    def since(t: float | None) -> float | None:
        return None if t is None else round(max(0.0, t - t0), 6)

    itl = None
    n = len(result.token_ids)
    if result.first_token_time is not None and result.finish_time is not None and n > 1:
        itl = round(max(0.0, result.finish_time - result.first_token_time) / (n - 1), 6)
    return Timings(
        queue_s=since(result.first_scheduled_time), time_to_first_token_s=since(result.first_token_time),
        e2e_s=since(result.finish_time), inter_token_s=itl,
    )


class ResponseShapes(ABC):
    """How a generating route answers: one body once every result is in, or SSE items as events come.

    ``index`` is the position of the event's prompt in the request. A retrieval arrives already
    as ``Retrieval``'s JSON; an item that is None is not sent; ``[DONE]`` follows the last one.
    """

    def opening(self) -> list[dict[str, Any]]:
        """Items sent before the first event."""
        return []

    @abstractmethod
    def token(self, index: int, ev: TokenDelta) -> dict[str, Any] | None: ...

    @abstractmethod
    def retrieval(self, index: int, retrieval: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def finished(self, index: int, result: GenerationResult) -> dict[str, Any]: ...

    def error(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A prompt that failed or that the server aborted: ``payload`` is the error shape of Contract 4."""
        return payload

    def closing(self, results: list[GenerationResult]) -> list[dict[str, Any]]:
        """Items sent after every prompt finished (``results`` in prompt order)."""
        return []

    @abstractmethod
    def body(self, results: list[GenerationResult]) -> BaseModel: ...


@dataclass
class GenerateShapes(ResponseShapes):
    """/generate: a ``GenerateResponse``, or the events ``token``, ``retrieval``, ``final`` (that body) and ``error``."""

    model: str
    request_id: str

    def token(self, index: int, ev: TokenDelta) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "token", "text": ev.text, "token_ids": ev.token_ids}
        if ev.logprobs is not None:
            item["logprobs"] = ev.logprobs
        return item

    def retrieval(self, index: int, retrieval: dict[str, Any]) -> dict[str, Any]:
        return {"type": "retrieval", **retrieval}

    def finished(self, index: int, result: GenerationResult) -> dict[str, Any]:
        return {"type": "final", **self.body([result]).model_dump()}

    def error(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"type": "error", **payload}

    def body(self, results: list[GenerationResult]) -> GenerateResponse:
        [r] = results
        return GenerateResponse(
            id=self.request_id, model=self.model, text=r.text, finish_reason=r.finish_reason, usage=usage_of(r),
            retrievals=[Retrieval.of(x) for x in r.retrievals], logprobs=r.logprobs, timings=timings_of(r),
        )


class RetrieveRequest(_Strict):
    queries: QueryString | Annotated[list[QueryString], Field(min_length=1)] = Field(
        description="one query or a list; each is encoded by the model (query template + query token)"
    )
    k: int = Field(5, ge=1, le=1000, description="documents per query")
    return_text: bool = Field(False, description="include document text")
    index: IndexName | None = Field(None, description="the named index to search (see /info; default: the "
                                    "server's default index)")
    mode: RetrievalMode | None = Field(
        None, description="dense: the model's query vectors; hybrid: those and BM25 over each query string, fused "
        "by reciprocal rank, scores the fused ones (needs the index's BM25 side index; default: the server's "
        "--retrieval-mode)")

    def query_list(self) -> list[str]:
        return [self.queries] if isinstance(self.queries, str) else list(self.queries)


class QueryResult(BaseModel):
    query: str
    hits: list[Hit]


class RetrieveResponse(BaseModel):
    model: str
    results: list[QueryResult]
    search_ms: float


class LiveResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: str
    detail: str | None = None


class IndexInfo(BaseModel):
    name: str = Field("default", description="what requests call it (retrieval.index, /retrieve's index)")
    path: str = Field(description="the directory the served version was read from")
    root: str | None = Field(None, description="the index directory the server was given (holds versions/)")
    version: int | None = Field(None, description="the served version (None: a plain directory)")
    loaded_at: str | None = Field(None, description="when the served version was loaded (UTC, ISO 8601)")
    type: str = Field(description="FAISS factory string")
    size: int = Field(description="documents (vectors) in the served version")
    dimension: int
    metric: str
    checkpoint_fingerprint: str
    build_time: str
    bm25: bool = Field(False, description="whether the served version has a BM25 side index (hybrid retrieval)")


class ReloadRequest(_Strict):
    index: IndexName | None = Field(None, description="the index to check (default: all of them)")


class ReloadResult(BaseModel):
    index: str
    result: Literal["reloaded", "unchanged", "failed"] = Field(
        description="reloaded: a new version is served now; unchanged: the served version is current; "
        "failed: the current version was refused (error says why) and the served one keeps serving")
    version: int | None = Field(description="the version served now (None: a plain directory)")
    previous_version: int | None = None
    documents: int | None = Field(None, description="documents in the version served now")
    error: str | None = None


class ReloadResponse(BaseModel):
    indexes: list[ReloadResult]


class InfoResponse(BaseModel):
    model: str
    version: str
    state: str
    checkpoint: str | None = None
    checkpoint_fingerprint: str | None = None
    architecture: str | None = None
    dtype: str | None = None
    device: str | None = None
    max_model_len: int | None = None
    kv_cache: dict[str, int | bool] | None = Field(None, description="block_size (tokens per KV block) and "
                                                  "prefix_caching (whether prompts reuse cached blocks)")
    limits: dict[str, int | float]
    special_tokens: dict | None = None
    retrieval_defaults: dict | None = None
    index: IndexInfo | None = Field(None, description="the default index")
    indexes: list[IndexInfo] = Field(default_factory=list, description="every served index, the default first")
    demo: bool = Field(False, description="true for the built-in random-weight demo checkpoint")
