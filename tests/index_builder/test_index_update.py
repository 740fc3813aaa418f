"""Index versions and ``update``: only the changed documents are encoded, every other vector is carried over
bit for bit, a crash at any step of publishing leaves the old version serving, a SIGKILLed update resumes,
and incompatible updates are refused before anything is published."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest
from ib_data import kill_after_shards, make_records, write_jsonl

from index_builder import BuildConfig, build_index
from index_builder.cli import main
from index_builder.update import PUBLISH_STEPS, UpdateConfig, update_index
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import Document, IndexStore, resolve_version, write_index_dir
from onegen_core.retrieval.encoder import Encoder
from onegen_core.text.rendering import Renderer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_index(tiny_checkpoint, tmp_path_factory) -> Path:
    """A plain flat index of 30 documents (d0..d29), built in shards of 8; tests copy it."""
    d = tmp_path_factory.mktemp("update-base")
    corpus = write_jsonl(d / "corpus.jsonl", make_records(30, seed=1, max_words=30))
    out = d / "idx"
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[corpus], out=out, shard_size=8, device="cpu",
                            dtype="float32", progress=False))
    return out


def _copy(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "idx"
    shutil.copytree(base, out)
    return out


def _vectors_by_id(index_dir: Path) -> dict[str, np.ndarray]:
    """doc_id -> stored vector, read with plain FAISS and SQLite (independent of IndexStore)."""
    version_dir, _ = resolve_version(index_dir)
    index = faiss.read_index(str(version_dir / "index.faiss"))
    vecs = index.reconstruct_n(0, index.ntotal)
    with sqlite3.connect(version_dir / "docstore.sqlite") as con:
        rows = con.execute("SELECT vector_id, doc_id FROM documents ORDER BY vector_id").fetchall()
    assert [r[0] for r in rows] == list(range(index.ntotal))
    return {doc_id: vecs[vid] for vid, doc_id in rows}


def _texts(index_dir: Path) -> dict[str, str]:
    store = IndexStore.open(index_dir)
    return {d.id: d.text for d in store.docstore.get(list(range(store.manifest.count)))}


def _spy_encoded(monkeypatch) -> list[int]:
    """Documents encoded (vectors taken), counted at the encoder."""
    count = [0]
    real = Encoder.encode_sorted

    def spy(self, seqs, positions, **kw):
        count[0] += sum(len(p) for p in positions)
        return real(self, seqs, positions, **kw)

    monkeypatch.setattr(Encoder, "encode_sorted", spy)
    return count


def _changes(tmp_path: Path) -> tuple[Path, Path]:
    corpus = write_jsonl(tmp_path / "changes.jsonl", [
        {"id": "d3", "text": "the river flows to the sea, corrected"},
        {"id": "new0", "text": "zorblat lives in paris"},
        {"id": "new1", "text": "mirelle plays harp", "title": "Harp"},
    ])
    deletes = tmp_path / "delete.txt"
    deletes.write_text("d5\n\nd7\n")
    return corpus, deletes


def _cfg(tiny_checkpoint, index: Path, corpus: Path | None, deletes: Path | None, **kw) -> UpdateConfig:
    return UpdateConfig(index=index, checkpoint=tiny_checkpoint, corpus=[corpus] if corpus else [], delete=deletes,
                        device="cpu", progress=False, **kw)


def test_update_encodes_only_what_changed(tiny_checkpoint, base_index, tmp_path, monkeypatch):
    idx = _copy(base_index, tmp_path)
    before = _vectors_by_id(idx)
    old_bytes = (idx / "index.faiss").read_bytes()
    corpus, deletes = _changes(tmp_path)
    encoded = _spy_encoded(monkeypatch)

    r = update_index(_cfg(tiny_checkpoint, idx, corpus, deletes))

    assert encoded[0] == 3 and r.documents_encoded == 3, "only the three changed documents are encoded"
    assert (r.base_version, r.version, r.added, r.replaced, r.deleted) == (None, 2, 2, 1, 2)
    assert (idx / "CURRENT").read_text() == "000002\n"
    assert not (idx / "manifest.json").exists(), "a converted plain directory keeps only versions/ and CURRENT"
    assert (idx / "versions/000001/index.faiss").read_bytes() == old_bytes, "version 1 is the plain directory"
    assert not idx.with_name("idx.updating").exists()

    after = _vectors_by_id(idx)
    assert set(after) == (set(before) - {"d5", "d7"}) | {"new0", "new1"}
    for doc_id in set(before) - {"d3", "d5", "d7"}:
        assert after[doc_id].tobytes() == before[doc_id].tobytes(), f"{doc_id} was not carried over bit for bit"
    assert after["d3"].tobytes() != before["d3"].tobytes()
    texts = _texts(idx)
    assert texts["d3"] == "the river flows to the sea, corrected" and texts["new1"] == "mirelle plays harp"
    store = IndexStore.open(idx)
    assert (store.version, store.manifest.count, store.path) == (2, 30, idx / "versions/000002")
    # a replaced document's new vector is the encoder's
    enc = Encoder.from_checkpoint(tiny_checkpoint, dtype="float32", device="cpu")
    seq = Renderer.for_checkpoint(load_checkpoint(tiny_checkpoint)).document("mirelle plays harp", "Harp")
    fresh = enc.encode_sorted([seq], [[len(seq) - 1]])[0]
    np.testing.assert_allclose(after["new1"], fresh, atol=1e-5)

    # a second update, deletion only: nothing is encoded; --keep 2 removes version 1
    encoded[0] = 0
    only = tmp_path / "only.txt"
    only.write_text("new0\n")
    r2 = update_index(_cfg(tiny_checkpoint, idx, None, only, keep=2))
    assert (encoded[0], r2.version, r2.count, r2.removed_versions) == (0, 3, 29, [1])
    assert sorted(p.name for p in (idx / "versions").iterdir()) == ["000002", "000003"]
    after3 = _vectors_by_id(idx)
    assert all(after3[k].tobytes() == after[k].tobytes() for k in after3)


@pytest.mark.parametrize("factory", ["hnsw", "IVF2,Flat"])
def test_exact_graph_and_ivf_indexes_update(tiny_checkpoint, tmp_path, factory):
    """HNSW and IVF-Flat store vectors uncompressed: they are carried over bit for bit into the base's
    emptied index (its IVF training and search settings kept)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_records(100, seed=5, max_words=12))
    idx = tmp_path / "idx"
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[corpus], out=idx, index=factory, device="cpu",
                            dtype="float32", progress=False))
    before = _vectors_by_id(idx)
    changes, deletes = _changes(tmp_path)
    r = update_index(_cfg(tiny_checkpoint, idx, changes, deletes))
    after = _vectors_by_id(idx)
    assert (r.documents_encoded, r.count) == (3, 100)
    assert all(after[k].tobytes() == before[k].tobytes() for k in set(before) - {"d3", "d5", "d7"})
    old = faiss.read_index(str(idx / "versions/000001/index.faiss"))
    new = faiss.read_index(str(idx / "versions/000002/index.faiss"))
    assert type(faiss.downcast_index(new)) is type(faiss.downcast_index(old))
    hits = IndexStore.open(idx).search(after["new0"][None], 1)[1][0]
    assert IndexStore.open(idx).docstore.get([int(hits[0])])[0].id == "new0"


