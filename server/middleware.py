"""Pure ASGI middleware: request ids + access log + last-resort 500s, HEAD, the API key, the body limit.

Pure ASGI (not ``BaseHTTPMiddleware``) so that streaming responses and client
disconnects pass straight through. From the outside in:

* ``RequestContext``: takes ``X-Request-Id`` from the client (if it is a sane token)
  or makes one, echoes it on the response, names the replica that answered in
  ``X-Served-By`` (host name and port: which of several replicas behind a load balancer
  served a request), logs one access line per request, and answers any unhandled
  exception with the ``{"error": ...}`` shape.
* ``HeadAsGet``: a HEAD request is routed as the GET of the same path and answered
  without its body (load balancers and health probes use HEAD).
* ``ApiKeyGate``: 401 from the headers alone, before anything reads the body — an
  unauthenticated request is never buffered or parsed.
* ``BodyLimit``: 413 for a body larger than ``max_body_bytes``, whether announced by
  ``Content-Length`` or discovered while a chunked body is read.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import bearer_token, key_problem
from .errors import error_payload

access_log = logging.getLogger("onegen.access")
log = logging.getLogger("onegen.server")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


async def _send_error(send: Send, status: int, message: str, type: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(error_payload(status, message, type)).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    def __init__(self, app: ASGIApp, served_by: str | None = None):
        self.app = app
        self.served_by = [(b"x-served-by", served_by.encode("latin-1", "replace"))] if served_by else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        headers = [id_header, *self.served_by]
        t0 = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id, "path": scope.get("path")})
            if status == 0:
                status = 500
                await _send_error(send, 500, f"internal error (request id {request_id})", "internal_error", headers)
        finally:
            access_log.info(
                "%s %s %s", scope.get("method"), scope.get("path"), status,
                extra={"request_id": request_id, "method": scope.get("method"), "path": scope.get("path"),
                       "status": status, "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
                       "client": (scope.get("client") or ("", 0))[0]},
            )


class HeadAsGet:
    """HEAD on any GET route: the app sees a GET (its own scope copy), the client gets the headers only.

    The server's own scope still says HEAD (uvicorn drops the body of a HEAD response by it too), and
    the access log above this middleware records the method as sent.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


# A refused request's body up to this size is left to the server to drain (it reads and drops it, and the
# connection stays usable); a larger or chunked (unknown size) one closes the connection instead (by
# lingering a bounded time, so that the answer is not lost to a reset: server.http_protocol).
_DRAIN_LIMIT = 64 * 1024


def _close_instead_of_draining(scope: Scope) -> bool:
    for k, v in scope["headers"]:
        if k == b"content-length":
            return not v.strip().isdigit() or int(v) > _DRAIN_LIMIT
        if k == b"transfer-encoding":
            return True
    return False


class ApiKeyGate:
    """401 for a request without the API key, decided from its headers before its body is read.

    ``public`` tells which paths need no key (health probes; metrics and docs when configured so).
    The 401 closes the connection when the request announces a large (or chunked) body, so the
    server does not go on reading, and discarding, a body it refused for longer than the lingering
    close that gets the answer to the client (``server.http_protocol``).
    """

    def __init__(self, app: ASGIApp, key: str | None, public: Callable[[str], bool],
                 on_reject: Callable[[], None] | None = None):
        self.app = app
        self.key = key
        self.public = public
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or self.public(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        problem = key_problem(bearer_token(header), self.key)
        if problem is None:
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject()
        headers = [(b"www-authenticate", b"Bearer")]
        if _close_instead_of_draining(scope):
            headers.append((b"connection", b"close"))
        await _send_error(send, 401, problem, "authentication_error", headers)


class _TooLarge(HTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body parsing re-raises it as is (413)."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than this server's limit of {self.max} bytes"
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max:
            await _send_error(send, 413, message, "payload_too_large", [(b"connection", b"close")])
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max:
                    raise _TooLarge(413, message)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, message, "payload_too_large", [(b"connection", b"close")])
