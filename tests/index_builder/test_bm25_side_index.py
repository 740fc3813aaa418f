"""The builder's BM25 side index (issue #20 item 5): ``build`` writes one that loads without pickle and finds a
document by its own word, ``--no-bm25`` skips it, a missing ``bm25s`` stops the build in one line before any work,
and ``update`` keeps it in step: a deleted document is never returned, a replaced one is found by its new words
only, a new one by its unique word, and a plain directory converted to version 1 keeps its side index."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from ib_data import make_records, write_jsonl

from index_builder import BuildConfig, build_index
from index_builder.cli import main
from index_builder.update import UpdateConfig, update_index
from onegen_core.formats.index_store import IndexStore, resolve_version
from onegen_core.retrieval.bm25 import BM25_DIR, BM25Retriever, BM25UnavailableError

UNIQUE = {"u0": "obsoletium", "u1": "quillfeather", "u2": "marrowgate"}  # one word found in one document only


def _corpus(path: Path) -> Path:
    records = make_records(12, seed=3, max_words=15)
    records += [{"id": doc_id, "text": f"the {word} lives by the river"} for doc_id, word in UNIQUE.items()]
    return write_jsonl(path, records)


@pytest.fixture(scope="module")
def bm25_index(tiny_checkpoint, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bm25-build")
    out = d / "idx"
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[_corpus(d / "corpus.jsonl")], out=out,
                            shard_size=8, device="cpu", dtype="float32", progress=False))
    return out


def _top(index_dir: Path, query: str, k: int = 3) -> list[str]:
    return [h.doc_id for h in BM25Retriever.open(IndexStore.open(index_dir)).search([query], k)[0]]


def test_build_writes_a_side_index_that_loads_without_pickle(bm25_index):
    store = IndexStore.open(bm25_index)
    record = store.manifest.bm25
    assert record is not None and record["documents"] == store.manifest.count == 15
    assert record["document_template"] == "{text}"  # the tiny checkpoint's document template
    for p in (bm25_index / BM25_DIR).iterdir():
        assert p.suffix in (".npy", ".json"), p
        if p.suffix == ".npy":
            np.load(p, allow_pickle=False)
        else:
            json.loads(p.read_text())
    for doc_id, word in UNIQUE.items():
        assert _top(bm25_index, word) == [doc_id]
    hits = BM25Retriever.open(store).search(["obsoletium"], 1)[0]
    assert store.docstore.get([hits[0].vector_id])[0].id == "u0", "a hit's vector id is its docstore row"


def test_no_bm25_skips_it(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "idx"
    rc = main(["build", "--checkpoint", str(tiny_checkpoint), "--corpus", str(_corpus(tmp_path / "c.jsonl")),
               "--out", str(out), "--device", "cpu", "--dtype", "float32", "--no-bm25", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    store = IndexStore.open(out)
    assert store.manifest.bm25 is None and not (out / BM25_DIR).exists()
    assert "bm25" not in json.loads((out / "manifest.json").read_text())
    with pytest.raises(BM25UnavailableError, match="no BM25 side index"):
        BM25Retriever.open(store)
    main(["info", str(out)])
    assert "hybrid retrieval is unavailable" in capsys.readouterr().out


def test_missing_bm25s_stops_before_any_work(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bm25s", None)  # import bm25s raises ImportError
    out = tmp_path / "idx"
    rc = main(["build", "--checkpoint", str(tiny_checkpoint), "--corpus", str(_corpus(tmp_path / "c.jsonl")),
               "--out", str(out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "pip install 'onegen[default-model]'" in err and "--no-bm25" in err
    assert not out.exists() and not out.with_name("idx.building").exists()


def test_update_keeps_bm25_in_step(tiny_checkpoint, bm25_index, tmp_path):
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(bm25_index, idx)
    changes = write_jsonl(tmp_path / "changes.jsonl", [
        {"id": "u1", "text": "a harbour called saltmere"},  # replaced: its old unique word goes
        {"id": "new0", "text": "zanzibarite crystals glow"},
    ])
    deletes = tmp_path / "delete.txt"
    deletes.write_text("u0\n")
    update_index(UpdateConfig(index=idx, checkpoint=tiny_checkpoint, corpus=[changes], delete=deletes, device="cpu",
                              progress=False))
    store = IndexStore.open(idx)
    assert store.version == 2 and store.manifest.bm25["documents"] == store.manifest.count == 15
    assert _top(idx, "obsoletium") == [], "a deleted document is never returned"
    assert _top(idx, "quillfeather") == [] and _top(idx, "saltmere") == ["u1"]
    assert _top(idx, "zanzibarite") == ["new0"] and _top(idx, "marrowgate") == ["u2"]
    hits = BM25Retriever.open(store).search(["saltmere zanzibarite marrowgate"], 5)[0]
    assert all(store.docstore.get([h.vector_id])[0].id == h.doc_id for h in hits) and len(hits) == 3
    # the plain directory became version 1, side index included, and lost its plain files
    v1, _ = resolve_version(idx / "versions" / "000001")
    assert _top(v1, "obsoletium") == ["u0"]
    assert not (idx / BM25_DIR).exists() and not (idx / "manifest.json").exists()


def test_update_with_and_without_bm25(tiny_checkpoint, tmp_path):
    """An index built without a side index gets one from its next update; ``update --no-bm25`` drops it."""
    idx = tmp_path / "idx"
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[_corpus(tmp_path / "c.jsonl")], out=idx,
                            device="cpu", dtype="float32", bm25=False, progress=False))
    deletes = tmp_path / "delete.txt"
    deletes.write_text("u2\n")
    update_index(UpdateConfig(index=idx, checkpoint=tiny_checkpoint, delete=deletes, device="cpu", progress=False))
    assert _top(idx, "quillfeather") == ["u1"] and _top(idx, "marrowgate") == []
    deletes.write_text("u1\n")
    rc = main(["update", "--index", str(idx), "--checkpoint", str(tiny_checkpoint), "--delete", str(deletes),
               "--device", "cpu", "--no-bm25", "--quiet"])
    assert rc == 0
    store = IndexStore.open(idx)
    assert store.version == 3 and store.manifest.bm25 is None and not (store.path / BM25_DIR).exists()
    with pytest.raises(BM25UnavailableError):
        BM25Retriever.open(store)
