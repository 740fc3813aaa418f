"""Builds end to end: the index equals the engine's own encodings, searched the engine's way."""

from __future__ import annotations

import json
import sqlite3

import faiss
import numpy as np
import pytest
from ib_data import make_records, write_jsonl

from index_builder import BuildConfig, build_index
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import Document, IndexStore
from onegen_core.retrieval.retriever import FaissRetriever, TorchRetriever


def _rows(index_dir):
    with sqlite3.connect(index_dir / "docstore.sqlite") as con:
        return con.execute(
            "SELECT vector_id, doc_id, title, text, metadata, source, start, end FROM documents ORDER BY vector_id"
        ).fetchall()


def test_round_trip_plain_faiss_and_engine_retriever(flat_index, small_corpus, tiny_checkpoint, encoder):
    records = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    # plain FAISS opens it; ids are docstore vector ids in corpus order
    index = faiss.read_index(str(flat_index / "index.faiss"))
    assert index.ntotal == len(records) and index.d == 64
    rows = _rows(flat_index)
    assert [r[1] for r in rows] == [r["id"] for r in records] and [r[0] for r in rows] == list(range(len(records)))
    assert rows[0][2] == "Title 0" and json.loads(rows[0][4]) == {"n": 0} and rows[1][2] is None
    # the stored vectors are the engine's encodings of the same documents
    engine_vecs = encoder.encode_documents([(r["text"], r.get("title")) for r in records])
    stored = index.reconstruct_n(0, index.ntotal)
    np.testing.assert_allclose(stored, engine_vecs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    # the engine's FAISS retriever returns the same top-k as brute force over the engine's encodings
    queries = encoder.encode_queries(["capital of france", "the lazy dog", "who wrote the book", "harp"])
    docs = [Document(r["id"], r["text"], r.get("title")) for r in records]
    brute = TorchRetriever(engine_vecs, docs).search(queries, 5)
    store = IndexStore.open(flat_index, expected_fingerprint=load_checkpoint(tiny_checkpoint).fingerprint)
    got = FaissRetriever(store).search(queries, 5)
    assert [[h.doc_id for h in hits] for hits in got] == [[h.doc_id for h in hits] for hits in brute]
    for g, b in zip(got, brute, strict=True):
        np.testing.assert_allclose([h.score for h in g], [h.score for h in b], atol=1e-5)
    assert got[0][0].text == next(r["text"] for r in records if r["id"] == got[0][0].doc_id)


def test_manifest_contract(flat_index, small_corpus, tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    m = json.loads((flat_index / "manifest.json").read_text())
    assert m["checkpoint_fingerprint"] == ckpt.fingerprint
    assert m["special_token_ids"] == ckpt.token_ids.by_name and "[RD]" in m["special_token_ids"]
    assert (m["dim"], m["count"], m["metric"], m["normalized"], m["factory"]) == (64, 60, "inner_product", True, "Flat")
    assert m["corpus_digest"].startswith("sha256:") and m["build_time"].endswith("Z")
    assert m["extra"]["builder"]["shard_size"] == 16 and m["extra"]["train_size"] is None
    assert m["extra"]["corpus"]["source_documents"] == 60
    assert m["bm25"]["documents"] == 60 and m["bm25"]["path"] == "bm25"
    assert sorted(p.name for p in flat_index.iterdir()) == ["bm25", "docstore.sqlite", "index.faiss", "manifest.json"]
    assert not flat_index.with_name(flat_index.name + ".building").exists()


def test_length_bucketed_encoding_equals_one_sequence_per_forward(encoder):
    """The builder's encode path (``Encoder.encode_sorted``; its buckets: tests/core/test_bucketing.py)."""
    seqs = [encoder.renderer.document(f"document number {i} " * n) for i, n in enumerate([1, 9, 3, 6])]
    calls = []
    out = encoder.encode_sorted(seqs, batch_tokens=64, batch_size=2, progress=calls.append)
    ref = encoder.encode_token_ids(seqs, batch_tokens=1).numpy()  # one sequence per forward, input order
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert sum(calls) == len(seqs) and max(calls) <= 2


def test_hnsw_and_ivfpq_train_on_a_sample(tiny_checkpoint, tmp_path, encoder):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_records(300, seed=1, max_words=12))
    common = dict(checkpoint=tiny_checkpoint, corpus=[corpus], device="cpu", progress=False, shard_size=128)
    hnsw = build_index(BuildConfig(out=tmp_path / "hnsw", index="hnsw", ef_search=32, **common))
    ivf = build_index(BuildConfig(out=tmp_path / "ivf", index="ivfpq", train_size=280, nprobe=2, **common))
    assert hnsw.factory == "HNSW32" and ivf.factory.startswith("IVF") and ivf.factory.endswith(",PQ32np")
    m = json.loads((tmp_path / "ivf" / "manifest.json").read_text())
    assert m["extra"]["train_size"] == 280 and m["extra"]["search_defaults"] == {"nprobe": 2}
    assert json.loads((tmp_path / "hnsw" / "manifest.json").read_text())["extra"]["search_defaults"] == {
        "efSearch": 32}
    h = faiss.read_index(str(tmp_path / "hnsw" / "index.faiss"))
    assert h.hnsw.efSearch == 32 and h.ntotal == 300
    i = faiss.read_index(str(tmp_path / "ivf" / "index.faiss"))
    assert faiss.extract_index_ivf(i).nprobe == 2 and i.ntotal == 300
    # HNSW stores the vectors exactly: a document's own vector finds it first
    q = h.reconstruct_n(0, 10)
    _, ids = h.search(q, 1)
    assert ids[:, 0].tolist() == list(range(10))


def test_chunked_build_keeps_sources_and_offsets(tiny_checkpoint, tmp_path, encoder):
    long_text = " ".join(f"fact {i}: the river flows to the sea near Paris." for i in range(30))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "long", "text": long_text, "title": "T"},
                                                {"id": "short", "text": "a short one"}])
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[corpus], out=tmp_path / "idx", chunk_tokens=48,
                            chunk_overlap=8, device="cpu", progress=False))
    rows = _rows(tmp_path / "idx")
    chunks = [r for r in rows if r[5] == "long"]
    assert len(chunks) > 3 and [r[1] for r in chunks] == [f"long#{k}" for k in range(len(chunks))]
    assert chunks[0][6] == 0 and all(r[7] - r[6] <= 48 for r in chunks) and chunks[1][6] == 40
    assert all(r[2] == "T" and r[3] in long_text for r in chunks)
    assert rows[-1][1:2] == ("short",) and rows[-1][5] is None
    stored = faiss.read_index(str(tmp_path / "idx" / "index.faiss")).reconstruct_n(0, len(rows))
    np.testing.assert_allclose(stored, encoder.encode_documents([(r[3], r[2]) for r in rows]), atol=1e-5)


