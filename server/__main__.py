"""``python -m server``: parse flags / ONEGEN_* variables, configure logs, run uvicorn over the app.

SIGTERM / SIGINT: /health/ready turns 503 at once, uvicorn stops accepting
connections and waits up to ``--drain-timeout-s`` for in-flight requests (streams
included) to finish; what is still running then is aborted by the app, so that each
request ends with its documented error (a JSON 500 ``server_shutdown``, which nginx does not
retry: the work was done; an SSE ``error`` event, then ``[DONE]``), and the engine is stopped.
The abort takes effect at the end of the engine step under way, however long it takes; uvicorn
cancels only the responses that could not be sent ``state.DRAIN_FINISH_S`` after that
(``ServerState.shutdown_overdue``).
Without ``--checkpoint`` the embedded default model is served, prepared on first start
(``server.prepare_default``: base import, adapter, prebuilt or built index) before the port is bound.
A checkpoint or index path that does not exist ends the process with status 2 and one
line naming it, before the port is bound, and so does ``--retrieval-mode hybrid`` with an index
whose current version has no BM25 side index; a model or index that fails to load ends it
with status 1 and the reason.
Connections are bounded too: request headers must arrive within ``--header-timeout-s``
(``http_protocol``) and be at most ``--max-header-bytes``; idle keep-alive connections
close after ``--keep-alive-timeout-s``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from .app import create_app
from .http_protocol import header_timeout_protocol
from .logs import configure_logging
from .settings import ServerSettings, parse_settings

log = logging.getLogger("onegen.server")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining the moment a shutdown signal arrives, and
    waiting for in-flight responses for as long as ``overdue`` says (uvicorn's own timeout is off)."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None],
                 overdue: Callable[[float], str | None]):
        super().__init__(config)
        self._on_signal = on_signal
        self._overdue = overdue

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)

    async def _wait_tasks_to_complete(self) -> None:
        t0 = time.monotonic()
        waiting = asyncio.ensure_future(super()._wait_tasks_to_complete())
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=0.1)
                reason = None if waiting.done() else self._overdue(time.monotonic() - t0)
                if reason is not None:
                    log.error("shutdown: cutting off the responses still running: %s", reason)
                    raise asyncio.TimeoutError(reason)  # uvicorn's shutdown cancels the tasks left
            waiting.result()
        finally:
            waiting.cancel()


def missing_path(settings: ServerSettings) -> str | None:
    """Why ``--checkpoint`` / ``--index`` cannot be served, when a look at the file system says so; else None.

    Checked before uvicorn starts, so that a typo is one line and status 2, not a bound port,
    a loading engine and a "could not start" later.
    """
    paths: list[tuple[str, Path | None]] = [("--checkpoint", settings.checkpoint)]
    paths += [("--index" if name == "default" else f"--index {name}=", path) for name, path in settings.index.items()]
    for flag, path in paths:
        if path is None:
            continue
        where = f"{flag}{path}" if flag.endswith("=") else f"{flag} {path}"
        if not path.exists():
            return f"{where}: does not exist"
        if not path.is_dir():
            return f"{where}: not a directory"
    return None


def hybrid_unavailable(settings: ServerSettings) -> str | None:
    """With ``--retrieval-mode hybrid``, why an index cannot serve it (its current version has no BM25 side
    index: every request would be refused); else None. Reads one manifest per index."""
    if settings.retrieval_mode != "hybrid":
        return None
    from onegen_core.formats.index_store import MANIFEST, IndexError_, Manifest, resolve_version
    from onegen_core.retrieval.registry import no_bm25_message

    for name, path in settings.index.items():
        try:
            version_dir, _ = resolve_version(path)
            manifest = Manifest.from_file(version_dir / MANIFEST)
        except (IndexError_, OSError, ValueError):  # not an index: the engine's load says why, in full
            continue
        if manifest.bm25 is None:
            return f"--retrieval-mode hybrid: {no_bm25_message(name, path)}; or serve with --retrieval-mode dense"
    return None


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    problem = missing_path(settings)
    if problem is not None:
        print(f"onegen server: {problem}", file=sys.stderr)
        return 2
    if settings.checkpoint is None:  # the embedded default model, prepared here (once) before the port is bound
        from .prepare_default import serve_default

        try:
            settings = serve_default(settings)
        except (ValueError, RuntimeError, OSError) as e:
            print(f"onegen server: could not prepare the default model: {e}", file=sys.stderr)
            return 2
    problem = hybrid_unavailable(settings)
    if problem is not None:
        print(f"onegen server: {problem}", file=sys.stderr)
        return 2
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
            app.state.onegen.begin_drain(settings.drain_timeout_s)
            log.info("shutdown signal: draining in-flight requests",
                     extra={"in_flight": app.state.onegen.in_flight, "grace_s": settings.drain_timeout_s})

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        log_level=settings.log_level, timeout_graceful_shutdown=None,
        lifespan="on", workers=1, http=header_timeout_protocol(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s, h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    server = _DrainingServer(config, on_signal, lambda waiting_s: app.state.onegen.shutdown_overdue(waiting_s))
    server.run()
    if fatal:
        print(f"onegen server: could not start: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
