"""The BM25 side index (``onegen_core.retrieval.bm25``) on hand-written documents: its files load without pickle,
search finds a document by its own word, breaks ties by vector id and never returns a document that shares no
term; an index without one (the layout before it existed) still opens and says hybrid retrieval is unavailable;
the manifest field it adds leaves older manifests byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onegen_core.formats.index_store import (
    MANIFEST,
    Document,
    IndexError_,
    IndexStore,
    Manifest,
    write_index_dir,
)
from onegen_core.retrieval.bm25 import (
    BM25_DIR,
    BM25Index,
    BM25Retriever,
    BM25UnavailableError,
    document_text,
)
from onegen_core.testing import add_bm25_side_index

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    Document("paris", "Paris is the capital of France.", title="Paris"),
    Document("berlin", "Berlin is the capital of Germany.", title="Berlin"),
    Document("harp1", "Mirelle plays the harp.", title="Harp"),
    Document("harp2", "Mirelle plays the harp.", title="Harp"),  # the same document: ties with harp1
    Document("river", "The river flows to the sea.", metadata={"n": 1}),
    Document("harp3", "Mirelle plays the harp.", title="Harp"),
]


def _index(tmp_path: Path, docs: list[Document], template: str | None = "{title}\n{text}") -> Path:
    """A plain index dir (random vectors), with a BM25 side index unless ``template`` is None."""
    vecs = np.random.default_rng(0).standard_normal((len(docs), 8)).astype(np.float32)
    out = write_index_dir(tmp_path / "idx", vecs, docs, checkpoint_fingerprint="f" * 32)
    if template is not None:
        add_bm25_side_index(out, template)
    return out


def test_files_are_arrays_and_json_and_load_without_pickle(tmp_path):
    out = _index(tmp_path, DOCS)
    files = sorted(p.name for p in (out / BM25_DIR).iterdir())
    assert all(name.endswith((".npy", ".json")) for name in files), files
    for name in files:
        if name.endswith(".npy"):
            np.load(out / BM25_DIR / name, allow_pickle=False)  # raises on an object (pickled) array
        else:
            json.loads((out / BM25_DIR / name).read_text())
    record = IndexStore.open(out).manifest.bm25
    assert record["documents"] == len(DOCS) and record["terms"] > 0
    assert record["document_template"] == "{title}\n{text}" and record["path"] == BM25_DIR


def test_search_finds_by_word_breaks_ties_by_vector_id_and_skips_non_matches(tmp_path):
    retriever = BM25Retriever.open(IndexStore.open(_index(tmp_path, DOCS)))
    germany, harp, river, nothing, stop = retriever.search(
        ["capital of Germany", "who plays the harp", "river", "zorblat quenta", "the of is"], k=2)
    assert [h.doc_id for h in germany] == ["berlin", "paris"]  # paris shares "capital"; the rest share nothing
    assert germany[0].score > germany[1].score > 0
    assert germany[0].title == "Berlin" and germany[0].text == DOCS[1].text and germany[0].vector_id == 1
    assert [h.doc_id for h in harp] == ["harp1", "harp2"]  # three equal scores: the lower vector ids first
    assert harp[0].score == harp[1].score == retriever.search(["who plays the harp"], k=3)[0][2].score
    assert [(h.doc_id, h.metadata) for h in river] == [("river", {"n": 1})]
    assert nothing == [] and stop == []
    assert retriever.search([], k=3) == [] and retriever.search(["harp"], k=0) == [[]]
    assert len(retriever) == len(DOCS)
    with pytest.raises(TypeError, match="sequence of query strings"):
        retriever.search("harp", k=1)


def test_text_follows_the_document_template(tmp_path):
    assert document_text("{title}\n{text}", "Body text.", "Head") == "Head\nBody text."
    assert document_text("{text}", "Body text.", "Head") == "Body text."
    assert document_text("Title: {title}. {text}", "Body", None) == "Title: . Body"
    store = IndexStore.open(_index(tmp_path, DOCS, template="{text}"))
    assert BM25Retriever.open(store).search(["Paris"], k=5)[0][0].doc_id == "paris"  # in the text
    store = IndexStore.open(_index(tmp_path / "t", [Document("a", "alpha", title="Zorblat"), Document("b", "beta")],
                                   template="{text}"))
    assert BM25Retriever.open(store).search(["zorblat"], k=5) == [[]]  # the title is not in "{text}"


def test_a_corpus_without_terms_finds_nothing(tmp_path):
    out = _index(tmp_path, [Document("a", "the of"), Document("b", "is a")])
    record = IndexStore.open(out).manifest.bm25
    assert record["terms"] == 0 and not (out / BM25_DIR).exists()
    assert BM25Retriever.open(IndexStore.open(out)).search(["the", "anything"], k=2) == [[], []]


def test_an_index_without_bm25_opens_and_says_hybrid_is_unavailable(tmp_path):
    out = _index(tmp_path, DOCS, template=None)
    store = IndexStore.open(out)  # the dense layout as it was
    assert store.manifest.bm25 is None and "bm25" not in json.loads((out / MANIFEST).read_text())
    with pytest.raises(BM25UnavailableError, match="has no BM25 side index.*hybrid retrieval is unavailable"):
        BM25Retriever.open(store)


def test_a_side_index_of_another_size_is_refused(tmp_path):
    out = _index(tmp_path, DOCS)
    params = out / BM25_DIR / "params.index.json"
    params.write_text(json.dumps({**json.loads(params.read_text()), "num_docs": 4}))
    with pytest.raises(IndexError_, match="holds 4 documents, the manifest says 6"):
        BM25Index.open(out, Manifest.from_file(out / MANIFEST))
    (out / BM25_DIR / "vocab.index.json").unlink()
    with pytest.raises(IndexError_, match="cannot read the BM25 side index"):
        BM25Index.open(out, Manifest.from_file(out / MANIFEST))


def test_manifests_without_the_field_are_rewritten_byte_for_byte(tmp_path):
    committed = REPO / "server" / "default_model" / "index" / MANIFEST
    assert Manifest.from_file(committed).to_json() == committed.read_text()
    out = _index(tmp_path, DOCS, template=None)
    assert Manifest.from_file(out / MANIFEST).to_json() == (out / MANIFEST).read_text()
    with_bm25 = _index(tmp_path / "b", DOCS)
    m = Manifest.from_file(with_bm25 / MANIFEST)
    assert m.bm25 is not None and Manifest.from_file(with_bm25 / MANIFEST) == m
    assert m.to_json() == (with_bm25 / MANIFEST).read_text()
