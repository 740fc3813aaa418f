"""Session-wide fixtures: tiny random checkpoints built offline (no model hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory):
    """Build (once per arch/spec key) a tiny random checkpoint dir; returns its path."""
    from onegen_core.testing import build_tiny_checkpoint

    cache: dict[str, object] = {}

    def make(arch: str = "llama", spec=None, key: str | None = None, **kw):
        k = key or f"{arch}-{spec.preset if spec else 'default'}-{sorted(kw.items())}"
        if k not in cache:
            d = tmp_path_factory.mktemp(f"ckpt-{arch}")
            cache[k] = build_tiny_checkpoint(d, arch=arch, spec=spec, **kw)
        return cache[k]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_factory):
    """The default tiny Llama checkpoint ([RQ] insert, [RD], <paragraph> delimiters)."""
    return tiny_checkpoint_factory("llama")
