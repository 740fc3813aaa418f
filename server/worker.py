"""The engine's own thread: it builds the engine, steps it, and routes events to asyncio queues.

The ``Engine`` is not thread-safe, so exactly one thread steps it: this one. The
event loop talks to it through a command queue (add / abort / abort all / search / swap an
index version in / stop) and
gets events back on per-request ``asyncio.Queue``s, delivered with one
``loop.call_soon_threadsafe`` per engine step. Model work never runs on the event loop.

Nothing slow runs on the engine thread outside a step: a request's input is tokenised
and checked (``Engine.prepare_request`` / ``prepare_queries``) on a separate tokenizer
thread before its command is queued, so a huge prompt costs that thread, not the
running streams, and is refused there. ``/retrieve`` queries are encoded by the
scheduler inside the steps (``Engine.add_search``), chunked under the same token budget
as prompts, so no search holds a step longer than a prefill chunk would.

The thread also feeds the Prometheus counters (so aborted requests are counted),
keeps a snapshot of ``engine.stats()`` for scrapes, and beats a heartbeat that
``/health/ready`` reads to notice an engine loop that has stopped making progress.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from onegen_core.engine.outputs import (
    EngineEvent,
    Finished,
    GenerationResult,
    RetrievalEvent,
    RetrievalHit,
    SearchDone,
    TokenDelta,
    Usage,
)

from .metrics import Metrics

log = logging.getLogger("onegen.server")

WorkerState = Literal["loading", "ready", "failed", "stopped"]
_IDLE_WAIT_S = 0.25  # how long an idle worker blocks on the command queue before beating the heartbeat


class EngineUnavailable(RuntimeError):
    """The engine is loading, has failed, or has been stopped; the message says which."""


class SearchFailed(RuntimeError):
    """The index search of a ``/retrieve`` request failed (the engine goes on serving)."""


class SearchAborted(RuntimeError):
    """The server aborted a ``/retrieve`` search it had accepted (its drain timeout expired, or it is stopping)."""


@dataclass
class _Add:
    request_id: str
    kwargs: dict[str, Any]
    events: asyncio.Queue
    accepted: concurrent.futures.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    """Abort every active request; their ``Finished(abort)`` results carry ``message`` as their error."""

    message: str


@dataclass
class _Search:
    request_id: str
    query_token_ids: list[list[int]]
    k: int
    return_text: bool
    done: concurrent.futures.Future
    index: str | None = None
    queries: list[str] | None = None  # the strings, which a hybrid search's BM25 half searches
    mode: str | None = None


@dataclass
class _SwapIndex:
    """Serve a loaded index version from the next step on (``Engine.swap_index``); ``done`` gets the replaced one."""

    entry: Any  # onegen_core.retrieval.registry.LoadedIndex
    done: concurrent.futures.Future


@dataclass
class _Stop:
    pass


@dataclass
class _Active:
    """Worker-side state of one request: where its events go and what metrics need."""

    events: asyncio.Queue
    last_token_time: float | None = None
    tokens_counted: int = 0
    pending: list[EngineEvent] = field(default_factory=list)


class EngineWorker:
    def __init__(
        self,
        factory: Callable[[], Any],
        metrics: Metrics,
        *,
        stall_timeout_s: float = 60.0,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        self._factory = factory
        self._metrics = metrics
        self._stall_timeout_s = stall_timeout_s
        self._on_fatal = on_fatal
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, _Active] = {}
        self._abort_messages: dict[str, str] = {}  # request id -> why the server aborted it (worker thread only)
        self._searches: dict[str, concurrent.futures.Future] = {}  # search request id -> its caller (worker thread)
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="onegen-tokenize")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats: dict[str, Any] = {}
        self._heartbeat = time.monotonic()
        self._state_lock = threading.Lock()  # a command is queued only while the state is "ready"
        self.state: WorkerState = "loading"
        self.engine: Any = None  # set once loaded; only its immutable attributes are read off-thread
        self.error: BaseException | None = None
        self.load_seconds: float | None = None
        self.aborted_all_at: float | None = None  # time.monotonic() when the engine thread ran abort_all

    # ------------------------------------------------------------------ event-loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="onegen-engine", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, Any]:
        return self._stats

    def seconds_since_progress(self) -> float:
        return time.monotonic() - self._heartbeat

    def making_progress(self) -> bool:
        return self.state == "ready" and self.seconds_since_progress() < self._stall_timeout_s

    def unavailable_reason(self) -> str | None:
        if self.state == "loading":
            return "the model is still loading"
        if self.state == "failed":
            return f"the engine has failed: {self.error}"
        if self.state == "stopped":
            return "the engine has been stopped (server shutting down)"
        if not self.making_progress():
            return f"the engine loop has made no progress for {self.seconds_since_progress():.0f} s"
        return None

    def _submit(self, cmd: _Add | _Search | _SwapIndex) -> None:
        with self._state_lock:
            if self.state != "ready":
                raise EngineUnavailable(self.unavailable_reason() or "engine unavailable")
            self._commands.put(cmd)

    def _set_state(self, state: WorkerState) -> None:
        with self._state_lock:
            self.state = state

    async def _prepare(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one of the engine's input preparations on the tokenizer thread (raises what it raises)."""
        if self.state != "ready":
            raise EngineUnavailable(self.unavailable_reason() or "engine unavailable")
        fn = functools.partial(getattr(self.engine, method), *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn)

    async def submit(self, request_id: str, events: asyncio.Queue, *, prompt: str | None = None,
                     messages: list[dict[str, Any]] | None = None, prompt_token_ids: list[int] | None = None,
                     **kwargs: Any) -> None:
        """Add a request whose events will be put on ``events`` (until its ``Finished``).

        The input is rendered and checked on the tokenizer thread first: its ``ValueError``
        (bad input, context length exceeded) is raised here, before the engine sees the request.
        ``kwargs`` go to ``Engine.add_request``. Several requests may share one queue: events
        carry their ``request_id``.
        """
        rendered = await self._prepare("prepare_request", prompt, messages=messages,
                                       prompt_token_ids=prompt_token_ids, sampling=kwargs.get("sampling"))
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_Add(request_id, {**kwargs, "rendered": rendered}, events, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been added after all
            raise

    def abort(self, request_id: str) -> None:
        """Ask the engine to drop a request and free its cache (thread-safe, returns at once)."""
        self._commands.put(_Abort(request_id))

    def abort_all(self, message: str) -> None:
        """Abort every request in flight (the drain timeout expired); ``message`` becomes their results' error."""
        self._commands.put(_AbortAll(message))

    async def search(self, queries: list[str], k: int, return_text: bool, index: str | None = None,
                     mode: str | None = None) -> list[list[RetrievalHit]]:
        """Encode and search ``queries`` (tokenised here, off the engine thread; encoded by the scheduler) in the
        named ``index`` (None: the default), ``mode`` dense or hybrid (None: the engine's default).

        ``InputTooLong`` names a query that does not fit; a cancelled caller aborts the search."""
        t0 = time.perf_counter()
        ids = await self._prepare("prepare_queries", queries)
        done: concurrent.futures.Future = concurrent.futures.Future()
        request_id = f"search-{uuid.uuid4().hex}"
        self._submit(_Search(request_id, ids, k, return_text, done, index, queries, mode))
        try:
            hits = await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        self._metrics.on_search(time.perf_counter() - t0)
        return hits

    def swap_index(self, entry: Any) -> concurrent.futures.Future:
        """Have the engine thread serve a loaded index version between two steps (any thread) -> a future of the
        replaced version, which the swap closes. Raises ``EngineUnavailable`` unless the engine is serving."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_SwapIndex(entry, done))
        return done

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is left, let the thread finish its last events, join it."""
        if self._thread is None:
            return
        self._commands.put(_Stop())
        self._thread.join(timeout)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():
            log.warning("engine thread did not stop within %.1f s", timeout)

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - any load failure ends the server with its message
            self.error = e
            self._set_state("failed")
            log.error("engine failed to load: %s", e, extra={"error_type": type(e).__name__})
            self._reject_commands(f"the engine failed to load: {e}")
            if self._on_fatal and self._loop:
                self._loop.call_soon_threadsafe(self._on_fatal, e)
            return
        self.load_seconds = time.perf_counter() - t0
        self._snapshot()
        self._set_state("ready")
        try:
            self._loop_until_stopped()
        except BaseException as e:  # noqa: BLE001 - a broken engine fails its requests and /health
            self.error = e
            self._set_state("failed")
            log.exception("engine loop failed; failing %d in-flight request(s)", len(self._active))
            self._fail_all(f"engine error: {type(e).__name__}: {e}")
            self._reject_commands(f"the engine has failed: {e}")
            if self._on_fatal and self._loop:
                self._loop.call_soon_threadsafe(self._on_fatal, e)
            return

    def _loop_until_stopped(self) -> None:
        engine = self.engine
        while True:
            if not self._handle_commands(block=not engine.has_unfinished()):
                break
            if engine.has_unfinished():
                events = engine.step()
                self._snapshot()  # before the events go out: whoever sees them sees these stats
                self._dispatch(events)
            else:
                self._snapshot()
        # Stop: refuse new work, abort the rest and deliver their final events.
        self._set_state("stopped")
        for rid in [*self._active, *self._searches]:
            engine.abort(rid, error="the server is shutting down")
        deadline = time.monotonic() + 10.0
        while engine.has_unfinished() and time.monotonic() < deadline:
            self._dispatch(engine.step())
        self._snapshot()
        self._fail_all("the server is shutting down")
        self._reject_commands("the server is shutting down")

    def _snapshot(self) -> None:
        self._heartbeat = time.monotonic()
        self._stats = dict(self.engine.stats())

    def _handle_commands(self, *, block: bool) -> bool:
        """Run queued commands; False once a stop is seen. Blocks briefly only when idle."""
        while True:
            try:
                cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if isinstance(cmd, _Stop):
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif isinstance(cmd, _Abort):
                if cmd.request_id in self._active or cmd.request_id in self._searches:
                    self.engine.abort(cmd.request_id)
            elif isinstance(cmd, _AbortAll):
                for rid in list(self._active):
                    if self.engine.abort(rid):
                        self._abort_messages[rid] = cmd.message
                for rid in list(self._searches):
                    self.engine.abort(rid, error=cmd.message)
                self.aborted_all_at = time.monotonic()
            elif isinstance(cmd, _Search):
                self._add_search(cmd)
            elif isinstance(cmd, _SwapIndex):
                self._swap_index(cmd)

    def _add(self, cmd: _Add) -> None:
        if cmd.accepted.cancelled():
            return
        try:
            self.engine.add_request(request_id=cmd.request_id, **cmd.kwargs)
        except Exception as e:  # noqa: BLE001 - ValueError and friends go back to the HTTP layer
            cmd.accepted.set_exception(e)
            return
        self._active[cmd.request_id] = _Active(cmd.events)
        cmd.accepted.set_result(cmd.request_id)

    def _add_search(self, cmd: _Search) -> None:
        if cmd.done.cancelled():
            return
        try:
            self.engine.add_search(cmd.queries, query_token_ids=cmd.query_token_ids, k=cmd.k,
                                   return_text=cmd.return_text, request_id=cmd.request_id, index=cmd.index,
                                   mode=cmd.mode)
        except Exception as e:  # noqa: BLE001 - handed to the awaiting request
            cmd.done.set_exception(e)
            return
        self._searches[cmd.request_id] = cmd.done

    def _swap_index(self, cmd: _SwapIndex) -> None:
        try:
            old = self.engine.swap_index(cmd.entry)
        except Exception as e:  # noqa: BLE001 - handed to the reloader, which refuses the version
            cmd.done.set_exception(e)
            return
        cmd.done.set_result(old)

    def _search_done(self, ev: SearchDone) -> None:
        done = self._searches.pop(ev.request_id, None)
        if done is None or done.done():
            return
        if ev.error is None:
            done.set_result(ev.hits)
        elif ev.error.startswith("retrieval failed"):
            done.set_exception(SearchFailed(ev.error))
        else:  # aborted: draining past its timeout, shutting down
            done.set_exception(SearchAborted(ev.error))

    def _dispatch(self, events: list[EngineEvent]) -> None:
        now = time.monotonic()
        touched: list[_Active] = []
        for ev in events:
            if isinstance(ev, SearchDone):
                self._search_done(ev)
                continue
            entry = self._active.get(ev.request_id)
            if entry is None:
                continue
            if isinstance(ev, TokenDelta):
                n = len(ev.token_ids)
                gaps: list[float] = []
                if entry.last_token_time is not None and n:
                    gaps = [(now - entry.last_token_time) / n] * n
                if n:
                    entry.last_token_time = now
                entry.tokens_counted += n
                self._metrics.on_tokens(n, gaps)
            elif isinstance(ev, RetrievalEvent):
                self._metrics.on_retrieval(ev.record.search_ms)
            elif isinstance(ev, Finished):
                message = self._abort_messages.pop(ev.request_id, None)
                if message is not None and ev.result.error is None:
                    ev.result.error = message
                self._metrics.on_finished(ev.result, entry.tokens_counted)
                del self._active[ev.request_id]
            if not entry.pending:
                touched.append(entry)
            entry.pending.append(ev)
        if touched and self._loop is not None:
            batch = [(e.events, e.pending) for e in touched]
            for e in touched:
                e.pending = []
            self._loop.call_soon_threadsafe(_deliver, batch)

    def _reject_commands(self, message: str) -> None:
        """Answer commands that can no longer run, so that nobody awaits them forever."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            future = getattr(cmd, "accepted", None) or getattr(cmd, "done", None)
            if future is not None and not future.done():
                future.set_exception(EngineUnavailable(message))

    def _fail_all(self, message: str) -> None:
        for rid in list(self._searches):
            self._search_done(SearchDone(rid, error=message))
        events: list[EngineEvent] = []
        for rid in list(self._active):
            result = GenerationResult(
                request_id=rid, text="", token_ids=[], finish_reason="error", usage=Usage(), retrievals=[],
                error=message, finish_time=time.monotonic(),
            )
            events.append(Finished(rid, "error", result))
        self._dispatch(events)


def _deliver(batch: list[tuple[asyncio.Queue, list[EngineEvent]]]) -> None:
    for q, events in batch:
        for ev in events:
            q.put_nowait(ev)
