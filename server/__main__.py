"""``python -m server``: parse flags / ONEGEN_* variables, configure logs, run uvicorn over the app.

SIGTERM / SIGINT: /health/ready turns 503 at once, uvicorn stops accepting
connections and waits up to ``--drain-timeout-s`` for in-flight requests (streams
included) to finish; what is still running then is aborted and the engine stopped.
A model or index that fails to load ends the process with status 1 and the reason.
Connections are bounded too: request headers must arrive within ``--header-timeout-s``
(``http_protocol``) and be at most ``--max-header-bytes``; idle keep-alive connections
close after ``--keep-alive-timeout-s``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from .app import create_app
from .http_protocol import header_timeout_protocol
from .logs import configure_logging
from .settings import parse_settings

log = logging.getLogger("onegen.server")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    fatal: list[BaseException] = []
    server: _DrainingServer | None = None

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)

    def on_signal() -> None:
        if not app.state.onegen.draining:
            app.state.onegen.draining = True
            log.info("shutdown signal: draining in-flight requests",
                     extra={"in_flight": app.state.onegen.in_flight, "grace_s": settings.drain_timeout_s})

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        log_level=settings.log_level, timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]
        lifespan="on", workers=1, http=header_timeout_protocol(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s, h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    server = _DrainingServer(config, on_signal)
    server.run()
    if fatal:
        print(f"onegen server: could not start: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
