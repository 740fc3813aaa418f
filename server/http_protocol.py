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

The same class closes connections by lingering (RFC 9112 section 9.6). When the server
answers before it has read the request's body (a 401 decided from the headers, a 413
for a body over the limit) and closes the connection, closing the socket with the body
still arriving makes the kernel answer the client with a TCP reset, and a reset
destroys the answer in the client's receive buffer before the client, still busy
sending, has read it: the client sees "connection reset" instead of its 401 or 413.
So instead the server half-closes (its answer and a FIN go out), keeps reading and
discarding what the client still sends, and closes for real when the client closes
its side, when nothing arrives for ``LINGER_IDLE_S``, or after ``LINGER_TOTAL_S``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_IDLE_S = 2.0  # a lingering close ends when the client sends nothing for this long...
LINGER_TOTAL_S = 15.0  # ...or this long after it began, whatever the client still sends


class _LingeringTransport:
    """The connection's transport as uvicorn sees it, except that ``close`` lingers while a body is arriving."""

    def __init__(self, transport: asyncio.Transport, protocol: H11Protocol, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._protocol = protocol
        self._loop = loop
        self.lingering = False
        self._started = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        # (a transport the client closed, or that a linger closed, is closing already: closed again at once)
        conn = self._protocol.conn
        if self.lingering or self._transport.is_closing() or conn.their_state is not h11.SEND_BODY:
            self._close_now()
            return
        # the answer is written, the client is still sending its body: half-close and drain
        self.lingering = True
        self._started = self._loop.time()
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._transport.resume_reading()
        self.heard_from_client()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def heard_from_client(self) -> None:
        """(Re)start the idle deadline; past the total deadline, close now."""
        self.cancel_timer()
        left = self._started + LINGER_TOTAL_S - self._loop.time()
        if left <= 0:
            self._close_now()
        else:
            self._timer = self._loop.call_later(min(LINGER_IDLE_S, left), self._close_now)

    def _close_now(self) -> None:
        self.cancel_timer()
        self._transport.close()


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """An ``H11Protocol`` class (uvicorn's ``http=``) that enforces ``header_timeout_s`` on request headers
    and closes a connection whose request body is still arriving by lingering (see the module docstring)."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _lingering: _LingeringTransport | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            self._lingering = _LingeringTransport(transport, self, asyncio.get_running_loop())
            super().connection_made(self._lingering)  # type: ignore[arg-type]
            self._arm()  # a connection that never sends a byte is a slow-header client too

        def data_received(self, data: bytes) -> None:
            if self._lingering is not None and self._lingering.lingering:
                self._lingering.heard_from_client()  # the rest of a refused body: read and dropped
                return
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
            if self._lingering is not None:
                self._lingering.cancel_timer()
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