def test_update_replaces_every_chunk_of_a_document(tiny_checkpoint, tmp_path, monkeypatch):
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "long", "text": long_text}, {"id": "short", "text": "paris"}])
    idx = tmp_path / "idx"
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[corpus], out=idx, chunk_tokens=12, device="cpu",
                            dtype="float32", progress=False))
    n_long = IndexStore.open(idx).manifest.count - 1
    assert n_long > 2, "the long document should be chunked"
    changes = write_jsonl(tmp_path / "u.jsonl", [{"id": "long", "text": "now short"}])
    encoded = _spy_encoded(monkeypatch)
    update_index(_cfg(tiny_checkpoint, idx, changes, None))
    store = IndexStore.open(idx)
    docs = store.docstore.get(list(range(store.manifest.count)))
    assert encoded[0] == 1 and store.manifest.count == 2
    assert sorted((d.source or d.id, d.text) for d in docs) == [("long", "now short"), ("short", "paris")]


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_a_crash_while_publishing_leaves_the_old_version_serving(tiny_checkpoint, base_index, tmp_path, step):
    idx = _copy(base_index, tmp_path)
    corpus, deletes = _changes(tmp_path)
    old = _texts(idx)

    class Crash(Exception):
        pass

    def crash(at: str) -> None:
        if at == step:
            raise Crash(at)

    with pytest.raises(Crash):
        update_index(_cfg(tiny_checkpoint, idx, corpus, deletes), on_step=crash)
    switched = PUBLISH_STEPS.index(step) > PUBLISH_STEPS.index("switch")
    seen = _texts(idx)
    assert ("new0" in seen) == switched, f"crash before {step}: readers must see the {'new' if switched else 'old'}"
    if not switched:
        assert seen == old
    # the rerun finishes the interrupted update, encoding nothing again
    r = update_index(_cfg(tiny_checkpoint, idx, corpus, deletes))
    assert (r.version, r.documents_encoded) == (2, 0)
    assert set(_texts(idx)) == (set(old) - {"d5", "d7"}) | {"new0", "new1"}
    assert not (idx / "manifest.json").exists() and not idx.with_name("idx.updating").exists()


