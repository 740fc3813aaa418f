"""Fixtures for engine tests: a tiny model that emits its query token, and a tiny index."""

from __future__ import annotations

import pytest
from core_test_data import CORPUS

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import Document, write_index_dir
from onegen_core.retrieval.encoder import Encoder
from onegen_core.testing import build_tiny_checkpoint, make_query_token_likely


@pytest.fixture(scope="session")
def retrieving_checkpoint(tmp_path_factory):
    """A tiny Llama whose greedy outputs contain [RQ] (its LM-head row copies a frequent token's)."""
    d = build_tiny_checkpoint(tmp_path_factory.mktemp("retrieving") / "ckpt", arch="llama", seed=1)
    make_query_token_likely(d, rank=0)
    return d


@pytest.fixture(scope="session")
def tiny_index(retrieving_checkpoint, tmp_path_factory):
    ckpt = load_checkpoint(retrieving_checkpoint)
    enc = Encoder.from_checkpoint(ckpt)
    docs = [Document(id=f"doc{i}", text=t, title=f"T{i}") for i, t in enumerate(CORPUS)]
    vecs = enc.encode_documents([(d.text, d.title) for d in docs])
    return write_index_dir(tmp_path_factory.mktemp("index") / "idx", vecs, docs,
                           checkpoint_fingerprint=ckpt.fingerprint,
                           special_token_ids=ckpt.token_ids.by_name)
