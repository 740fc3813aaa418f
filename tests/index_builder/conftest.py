"""Fixtures for the index builder's tests: small corpora written on the fly, one shared flat build."""

from __future__ import annotations

from pathlib import Path

import pytest
from ib_data import make_records, write_jsonl


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", make_records(60))


@pytest.fixture(scope="session")
def flat_index(tiny_checkpoint, small_corpus, tmp_path_factory) -> Path:
    """A flat index of ``small_corpus`` built in four shards."""
    from index_builder import BuildConfig, build_index

    out = tmp_path_factory.mktemp("indexes") / "flat"
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[small_corpus], out=out, shard_size=16,
                            device="cpu", progress=False))
    return out


@pytest.fixture(scope="session")
def encoder(tiny_checkpoint):
    """The engine's encoder over the tiny checkpoint (the reference the index must match)."""
    from onegen_core.retrieval.encoder import Encoder

    return Encoder.from_checkpoint(tiny_checkpoint, dtype="float32", device="cpu")
