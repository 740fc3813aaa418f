"""Kept so that ``onegen_core.encoder`` still imports: the encoder lives in ``onegen_core.retrieval.encoder``."""

from .retrieval.encoder import Encoder, InputTooLong, normalize

__all__ = ["Encoder", "InputTooLong", "normalize"]
