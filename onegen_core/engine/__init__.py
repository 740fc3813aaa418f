"""The engine loop: requests in, one packed forward a step, tokens, retrievals and results out.

``engine`` (the ``Engine`` and its step) drives ``scheduler`` (what runs this step, on the paged
``kv_cache``), ``model_runner`` (the forward), ``sampler``, ``insertion`` (search at a query token,
then insert or annotate) and ``searches`` (``/retrieve`` jobs); ``inputs`` checks what comes in,
``sequence`` holds each request's state, ``outputs`` is what comes back, ``params`` and
``engine_config`` are what a request and the engine are given, ``blocking`` the step-until-done calls.

The public names are importable from here, e.g. ``from onegen_core.engine import Engine, EngineConfig``.
Each loads on first use, so that ``engine_config`` and ``params`` (a command line's settings) import
without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {  # public name -> the module that defines it
    "Engine": "engine",
    "EngineConfig": "engine_config",
    "ContextLengthExceeded": "inputs", "RequestInput": "inputs",
    "RetrievalParams": "params", "SamplingParams": "params",
    "EngineEvent": "outputs", "Finished": "outputs", "GenerationResult": "outputs", "RetrievalEvent": "outputs",
    "RetrievalHit": "outputs", "RetrievalRecord": "outputs", "SearchDone": "outputs", "TokenDelta": "outputs",
    "Usage": "outputs",
}
__all__ = [
    "ContextLengthExceeded", "Engine", "EngineConfig", "EngineEvent", "Finished", "GenerationResult", "RequestInput",
    "RetrievalEvent", "RetrievalHit", "RetrievalParams", "RetrievalRecord", "SamplingParams", "SearchDone",
    "TokenDelta", "Usage",
]

if TYPE_CHECKING:
    from .engine import Engine
    from .engine_config import EngineConfig
    from .inputs import ContextLengthExceeded, RequestInput
    from .outputs import (
        EngineEvent,
        Finished,
        GenerationResult,
        RetrievalEvent,
        RetrievalHit,
        RetrievalRecord,
        SearchDone,
        TokenDelta,
        Usage,
    )
    from .params import RetrievalParams, SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
