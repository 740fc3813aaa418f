"""A failing search fails the requests of its batch (``finish_reason="error"``), never the engine."""

from __future__ import annotations

import sqlite3

import numpy as np
import torch
from core_test_data import PROMPTS

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.outputs import Finished, RetrievalHit
from onegen_core.engine.params import RetrievalParams, SamplingParams


class FlakyRetriever:
    """The ``Retriever`` protocol over a real retriever, whose next ``fail`` searches raise."""

    def __init__(self, inner, fail: int = 1):
        self.inner = inner
        self.dim = inner.dim
        self.fail = fail
        self.calls = 0

    def __len__(self) -> int:
        return len(self.inner)

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> list[list[RetrievalHit]]:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise sqlite3.DatabaseError("database disk image is malformed")
        return self.inner.search(queries, k)


def _run(engine: Engine, prompts: list[str]) -> dict[str, Finished]:
    ids = [engine.add_request(p, sampling=SamplingParams(max_tokens=24),
                              retrieval=RetrievalParams(max_retrievals=2, k=1)) for p in prompts]
    done: dict[str, Finished] = {}
    for _ in range(500):
        if len(done) == len(ids):
            break
        for ev in engine.step():
            if isinstance(ev, Finished):
                done[ev.request_id] = ev
    assert not engine.has_unfinished() and engine.sequences == {}
    return {i: done[i] for i in ids}


def test_a_failed_search_fails_its_batch_and_the_engine_keeps_serving(retrieving_checkpoint, tiny_index):
    engine = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(num_kv_blocks=256, block_size=8))
    flaky = FlakyRetriever(engine.retriever, fail=1)
    engine.retriever = flaky
    # the fixture model retrieves on most of these prompts; run them together so one search batches several
    first = _run(engine, PROMPTS[:6])
    assert flaky.calls >= 1
    failed = [f for f in first.values() if f.reason == "error"]
    assert failed, "the first search raised, so its requests must finish with an error"
    for f in failed:
        assert f.result.finish_reason == "error"
        assert f.result.error == "retrieval failed: DatabaseError: database disk image is malformed"
    assert all(f.reason in ("stop", "length") for f in first.values() if f not in failed)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks  # the failed requests freed their cache

    # the same prompts again on the same engine: every search succeeds now
    again = _run(engine, PROMPTS[:6])
    assert all(f.reason in ("stop", "length") and f.result.error is None for f in again.values())
    assert sum(len(f.result.retrievals) for f in again.values()) >= 1


def test_an_index_encoded_in_another_dtype_is_named_in_a_warning(retrieving_checkpoint, tmp_path, caplog):
    import logging

    import numpy as np

    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.formats.index_store import Document, write_index_dir

    ckpt = load_checkpoint(retrieving_checkpoint)
    docs = [Document(id=f"d{i}", text=f"text {i}") for i in range(3)]
    vecs = np.eye(3, ckpt.config.hidden_size, dtype=np.float32)
    for encoded, warned in (("bfloat16", True), ("float32", False), (None, False)):
        idx = write_index_dir(tmp_path / f"idx-{encoded}", vecs, docs, checkpoint_fingerprint=ckpt.fingerprint,
                              special_token_ids=ckpt.token_ids.by_name, encode_dtype=encoded)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="onegen_core.engine"):
            Engine.from_checkpoint(ckpt, idx, EngineConfig(dtype="float32", num_kv_blocks=16, block_size=8))
        hits = [r.getMessage() for r in caplog.records if "encoded in" in r.getMessage()]
        assert bool(hits) == warned, (encoded, hits)
        if warned:
            assert "bfloat16" in hits[0] and "float32" in hits[0]
