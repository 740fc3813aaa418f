"""Kept so that ``onegen_core.params`` still imports: the request parameters live in ``onegen_core.engine.params``."""

from .engine.params import RetrievalParams, SamplingParams

__all__ = ["RetrievalParams", "SamplingParams"]
