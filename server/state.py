"""What the routes share: settings, the engine worker, metrics, admission control and draining.

``ServerState`` is built by the app factory and reached by routes through the
``get_state`` dependency. It checks a request's options against this server's limits
(``sampling_params``, ``retrieval_params``) and admits it: admission control is a
counter on the event loop. A generating request is admitted as a ``Generation``, which
holds its place until it is closed, when its response is fully sent (streams included);
``/retrieve`` holds one for its ``with state.admitted()`` block. Beyond
``max_pending_requests`` new requests get 429 with Retry-After instead of joining an
unbounded queue.

Draining (SIGTERM): ``begin_drain`` turns ``/health/ready`` and admission to 503 (with
Retry-After) at once: a request refused so has had no work done, and a load balancer may run
it on another replica. When the drain timeout expires with requests still in flight, it aborts
them all, so that each one ends with its documented error (a JSON 500 ``server_shutdown``,
never a 503 that a load balancer would run again, or an SSE ``error`` event and ``[DONE]``;
``generation.finish_error``). The abort takes effect between two engine steps, so the shutdown
then waits on the engine, not on a clock (``shutdown_overdue``): responses still being sent are
cut off only ``DRAIN_FINISH_S`` after the engine ran the abort, however long its step was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from onegen_core.engine.params import RetrievalParams, SamplingParams

from .errors import APIError
from .generation import Generation
from .metrics import Metrics
from .reloader import IndexReloader
from .schemas import RetrievalOptions
from .settings import ServerSettings
from .worker import EngineWorker

log = logging.getLogger("onegen.server")
# After the engine has aborted what a drain left running, how long those requests have to send their error
# responses before the shutdown cancels their tasks (which cuts streams and answers plain requests with a bare 500).
DRAIN_FINISH_S = 10.0


@dataclass
class ServerState:
    settings: ServerSettings
    worker: EngineWorker
    metrics: Metrics
    model_name: str
    demo: bool = False
    draining: bool = False
    in_flight: int = 0
    started_at: float = field(default_factory=time.time)
    loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, set when the app starts
    reloader: IndexReloader | None = None  # polls the index directories, runs POST /admin/reload
    _drain_timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def engine(self) -> Any:
        """The loaded engine (for its immutable attributes only: checkpoint, index, config)."""
        return self.worker.engine

    def unavailable_reason(self) -> str | None:
        if self.draining:
            return "the server is shutting down"
        return self.worker.unavailable_reason()

    def begin_drain(self, timeout_s: float) -> None:
        """Refuse new requests now; abort what is still in flight after ``timeout_s`` (thread- and signal-safe)."""
        self.draining = True
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._schedule_drain_expiry, timeout_s)

    def _schedule_drain_expiry(self, timeout_s: float) -> None:
        if self._drain_timer is None and self.loop is not None:
            self._drain_timer = self.loop.call_later(timeout_s, self._expire_drain, timeout_s)

    def _expire_drain(self, timeout_s: float) -> None:
        if self.in_flight:
            log.warning("drain timeout expired: aborting the requests still in flight",
                        extra={"in_flight": self.in_flight, "grace_s": timeout_s})
        # every request the engine holds then (admission is closed, so no new one can follow this command)
        self.worker.abort_all(f"the request was aborted: the server is shutting down and its drain timeout "
                              f"of {timeout_s:g} s expired")

    def shutdown_overdue(self, waiting_s: float) -> str | None:
        """Why the shutdown should stop waiting for responses still being sent (their tasks are then
        cancelled), or None to go on waiting; ``waiting_s``: how long it has waited so far.

        Responses get ``DRAIN_FINISH_S`` after the engine thread ran the drain timeout's abort, however long
        the step it was in took. Only an engine that makes no progress (stalled past ``--stall-timeout-s``,
        failed or stopped) falls back to a bound on the clock: the drain timeout plus ``DRAIN_FINISH_S``.
        """
        aborted_at = self.worker.aborted_all_at
        if aborted_at is not None:
            if time.monotonic() - aborted_at > DRAIN_FINISH_S:
                return f"responses still unsent {DRAIN_FINISH_S:g} s after the engine aborted their requests"
            return None
        if not self.worker.making_progress() and waiting_s > self.settings.drain_timeout_s + DRAIN_FINISH_S:
            return f"the engine makes no progress (worker state {self.worker.state})"
        return None

    def end_drain(self) -> None:
        """At shutdown: stay draining, and drop the expiry timer (the worker aborts what is left)."""
        self.draining = True
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    # ------------------------------------------------------------------ a request's options and admission
    def sampling_params(
        self, *, max_tokens: int | None, temperature: float, top_p: float, top_k: int = 0,
        stop: str | list[str] | None = None, seed: int | None = None, logprobs: bool = False, ignore_eos: bool = False,
    ) -> SamplingParams:
        """The engine's sampling parameters, or 422 naming the field (``max_tokens`` over this server's limit)."""
        s = self.settings
        if max_tokens is None:
            max_tokens = s.default_max_tokens
        if max_tokens > s.max_tokens_limit:
            raise APIError(422, f"max_tokens: {max_tokens} is more than this server's limit of {s.max_tokens_limit}",
                           param="max_tokens")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  stop=stops, seed=seed, logprobs=logprobs, ignore_eos=ignore_eos)
        except ValueError as e:
            raise APIError(422, str(e), param=str(e).split(" ", 1)[0]) from None

    def retrieval_params(self, options: RetrievalOptions | None, param: str = "retrieval") -> RetrievalParams:
        o = options or RetrievalOptions()
        if o.k is not None and o.k > self.settings.max_retrieve_k:
            raise APIError(422, f"{param}.k: {o.k} is more than this server's limit of {self.settings.max_retrieve_k}",
                           param=f"{param}.k")
        self.check_index(o.index, f"{param}.index")
        if o.enabled:
            self.check_mode(o.mode, o.index, f"{param}.mode")
        return RetrievalParams(enabled=o.enabled, k=o.k, max_retrievals=o.max_retrievals,
                               return_passages=o.return_passages, index=o.index, mode=o.mode)

    def check_mode(self, mode: str | None, index: str | None, param: str) -> None:
        """422 naming ``param`` when the request would retrieve in hybrid mode (its own or the server's default)
        from an index without a BM25 side index; the message names the index and what to run."""
        engine = self.engine
        if engine is None or (mode or engine.config.retrieval_mode) != "hybrid":
            return
        entry = engine.indexes.get(index)  # one snapshot: the version a request would search now
        if entry is not None and entry.bm25 is None:
            raise APIError(422, f"{param}: {entry.no_bm25_message()}", param=param, type="hybrid_unavailable")

    def check_index(self, name: str | None, param: str) -> None:
        """422 naming ``param`` and the served indexes when ``name`` is not one of them (None: the default)."""
        if name is None or self.engine is None:  # still loading: admission answers 503
            return
        known = self.engine.indexes.names
        if name not in known:
            served = ", ".join(repr(k) for k in known) if known else "none (start it with --index)"
            raise APIError(422, f"{param}: unknown index {name!r}; this server serves: {served}", param=param,
                           type="unknown_index")

    def admit(self, http_request: Request, id_prefix: str) -> Generation:
        """Admit one generating request, or raise 503 (loading / draining / stalled) or 429 (overloaded).
        It holds its place until ``Generation.close``."""
        self._take_place()
        return Generation(self.worker, self.settings, http_request, id_prefix, release=self._give_place_back)

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold an admission for the block (a request answered before its route returns: /retrieve)."""
        self._take_place()
        try:
            yield
        finally:
            self._give_place_back()

    def _take_place(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            self.metrics.on_rejected("unavailable")
            raise APIError(503, reason, type="service_unavailable",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        if self.in_flight >= self.settings.max_pending_requests:
            self.metrics.on_rejected("overloaded")
            raise APIError(
                429,
                f"the server is at its limit of {self.settings.max_pending_requests} requests in flight; "
                f"retry after {self.settings.retry_after_s} s",
                type="overloaded",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        self.in_flight += 1

    def _give_place_back(self) -> None:
        self.in_flight -= 1


def get_state(request: Request) -> ServerState:
    return request.app.state.onegen
