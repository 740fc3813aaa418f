"""Where the model runs and in what dtype: the one reading of ``--device`` and ``--dtype``.

The engine, the encoder, the index builder, the ranks of a distributed run
(``distributed.RankContext``) and training's mixed precision all resolve through here,
so ``auto`` means the same everywhere: CUDA when there is a GPU, else the CPU; and on a
GPU bfloat16 where it is supported, else float16, and float32 on the CPU. Nothing here
imports the model code.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device, *, local_rank: int | None = None) -> torch.device:
    """``auto`` is CUDA when available, else the CPU. A bare ``cuda`` is ``cuda:<local_rank>`` (modulo the
    visible devices) when the caller is one rank of several. ``ValueError`` for a device that is not one
    (``cuda`` on a machine without CUDA, an unknown name)."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def auto_dtype(device: torch.device) -> torch.dtype:
    """What ``auto`` computes in on ``device``: bfloat16 on a GPU that supports it, float16 on one that does not,
    float32 on the CPU (bfloat16 there is fast only on some CPUs, so it is asked for, never assumed)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A dtype name (``auto``, ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``) for ``device``;
    ``ValueError`` for any other."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
