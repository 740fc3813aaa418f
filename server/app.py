"""The app factory: settings in, a FastAPI app out, whose lifespan owns the engine worker.

The engine is built on the worker thread when the app starts (the lifespan starts
the thread and returns at once), so the server answers ``/health/live`` and a 503
``/health/ready`` while a large model loads. A load failure calls ``on_fatal`` (the
CLI then exits non-zero with the message). The index reloader (``reloader.py``) polls
the index directories from then on. At shutdown the reloader stops, then the worker
aborts what is left and is joined; uvicorn's graceful-shutdown timeout gives in-flight
requests their drain period before that.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from . import __version__, playground
from .demo import DEMO_MARKER
from .errors import install_error_handlers
from .metrics import Metrics, ServedIndex
from .middleware import ApiKeyGate, BodyLimit, HeadAsGet, RequestContext
from .reloader import IndexReloader
from .settings import ServerSettings
from .state import ServerState
from .worker import EngineWorker

log = logging.getLogger("onegen.server")
DEMO_MODEL_NAME = "onegen-demo-random-weights"


def engine_factory_for(settings: ServerSettings) -> Callable[[], Any]:
    """Build the engine from the settings (called on the worker thread)."""

    def build() -> Any:
        from onegen_core.engine import Engine

        config = settings.engine_config()
        return Engine.from_checkpoint(settings.checkpoint, config=config, index_dirs=settings.index)

    return build


def create_app(
    settings: ServerSettings,
    *,
    engine_factory: Callable[[], Any] | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    from .openai_api import router as openai_router
    from .routes import api, health, metrics_router

    if settings.checkpoint is None:
        raise ValueError("create_app needs settings with a checkpoint; python -m server fills in the default model's "
                         "(server.prepare_default.serve_default) before it builds the app")
    demo = (settings.checkpoint / DEMO_MARKER).is_file()
    model_name = settings.served_model_name or (DEMO_MODEL_NAME if demo else settings.model_name)
    metrics = Metrics(model_name)
    worker = EngineWorker(engine_factory or engine_factory_for(settings), metrics,
                          stall_timeout_s=settings.stall_timeout_s, on_fatal=on_fatal)
    reloader = IndexReloader(worker, metrics, settings.index_poll_s)
    state = ServerState(settings=settings, worker=worker, metrics=metrics, model_name=model_name, demo=demo,
                        reloader=reloader)
    metrics.bind(worker.stats, lambda: state.in_flight, lambda: served_indexes(worker))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("loading the engine", extra={"checkpoint": str(settings.checkpoint),
                                              "index": {k: str(v) for k, v in settings.index.items()} or None})
        if state.demo:
            log.warning("serving the built-in DEMO checkpoint: a tiny model with random weights, "
                        "not a trained OneGen model; its outputs are meaningless")
        state.loop = asyncio.get_running_loop()
        worker.start(state.loop)
        reloader.start()
        try:
            yield
        finally:
            state.end_drain()
            await asyncio.to_thread(reloader.stop)
            await asyncio.to_thread(worker.stop, 15.0)
            log.info("engine stopped")

    app = FastAPI(
        title="OneGen",
        version=__version__,
        summary="One model that generates and retrieves in one pass (OneGen, EMNLP 2024).",
        lifespan=lifespan,
    )
    app.state.onegen = state
    install_error_handlers(app)
    app.include_router(health)
    app.include_router(metrics_router)
    app.include_router(api)
    app.include_router(openai_router)
    app.include_router(playground.router)
    public = public_paths(settings, app)
    # Starlette wraps in reverse order of addition: RequestContext > HeadAsGet > ApiKeyGate > BodyLimit > routes.
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyGate, key=settings.api_key_value(), public=public,
                       on_reject=lambda: metrics.on_rejected("unauthorized"))
    app.add_middleware(HeadAsGet)
    # outermost: every response (401s and 413s too) gets the request id, and the replica's name
    app.add_middleware(RequestContext, served_by=f"{socket.gethostname()}:{settings.port}")
    return app


def served_indexes(worker: EngineWorker) -> list[ServedIndex]:
    """The gauges' view of the engine's indexes (none while it loads)."""
    engine = worker.engine
    if engine is None:
        return []
    return [ServedIndex(e.name, e.version, e.size, e.loaded_at) for e in engine.indexes.entries.values()]


def public_paths(settings: ServerSettings, app: FastAPI) -> Callable[[str], bool]:
    """Which paths need no API key: health probes and the playground's static files (``/`` redirects to
    ``/playground``; they hold no data, its API calls carry the key) always, /metrics and the API docs when
    configured so."""
    exact = set(playground.PUBLIC_PATHS)
    if not settings.metrics_auth:
        exact.add("/metrics")
    if settings.public_docs:
        exact |= {u for u in (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url) if u}

    def public(path: str) -> bool:
        return path.startswith("/health/") or path in exact

    return public