def test_sigkill_midway_then_rerun(tiny_checkpoint, tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_records(20, seed=2, max_words=20))
    base = tmp_path / "base"
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[corpus], out=base, shard_size=5, device="cpu",
                            dtype="float32", progress=False))
    n_changes = 200
    changes = write_jsonl(tmp_path / "u.jsonl", make_records(n_changes, seed=4, max_words=40, prefix="u"))
    ref, idx = tmp_path / "ref", tmp_path / "idx"
    shutil.copytree(base, ref)
    shutil.copytree(base, idx)
    shards = tmp_path / "idx.updating" / "delta.building" / "shards"
    kill_after_shards(["update", "--index", str(idx), "--checkpoint", str(tiny_checkpoint), "--corpus", str(changes),
                       "--device", "cpu", "--quiet"], shards, REPO)
    done = len(list(shards.glob("*.npy")))
    assert 3 <= done < n_changes // 5, "the kill should land midway"
    assert resolve_version(idx) == (idx, None), "an interrupted update publishes nothing"

    encoded = _spy_encoded(monkeypatch)
    r = update_index(_cfg(tiny_checkpoint, idx, changes, None))
    assert r.documents_encoded == encoded[0] <= n_changes - 5 * done, "finished shards are not encoded again"
    assert r.count == 20 + n_changes
    update_index(_cfg(tiny_checkpoint, ref, changes, None))
    got, want = _vectors_by_id(idx), _vectors_by_id(ref)
    assert got.keys() == want.keys()
    assert all(got[k].tobytes() == want[k].tobytes() for k in want), "a resumed update equals an uninterrupted one"


def test_refusals_publish_nothing(tiny_checkpoint, tiny_checkpoint_factory, base_index, tmp_path, capsys):
    idx = _copy(base_index, tmp_path)
    corpus, _ = _changes(tmp_path)
    listing = sorted(p.name for p in idx.iterdir())

    def update(*args: str) -> int:
        return main(["update", "--index", str(idx), "--device", "cpu", "--quiet", *args])

    other = tiny_checkpoint_factory("llama", key="update-other-weights", seed=7)
    assert update("--checkpoint", str(other), "--corpus", str(corpus)) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert update("--checkpoint", str(tiny_checkpoint), "--corpus", str(corpus), "--dtype", "bfloat16") == 2
    assert "encoded in float32" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("d1\nnot-there\n")
    assert update("--checkpoint", str(tiny_checkpoint), "--delete", str(bad)) == 2
    assert f"{bad}:2: id 'not-there' is not in the index" in capsys.readouterr().err
    assert not idx.with_name("idx.updating").exists(), "a wrong argument leaves no work to resume"
    both = tmp_path / "both.txt"
    both.write_text("d3\n")
    assert update("--checkpoint", str(tiny_checkpoint), "--corpus", str(corpus), "--delete", str(both)) == 2
    assert f"{both}:1: id 'd3' is both deleted and in --corpus" in capsys.readouterr().err
    assert not idx.with_name("idx.updating").exists()
    assert update("--checkpoint", str(tiny_checkpoint)) == 2
    assert "--corpus" in capsys.readouterr().err
    assert sorted(p.name for p in idx.iterdir()) == listing and resolve_version(idx) == (idx, None)

    # a compressed index cannot carry its vectors over bit for bit
    m = IndexStore.open(idx).manifest
    sq = write_index_dir(tmp_path / "sq", np.random.default_rng(0).standard_normal((64, m.dim)).astype(np.float32),
                         [Document(id=f"x{i}", text="t") for i in range(64)], checkpoint_fingerprint=m.checkpoint_fingerprint, factory="SQ8", encode_dtype="float32")
    assert main(["update", "--index", str(sq), "--checkpoint", str(tiny_checkpoint), "--corpus", str(corpus),
                 "--device", "cpu", "--quiet"]) == 2
    assert "compressed index (SQ8)" in capsys.readouterr().err
    assert not (sq / "CURRENT").exists()


def test_info_lists_versions_and_plain_dirs_still_load(tiny_checkpoint, base_index, tmp_path, capsys):
    assert IndexStore.open(base_index).version is None
    idx = _copy(base_index, tmp_path)
    corpus, deletes = _changes(tmp_path)
    assert main(["update", "--index", str(idx), "--checkpoint", str(tiny_checkpoint), "--corpus", str(corpus),
                 "--delete", str(deletes), "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "published version 2" in out and "2 added, 1 replaced, 2 deleted; encoded 3 documents" in out
    assert main(["info", str(idx)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("version")]
    assert len(lines) == 2
    assert lines[0].startswith("version      1   30 vectors") and lines[0].endswith("build")
    assert lines[1].startswith("version      2 * 30 vectors")
    assert "update of 1: +2 ~1 -2 documents, 3 vectors encoded" in lines[1]
    assert faiss.read_index(str(idx / "versions/000002/index.faiss")).ntotal == 30
