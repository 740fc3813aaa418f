"""From an HTTP request to engine requests and back: parameters, event streams, SSE, disconnects.

``Generation`` is one HTTP request's engine requests (one per prompt) sharing one
event queue. Leaving it unfinished — the client went away, the stream was closed,
the server is draining — aborts what is still running, which frees its KV cache.
Non-streaming routes watch the connection while they wait (``until_disconnected``);
streaming routes return an ``EventStream``, which always closes its generator and
releases the request's admission ticket, however the response ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from onegen_core.outputs import EngineEvent, Finished, GenerationResult
from onegen_core.params import RetrievalParams, SamplingParams

from .errors import APIError
from .schemas import RetrievalOptions
from .state import ServerState, Ticket, new_request_id
from .worker import EngineUnavailable

log = logging.getLogger("onegen.server")
T = TypeVar("T")


def sampling_params(
    state: ServerState,
    *,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    logprobs: bool = False,
    ignore_eos: bool = False,
    default_max_tokens: int | None = None,
) -> SamplingParams:
    s = state.settings
    if max_tokens is None:
        max_tokens = default_max_tokens or s.default_max_tokens
    if max_tokens > s.max_tokens_limit:
        raise APIError(422, f"max_tokens: {max_tokens} is more than this server's limit of {s.max_tokens_limit}",
                       param="max_tokens")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stops,
                              seed=seed, logprobs=logprobs, ignore_eos=ignore_eos)
    except ValueError as e:
        raise APIError(422, str(e), param=str(e).split(" ", 1)[0]) from None


def retrieval_params(state: ServerState, options: RetrievalOptions | None, param: str = "retrieval") -> RetrievalParams:
    o = options or RetrievalOptions()
    if o.k is not None and o.k > state.settings.max_retrieve_k:
        raise APIError(422, f"{param}.k: {o.k} is more than this server's limit of {state.settings.max_retrieve_k}",
                       param=f"{param}.k")
    return RetrievalParams(enabled=o.enabled, k=o.k, max_retrievals=o.max_retrievals,
                           return_passages=o.return_passages)


class Generation:
    """The engine requests of one HTTP request, their events merged on one queue in arrival order."""

    def __init__(self, state: ServerState, request_id: str, http_request: Request | None = None):
        self.state = state
        self.request_id = request_id
        # the X-Request-Id of the HTTP request, for the logs
        self.http_request_id = getattr(http_request.state, "request_id", None) if http_request else None
        self.queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.ids: list[str] = []
        self._unfinished: set[str] = set()
        self.results: dict[str, GenerationResult] = {}

    async def add(self, *, param: str, **kwargs: Any) -> str:
        """Add one engine request; engine input errors become 422 naming ``param``."""
        rid = f"{self.request_id}-{len(self.ids)}"
        try:
            await self.state.worker.submit(rid, self.queue, **kwargs)
        except EngineUnavailable as e:
            raise APIError(503, str(e), type="service_unavailable",
                           headers={"Retry-After": str(self.state.settings.retry_after_s)}) from None
        except ValueError as e:
            kind = getattr(e, "code", None) or "invalid_request_error"
            raise APIError(422, str(e), type=kind, param=param) from None
        self.ids.append(rid)
        self._unfinished.add(rid)
        if self.state.settings.log_prompts:  # off by default: prompts stay out of the logs
            shown = {k: v for k, v in kwargs.items() if k in ("prompt", "messages", "prompt_token_ids")}
            log.info("request received", extra={"request_id": self.http_request_id, "engine_request_id": rid, **shown})
        return rid

    @property
    def finished(self) -> bool:
        return not self._unfinished

    async def events(self) -> AsyncIterator[EngineEvent]:
        while self._unfinished:
            ev = await self.queue.get()
            if isinstance(ev, Finished):
                self._unfinished.discard(ev.request_id)
                self.results[ev.request_id] = ev.result
                log_result(self.state, ev.result, self.http_request_id)
            yield ev

    async def wait(self) -> list[GenerationResult]:
        """All results, in the order the requests were added."""
        async for _ in self.events():
            pass
        return [self.results[i] for i in self.ids]

    def close(self) -> None:
        """Abort whatever has not finished (idempotent)."""
        for rid in self._unfinished:
            self.state.worker.abort(rid)
        if self._unfinished:
            log.info("aborted %d unfinished engine request(s)", len(self._unfinished),
                     extra={"request_id": self.http_request_id, "engine_request_id": self.request_id})
        self._unfinished.clear()


def log_result(state: ServerState, r: GenerationResult, http_request_id: str | None = None) -> None:
    t0 = r.arrival_time
    extra: dict[str, Any] = {
        "request_id": http_request_id, "engine_request_id": r.request_id, "finish_reason": r.finish_reason, "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens, "retrieved_tokens": r.usage.retrieved_tokens,
        "retrievals": len(r.retrievals),
        "ttft_s": round(r.first_token_time - t0, 4) if r.first_token_time is not None else None,
        "e2e_s": round(r.finish_time - t0, 4) if r.finish_time is not None else None,
    }
    if r.error:
        extra["error"] = r.error
    if state.settings.log_prompts:
        extra["output"] = r.text
    log.info("request finished", extra=extra)


def finish_error(r: GenerationResult) -> tuple[int, str, str] | None:
    """The HTTP error a result that did not complete stands for, as (status, message, type); None if it did.

    ``error``: the engine failed it (500). ``abort``: the server itself aborted it while the client
    was still there (the drain timeout expired, or the server is stopping): 503. Requests aborted
    because their client went away never reach a response.
    """
    if r.finish_reason == "error":
        return 500, r.error or "the engine failed this request", "engine_error"
    if r.finish_reason == "abort":
        return 503, r.error or "the request was aborted: the server is shutting down", "service_unavailable"
    return None


def check_finished_ok(results: list[GenerationResult]) -> None:
    for r in results:
        err = finish_error(r)
        if err is not None:
            status, message, kind = err
            raise APIError(status, message, type=kind)


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then it is cancelled: ClientDisconnected)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # this request's task is cancelled (shutdown): so is its work, not orphaned
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that always closes its generator and runs ``on_close``.

    Starlette stops iterating when the client disconnects (or sending fails); closing
    the generator then runs its ``finally`` blocks, which abort the engine requests.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str] | None = None):
        super().__init__(
            content, media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._on_close()


async def admit_generation(
    state: ServerState, request: Request, id_prefix: str, inputs: list[dict[str, Any]],
    sampling: SamplingParams, retrieval: RetrievalParams,
) -> tuple[Generation, Ticket]:
    """Admit one HTTP request (429 when full) and add each input (``prompt=`` / ``messages=`` /
    ``prompt_token_ids=`` plus ``param=``) as an engine request; on any failure undo both."""
    ticket = state.admit()
    gen = Generation(state, new_request_id(id_prefix), request)
    try:
        for kw in inputs:
            await gen.add(**kw, sampling=sampling, retrieval=retrieval)
    except BaseException:
        gen.close()
        ticket.release()
        raise
    return gen, ticket


def stream_generation(gen: Generation, ticket: Ticket, chunks: AsyncIterator[bytes]) -> EventStream:
    """SSE response over ``chunks``; when it ends or the client goes, unfinished requests are aborted."""

    def on_close() -> None:
        gen.close()
        ticket.release()

    return EventStream(chunks, on_close)


async def wait_generation(request: Request, gen: Generation, ticket: Ticket) -> list[GenerationResult] | None:
    """All results in order, or None when the client disconnected first (its requests are aborted)."""
    try:
        results = await until_disconnected(request, gen.wait())
    except ClientDisconnected:
        return None
    finally:
        gen.close()
        ticket.release()
    check_finished_ok(results)
    return results
