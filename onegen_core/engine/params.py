"""Per-request parameters: sampling and retrieval. Validated at construction (ValueError names the field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine_config import RETRIEVAL_MODES


@dataclass
class SamplingParams:
    max_tokens: int = 256  # generated (GEN) tokens; inserted passages do not count
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # same seed -> same output, whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # log-probability of each sampled token
    # Output position -> token id appended there instead of sampling. For benchmarks and tests that must
    # place retrievals deterministically (e.g. {0: rq_id, 40: rq_id}); not exposed over HTTP.
    forced_tokens: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if any(pos < 0 or tok < 0 for pos, tok in self.forced_tokens.items()):
            raise ValueError("forced_tokens maps output positions >= 0 to token ids >= 0")


@dataclass
class RetrievalParams:
    enabled: bool = True
    k: int | None = None  # passages per retrieval; None = the checkpoint's default
    max_retrievals: int | None = None  # per request; None = the checkpoint's default
    return_passages: bool = False  # include passage text in the trace
    index: str | None = None  # the named index to search; None = the engine's default index
    # "dense" (the query token's hidden state) or "hybrid" (that and BM25 fused: retrieval.hybrid); None = the
    # engine's default (EngineConfig.retrieval_mode)
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in RETRIEVAL_MODES:
            raise ValueError(f"mode must be one of {', '.join(RETRIEVAL_MODES)} (or None for the engine's default), "
                             f"got {self.mode!r}")
        if self.index is not None and not self.index:
            raise ValueError("index must be a non-empty index name (or None for the default index)")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.max_retrievals is not None and self.max_retrievals < 0:
            raise ValueError(f"max_retrievals must be >= 0, got {self.max_retrievals}")