def test_db_jsonl_and_folder_corpora_together(tiny_checkpoint, tmp_path):
    db = tmp_path / "db.jsonl"
    db.write_text(json.dumps({"uid": "u1", "messages": [{"role": "user", "content": "one.[RD]two.[RD]"}]}) + "\n")
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "x.md").write_text("# X\nthe x note")
    r = build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[db, folder], out=tmp_path / "idx",
                                device="cpu", progress=False))
    assert r.count == 3
    assert [(row[1], row[2], row[5]) for row in _rows(tmp_path / "idx")] == [
        ("u1-0", None, "u1"), ("u1-1", None, "u1"), ("x.md", "X", None)]


@pytest.mark.parametrize("policy", ["skip"])
def test_skip_invalid_reports_every_rejection(tiny_checkpoint, tmp_path, policy):
    recs = make_records(5)
    lines = [json.dumps(r) for r in recs] + ['{"id": "d1", "text": "dup"}', "{broken", '{"id": "e", "text": ""}']
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    r = build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[corpus], out=tmp_path / "idx",
                                on_invalid=policy, device="cpu", progress=False))
    assert (r.count, r.rejected) == (5, 3)
    rejected = [json.loads(x) for x in (tmp_path / "idx" / "rejected.jsonl").read_text().splitlines()]
    assert [x["origin"] for x in rejected] == [f"{corpus}:6", f"{corpus}:7", f"{corpus}:8"]
    assert "duplicate id 'd1'" in rejected[0]["reason"] and f"{corpus}:2" in rejected[0]["reason"]
    assert "malformed JSON" in rejected[1]["reason"] and "empty text" in rejected[2]["reason"]
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert m["extra"]["corpus"]["rejected"] == 3
