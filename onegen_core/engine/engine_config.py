"""The engine's settings, declared once: name, default, help text and bounds of each.

``Engine`` reads an ``EngineConfig``; ``python -m server`` derives a ``--flag`` and an
``ONEGEN_*`` variable from every field, with this help and these bounds
(``server/settings.py``), and builds the ``EngineConfig`` back from them. Nothing here
loads torch, so the server's command line parses fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

LINEAR_BACKENDS = ("auto", "aten", "onednn")
# How a request retrieves (``RetrievalParams.mode``; ``onegen_core.retrieval.hybrid``): the model's query vector
# alone, or that and BM25 fused by reciprocal rank. Here, not there: this module loads without torch.
RETRIEVAL_MODES = ("dense", "hybrid")
# The step token budget when none is given. A GPU runs a 2048-token step in milliseconds; a CPU takes seconds
# (SmolLM2-135M, 2 cores, bf16: 3.4 s), and every running stream waits that long for its next token. In
# 512-token chunks the same CPU prefills a 3,278-token prompt faster (time to first token 5.2-5.4 s against
# 6.2 s) with no step over 1.2 s, and serves 32 concurrent streams as fast (204 against 205 tokens/s);
# 256-token steps (0.6 s at most) cost 12% of that throughput (177-180 tokens/s), as more steps share the work.
STEP_BUDGET_GPU = 2048
STEP_BUDGET_CPU = 512


def _setting(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
             choices: tuple[str, ...] | None = None) -> Any:
    """A field of ``EngineConfig`` with its help text and bounds: the one declaration the server's flags, their
    validation and the engine's own checks all derive from."""
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices})


@dataclass
class EngineConfig:
    """Engine settings. ``python -m server`` exposes each as ``--flag`` / ``ONEGEN_*`` with this help and these
    bounds (``server/settings.py`` derives them from here)."""

    dtype: str = _setting("auto", "weights / compute dtype (auto: bfloat16 or float16 on a GPU, float32 on the CPU)",
                          choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _setting("auto", "where the model runs: auto (a GPU if there is one), cpu, cuda, cuda:N")
    max_num_seqs: int = _setting(64, "sequences decoded together in one engine step", ge=1, le=4096)
    max_num_batched_tokens: int | None = _setting(
        None, "token budget of one engine step: decode tokens, prompt chunks, inserted passages and query encodes; "
        f"it bounds the time of any one step (default: {STEP_BUDGET_GPU} on a GPU, {STEP_BUDGET_CPU} on the CPU)",
        ge=1)
    block_size: int = _setting(16, "tokens per KV cache block (a multiple of 256 for flash attention)", ge=1, le=1024)
    num_kv_blocks: int | None = _setting(
        None, "KV cache blocks (default: sized from --kv-cache-memory-gb on the CPU, --gpu-memory-utilization on a "
        "GPU)", ge=1)
    kv_cache_memory_gb: float = _setting(1.0, "CPU: KV cache size in GiB when --num-kv-blocks is not given", gt=0)
    gpu_memory_utilization: float = _setting(
        0.85, "GPU: fraction of free memory for the KV cache when --num-kv-blocks is not given", gt=0, le=1)
    max_model_len: int | None = _setting(None, "context length limit (default: the model's)", ge=16)
    retriever: str = _setting("auto", "search backend: faiss, or torch (exact matmul on the model's device); auto "
                              "picks torch for a flat index on a GPU", choices=("auto", "faiss", "torch"))
    retrieval_mode: str = _setting(
        "dense", "retrieval mode of requests that choose none (retrieval.mode; /retrieve: mode): dense (the model's "
        "query vector) or hybrid (dense and BM25 fused by reciprocal rank; every index must have its BM25 side "
        "index, which index_builder build and update write)", choices=RETRIEVAL_MODES)
    attention_backend: str = _setting("auto", "attention kernels (auto: flash on a GPU with flash-attn, else sdpa)",
                                      choices=("auto", "sdpa", "flash"))
    linear_backend: str = _setting("auto", "projection kernels: onednn (prepacked weights, CPU) or aten; auto picks "
                                   "onednn on the CPU", choices=LINEAR_BACKENDS)
    seed: int = _setting(0, "seed of the engine's sampling RNG (requests with their own seed use theirs)", ge=0)
    cuda_graphs: bool = _setting(False, "replay CUDA graphs for decode steps (CUDA + flash backend)")
    enable_prefix_caching: bool = _setting(
        True, "automatic prefix caching: a request shares the KV cache blocks of the longest prefix (whole blocks) "
        "already computed for an earlier one (a system prompt, a resent conversation) instead of prefilling it again")
    index_mmap: bool = _setting(
        True, "memory-map each index's index.faiss instead of reading it: replicas on one host share its pages "
        "through the page cache instead of each holding a copy (every index type with faiss-cpu 1.15; an older FAISS "
        "maps IVF inverted lists only; --retriever torch copies the vectors to the model's device anyway)")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, m = getattr(self, f.name), f.metadata
            if value is None or isinstance(value, bool) or not m:
                continue
            if m["choices"] and isinstance(value, str) and value not in m["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(m['choices'])}, got {value!r}")
            if m["ge"] is not None and value < m["ge"]:
                raise ValueError(f"{f.name} must be >= {m['ge']}, got {value}")
            if m["gt"] is not None and value <= m["gt"]:
                raise ValueError(f"{f.name} must be > {m['gt']}, got {value}")
            if m["le"] is not None and value > m["le"]:
                raise ValueError(f"{f.name} must be <= {m['le']}, got {value}")
        check_device(self.device)


def step_token_budget(config: EngineConfig, device_type: str) -> int:
    """``max_num_batched_tokens``, or its default for where the engine runs."""
    if config.max_num_batched_tokens is not None:
        return config.max_num_batched_tokens
    return STEP_BUDGET_GPU if device_type == "cuda" else STEP_BUDGET_CPU


def check_device(device: str) -> str:
    """``auto`` or a torch device string (``cpu``, ``cuda``, ``cuda:1``); ValueError otherwise."""
    if device != "auto":
        import torch  # here: the server's settings read this module without loading torch

        try:
            torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r} is not a torch device: {e}") from None
    return device
