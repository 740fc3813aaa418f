"""One generating HTTP request, from admission to its last byte: ``Generation``.

A route's request takes one straight line: ``ServerState.admit`` hands out a ``Generation``
(or answers 503 / 429), ``begin`` adds its engine requests (one per prompt, their events
merged on one queue), and ``respond`` answers: a JSON body once every result is in, or
server-sent events as they come; a client that leaves before its body is ready gets 499.
The route says only what its answer looks like (``schemas.ResponseShapes``); the
translation of engine events (token, retrieval, finished) into those shapes is here, once.

The Generation holds its admission for exactly its own lifetime: ``close`` — when the
body is ready, the stream ends or its client goes, the submission fails — aborts what is
still running in the engine (which frees its KV cache) and gives the place back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from onegen_core.engine.outputs import EngineEvent, Finished, GenerationResult, RetrievalEvent, TokenDelta
from onegen_core.engine.params import RetrievalParams, SamplingParams

from .errors import APIError, error_payload
from .schemas import ResponseShapes, Retrieval
from .settings import ServerSettings
from .worker import EngineUnavailable, EngineWorker

log = logging.getLogger("onegen.server")
T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"


class Generation:
    """The engine requests of one admitted HTTP request, their events merged on one queue in arrival order."""

    def __init__(self, worker: EngineWorker, settings: ServerSettings, http_request: Request, id_prefix: str,
                 release: Callable[[], None]):
        self.worker = worker
        self.settings = settings
        self.http_request = http_request
        self.request_id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        self.http_request_id: str | None = getattr(http_request.state, "request_id", None)  # X-Request-Id, for logs
        self._queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._ids: list[str] = []
        self._results: dict[str, GenerationResult] = {}
        self._unfinished: set[str] = set()
        self._release: Callable[[], None] | None = release  # gives the admission back; None once it has

    # ------------------------------------------------------------------ admit -> begin
    async def begin(self, inputs: list[dict[str, Any]], sampling: SamplingParams, retrieval: RetrievalParams) -> None:
        """Add each input (``prompt=`` / ``messages=`` / ``prompt_token_ids=`` plus ``param=``, the field that
        a 422 names) as an engine request; on any failure close this generation and raise."""
        try:
            for kw in inputs:
                await self._add_engine_request(**kw, sampling=sampling, retrieval=retrieval)
        except BaseException:
            self.close()
            raise

    async def _add_engine_request(self, *, param: str, **kwargs: Any) -> None:
        rid = f"{self.request_id}-{len(self._ids)}"
        try:
            await self.worker.submit(rid, self._queue, **kwargs)
        except EngineUnavailable as e:
            raise APIError(503, str(e), type="service_unavailable",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except ValueError as e:
            raise APIError(422, str(e), type=getattr(e, "code", None) or "invalid_request_error", param=param) from None
        self._ids.append(rid)
        self._unfinished.add(rid)
        if self.settings.log_prompts:  # off by default: prompts stay out of the logs
            shown = {k: v for k, v in kwargs.items() if k in ("prompt", "messages", "prompt_token_ids")}
            log.info("request received", extra={"request_id": self.http_request_id, "engine_request_id": rid, **shown})

    # ------------------------------------------------------------------ stream or wait -> respond
    async def respond(self, shapes: ResponseShapes, *, stream: bool) -> Any:
        """The answer: SSE in ``shapes`` as events come, or the body once all results are in (a 500 if one failed
        or was aborted by the server, ``finish_error``); 499 when the client disconnected first. Closes this
        generation."""
        if stream:
            return EventStream(self._sse(shapes), on_close=self.close)
        try:
            results = await until_disconnected(self.http_request, self._wait())
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            self.close()
        for r in results:
            if (err := finish_error(r)) is not None:
                status, message, kind = err
                raise APIError(status, message, type=kind)
        return shapes.body(results)

    async def _sse(self, shapes: ResponseShapes) -> AsyncIterator[bytes]:
        async for item in self._items(shapes):
            yield b"data: " + json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
        yield SSE_DONE

    async def _items(self, shapes: ResponseShapes) -> AsyncIterator[dict[str, Any]]:
        """The one translation of engine events (token, retrieval, finished) into a route's SSE items."""
        for item in shapes.opening():
            yield item
        index = {rid: i for i, rid in enumerate(self._ids)}
        async for ev in self._events():
            i = index[ev.request_id]
            out: dict[str, Any] | None = None
            if isinstance(ev, TokenDelta):
                out = shapes.token(i, ev)
            elif isinstance(ev, RetrievalEvent):
                out = shapes.retrieval(i, Retrieval.of(ev.record).model_dump())
            elif isinstance(ev, Finished):
                err = finish_error(ev.result)
                out = shapes.error(error_payload(*err)) if err else shapes.finished(i, ev.result)
            if out is not None:
                yield out
        for item in shapes.closing([self._results[rid] for rid in self._ids]):
            yield item

    async def _events(self) -> AsyncIterator[EngineEvent]:
        while self._unfinished:
            ev = await self._queue.get()
            if isinstance(ev, Finished):
                self._unfinished.discard(ev.request_id)
                self._results[ev.request_id] = ev.result
                self._log_result(ev.result)
            yield ev

    async def _wait(self) -> list[GenerationResult]:
        """All results, in the order the requests were added."""
        async for _ in self._events():
            pass
        return [self._results[i] for i in self._ids]

    def close(self) -> None:
        """Abort whatever has not finished and give the admission back (idempotent)."""
        for rid in self._unfinished:
            self.worker.abort(rid)
        if self._unfinished:
            log.info("aborted %d unfinished engine request(s)", len(self._unfinished),
                     extra={"request_id": self.http_request_id, "engine_request_id": self.request_id})
        self._unfinished.clear()
        if self._release is not None:
            self._release, release = None, self._release
            release()

    def _log_result(self, r: GenerationResult) -> None:
        t0 = r.arrival_time
        extra: dict[str, Any] = {
            "request_id": self.http_request_id, "engine_request_id": r.request_id, "finish_reason": r.finish_reason,
            "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
            "retrieved_tokens": r.usage.retrieved_tokens, "retrievals": len(r.retrievals),
            "ttft_s": round(r.first_token_time - t0, 4) if r.first_token_time is not None else None,
            "e2e_s": round(r.finish_time - t0, 4) if r.finish_time is not None else None,
        }
        if r.error:
            extra["error"] = r.error
        if self.settings.log_prompts:
            extra["output"] = r.text
        log.info("request finished", extra=extra)


def finish_error(r: GenerationResult) -> tuple[int, str, str] | None:
    """The HTTP error a result that did not complete stands for, as (status, message, type); None if it did.

    ``error``: the engine failed it (500, ``engine_error``). ``abort``: the server itself aborted it while
    the client was still there (the drain timeout expired, or the server is stopping): 500,
    ``server_shutdown``. Not 503: a 503 says the request was refused before any work (loading, draining),
    which a load balancer may safely run again on another replica, and nginx does
    (``deploy/nginx/onegen.conf``); this one was admitted and has run, so a retry by the proxy would do its
    work twice (a client may still retry it). Requests aborted because their client went away never
    reach a response.
    """
    if r.finish_reason == "error":
        return 500, r.error or "the engine failed this request", "engine_error"
    if r.finish_reason == "abort":
        return 500, r.error or "the request was aborted: the server is shutting down", "server_shutdown"
    return None


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


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that always closes its generator and runs ``on_close``.

    Starlette stops iterating when the client disconnects (or sending fails); closing
    the generator then runs its ``finally`` blocks, and ``on_close`` aborts the engine requests.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._on_close()
