"""What the routes share: settings, the engine worker, metrics, admission control and draining.

``ServerState`` is built by the app factory and reached by routes through the
``get_state`` dependency. Admission control is a counter on the event loop: a request
holds a ``Ticket`` from admission until its response is fully sent (streams included),
and beyond ``max_pending_requests`` new requests get 429 with Retry-After instead of
joining an unbounded queue.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from .errors import APIError
from .metrics import Metrics
from .settings import ServerSettings
from .worker import EngineWorker


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

    @property
    def engine(self) -> Any:
        """The loaded engine (for its immutable attributes only: checkpoint, index, config)."""
        return self.worker.engine

    def unavailable_reason(self) -> str | None:
        if self.draining:
            return "the server is shutting down"
        return self.worker.unavailable_reason()

    def admit(self) -> Ticket:
        """Admit one request or raise 503 (loading / draining / stalled) or 429 (overloaded)."""
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
        return Ticket(self)


class Ticket:
    """One admitted request; ``release`` is idempotent."""

    def __init__(self, state: ServerState):
        self._state = state
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._state.in_flight -= 1


def get_state(request: Request) -> ServerState:
    return request.app.state.onegen


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
