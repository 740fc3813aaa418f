"""Native model code: the Llama-family forward, attention backends, weight loading, and length bucketing (which rows share one forward)."""

from .attention import AttentionMetadata, build_attention_metadata
from .llama import LlamaFamilyModel, build_model

__all__ = ["AttentionMetadata", "LlamaFamilyModel", "build_attention_metadata", "build_model"]
