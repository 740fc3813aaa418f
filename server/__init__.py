"""OneGen HTTP server: FastAPI/uvicorn over the engine, which steps on its own worker thread.

``python -m server --checkpoint DIR --index DIR`` (every flag also an ``ONEGEN_*``
variable) serves /generate, /retrieve, the OpenAI-compatible /v1 routes, /metrics,
/health/live, /health/ready and /info. ``create_app`` is the app factory.
"""

__version__ = "0.1.0"

from .app import create_app  # noqa: E402
from .settings import ServerSettings  # noqa: E402

__all__ = ["ServerSettings", "__version__", "create_app"]
