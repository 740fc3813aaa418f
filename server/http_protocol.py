"""uvicorn's h11 HTTP protocol with a deadline on request headers (slow-header clients).

uvicorn's ``timeout_keep_alive`` closes a connection that stays idle between requests,
but it starts only once a response is complete and stops at the next byte received; a
client that connects and sends nothing, or sends a request line and then its headers
one byte at a time, holds the connection (and a slot of the process's file
descriptors) for as long as it likes. ``header_timeout_protocol`` returns an
``H11Protocol`` subclass that closes the connection when the request line and headers
are not complete ``header_timeout_s`` seconds after the connection opened, or after the
first byte of a later request on it arrived. Idle keep-alive connections are still
closed by uvicorn's ``timeout_keep_alive``; the size of the headers is bounded by h11's
``h11_max_incomplete_event_size`` and the body by ``--max-body-bytes``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """An ``H11Protocol`` class (uvicorn's ``http=``) that enforces ``header_timeout_s`` on request headers."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a connection that never sends a byte is a slow-header client too

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # h11 leaves the client IDLE until a whole request line + headers has been parsed.
            if self.conn.their_state is h11.IDLE:
                self._arm()
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is not h11.IDLE:  # a pipelined request was parsed already
                self._disarm()
            # else: idle until the next byte, which uvicorn's keep-alive timeout covers; that byte arms ours

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    HeaderTimeoutH11Protocol.__qualname__ = HeaderTimeoutH11Protocol.__name__
    return HeaderTimeoutH11Protocol
