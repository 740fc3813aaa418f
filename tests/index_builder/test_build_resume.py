"""Resumable and atomic builds: a SIGKILLed build resumes without redoing finished shards, and the
result equals an uninterrupted build's; changed settings are refused instead of mixed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from ib_data import kill_after_shards, make_records, write_jsonl

from index_builder import BuildConfig, BuildError, build_index
from index_builder import builder as builder_mod
from onegen_core.retrieval.encoder import Encoder

REPO = Path(__file__).resolve().parents[2]


def _rows(index_dir: Path) -> list[tuple]:
    with sqlite3.connect(index_dir / "docstore.sqlite") as con:
        return con.execute("SELECT * FROM documents ORDER BY vector_id").fetchall()


def _spy_shard_writes(monkeypatch) -> list[str]:
    written: list[str] = []
    real = builder_mod.save_npy_atomic

    def spy(path, array):
        written.append(path.name)
        real(path, array)

    monkeypatch.setattr(builder_mod, "save_npy_atomic", spy)
    return written


def _spy_encoded_sequences(monkeypatch) -> list[int]:
    count = [0]
    real = Encoder.encode_at_positions

    def spy(self, seqs, positions, **kw):
        count[0] += len(seqs)
        return real(self, seqs, positions, **kw)

    monkeypatch.setattr(Encoder, "encode_at_positions", spy)
    return count


def test_sigkill_midway_then_rerun(tiny_checkpoint, tmp_path, monkeypatch):
    n_docs, shard = 400, 10
    corpus = write_jsonl(tmp_path / "c.jsonl", make_records(n_docs, seed=3, max_words=40))
    out = tmp_path / "idx"
    cfg = dict(checkpoint=tiny_checkpoint, corpus=[corpus], shard_size=shard, device="cpu", progress=False)
    args = ["--checkpoint", str(tiny_checkpoint), "--corpus", str(corpus), "--out", str(out),
            "--shard-size", str(shard), "--device", "cpu", "--quiet"]
    shards = out.with_name("idx.building") / "shards"
    kill_after_shards(["build", *args], shards, REPO)
    done = {p.name for p in shards.glob("*.npy")}
    assert 3 <= len(done) < n_docs // shard, "the kill should land midway"
    assert not out.exists(), "an interrupted build must not publish its output"

    written = _spy_shard_writes(monkeypatch)
    encoded = _spy_encoded_sequences(monkeypatch)
    result = build_index(BuildConfig(out=out, **cfg))
    assert result.shards_reused == len(done) and result.shards == n_docs // shard
    assert set(written).isdisjoint(done) and len(written) == result.shards - len(done)
    assert encoded[0] == result.documents_encoded == n_docs - shard * len(done)

    ref = build_index(BuildConfig(out=tmp_path / "ref", **cfg))
    assert ref.shards_reused == 0
    assert (out / "index.faiss").read_bytes() == (tmp_path / "ref" / "index.faiss").read_bytes()
    assert _rows(out) == _rows(tmp_path / "ref")
    assert not out.with_name("idx.building").exists()


class _Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_build_refuses_other_settings_and_resumes_with_the_same(tiny_checkpoint, tmp_path,
                                                                           monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_records(50, seed=4))
    out = tmp_path / "idx"
    cfg = dict(checkpoint=tiny_checkpoint, corpus=[corpus], out=out, shard_size=10, device="cpu", progress=False)
    real = builder_mod.save_npy_atomic
    calls = [0]

    def crash_on_third(path, array):
        calls[0] += 1
        if calls[0] == 3:
            raise _Interrupt
        real(path, array)

    monkeypatch.setattr(builder_mod, "save_npy_atomic", crash_on_third)
    with pytest.raises(_Interrupt):
        build_index(BuildConfig(**cfg))
    monkeypatch.setattr(builder_mod, "save_npy_atomic", real)
    work = out.with_name("idx.building")
    assert not out.exists() and len(list((work / "shards").glob("*.npy"))) == 2

    with pytest.raises(BuildError, match=r"other settings \(chunk_tokens: None -> 32.*--restart"):
        build_index(BuildConfig(**cfg, chunk_tokens=32))
    # another index type only changes the merge: it resumes
    result = build_index(BuildConfig(**cfg, index="HNSW16"))
    assert (result.shards_reused, result.factory) == (2, "HNSW16") and not work.exists()


def test_restart_discards_and_a_held_lock_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_records(20, seed=5))
    out = tmp_path / "idx"
    cfg = dict(checkpoint=tiny_checkpoint, corpus=[corpus], out=out, shard_size=10, device="cpu", progress=False)
    monkeypatch.setattr(builder_mod, "save_npy_atomic", lambda path, array: (_ for _ in ()).throw(_Interrupt()))
    with pytest.raises(_Interrupt):
        build_index(BuildConfig(**cfg))
    monkeypatch.undo()
    holder = builder_mod.WorkDir(out)
    holder.lock()
    try:
        with pytest.raises(BuildError, match="another build of .* is running"):
            build_index(BuildConfig(**cfg))
    finally:
        holder.unlock()
    result = build_index(BuildConfig(**cfg, chunk_tokens=16, restart=True))
    assert result.shards_reused == 0 and out.is_dir()
