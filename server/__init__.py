"""OneGen HTTP server: FastAPI/uvicorn over the engine, which steps on its own worker thread.

``python -m server --checkpoint DIR --index DIR`` (every flag also an ``ONEGEN_*``
variable) serves /generate, /retrieve, the OpenAI-compatible /v1 routes, /metrics,
/health/live, /health/ready and /info. ``create_app`` is the app factory.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ServerSettings", "__version__", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m server.prepare_default` or `python -m server.demo` do not import the app (and FastAPI) first.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'server' has no attribute {name!r}")
