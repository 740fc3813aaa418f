"""Index directories whose names hold URI-significant characters (``#``, ``%``, ``?``, spaces).

The docstore is opened through a SQLite ``file:`` URI; an unescaped ``#`` starts the URI's
fragment, so ``idx#1/docstore.sqlite`` used to open (and create) a file named ``idx`` next
to the index, and the first search failed with "no such table".
"""

from __future__ import annotations

from ib_data import make_records, write_jsonl

from index_builder import BuildConfig, build_index
from index_builder.tools import index_info
from onegen_core.engine import Engine, EngineConfig
from onegen_core.formats.index_store import Document, IndexStore, write_index_dir
from onegen_core.retrieval.retriever import FaissRetriever

ODD_NAME = "idx#1 %20?x"


def test_builder_and_engine_open_an_index_dir_with_uri_characters(tiny_checkpoint, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_records(12))
    parent = tmp_path / "indexes"
    parent.mkdir()
    out = parent / ODD_NAME
    # the builder stages documents in SQLite and ATTACHes the staged store when merging
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[corpus], out=out, shard_size=8, device="cpu",
                            progress=False))
    assert index_info(out)["docstore_rows"] == 12

    engine = Engine.from_checkpoint(tiny_checkpoint, out, EngineConfig(num_kv_blocks=32, block_size=8))
    hits = engine.search(["text of document 3"], k=3, return_text=True)
    assert len(hits[0]) == 3 and all(h.doc_id and h.text for h in hits[0])
    # nothing was created beside the index directory (the build's work dir is removed on success)
    assert sorted(p.name for p in parent.iterdir()) == [ODD_NAME]


def test_index_store_reads_the_docstore_of_a_written_index_dir(tmp_path):
    import numpy as np

    parent = tmp_path / "indexes"
    parent.mkdir()
    vecs = np.eye(4, dtype=np.float32)
    docs = [Document(id=f"d{i}", text=f"passage {i}", title=f"T{i}") for i in range(4)]
    out = write_index_dir(parent / ODD_NAME, vecs, docs, checkpoint_fingerprint="fp")
    store = IndexStore.open(out, expected_fingerprint="fp")
    assert len(store.docstore) == 4
    hits = FaissRetriever(store).search(vecs[[2]], 1)
    assert [(h.doc_id, h.text) for h in hits[0]] == [("d2", "passage 2")]
    assert sorted(p.name for p in parent.iterdir()) == [ODD_NAME]
