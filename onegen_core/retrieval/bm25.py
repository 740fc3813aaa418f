"""The BM25 side index of an index directory: hybrid retrieval's lexical half, written by the builder, searched here.

A version of an index directory (``onegen_core.formats.index_store``) may hold ``bm25/`` beside
``index.faiss``: the ``bm25s`` package's own files, ``data`` / ``indices`` / ``indptr`` ``.csc.index.npy``
(the CSC matrix of each (document, term) BM25 weight; ``np.save`` / ``np.load`` with
``allow_pickle=False``), ``vocab.index.json`` (term -> column) and ``params.index.json`` (k1, b, method,
document count). Nothing in it is a pickle. Row ``i`` of the matrix is vector id ``i`` of the docstore, so a
BM25 hit names a docstore row exactly as a dense hit does. The manifest's ``bm25`` field records it
(``write_bm25`` returns that record); a manifest without it has no BM25 side index, and opening one for hybrid
retrieval raises ``BM25UnavailableError``.

What BM25 sees of a document is ``document_text``: the checkpoint's document template (``onegen.json``'s
``document_template``) filled with the docstore row's title and text, which is the text the dense encoder
encodes, less the document token. With the default template ``"{text}"`` titles are not seen; with
``"{title}\\n{text}"`` they are; a chunk is its own text. The template's literal words occur in every document
and weigh next to nothing. The template is recorded, so the index says what it holds without its checkpoint.

Tokens: ``bm25s.tokenize`` as recorded in the manifest: lowercased words of two or more word characters
(``(?u)\\b\\w\\w+\\b``), English stopwords removed, no stemming; queries go through the same. Scores:
``bm25s``'s defaults (Lucene's BM25, k1 = 1.5, b = 0.75). A search returns the top k documents by score, ties
broken by the lower vector id (the same order on every run and replica); a document sharing no term with the
query (score 0) is never returned, so a query of unknown words or stopwords only finds nothing.

``bm25s`` is an optional dependency (the ``default-model``, ``bench`` and ``dev`` extras), imported where used.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..formats.index_store import DOCSTORE, Document, IndexError_, IndexStore, Manifest, sqlite_uri
from ..text.rendering import template_segments
from .retriever import RetrievalHit

BM25_DIR = "bm25"
# bm25s.tokenize's settings, recorded in the manifest: queries are tokenised as the documents were
TOKENIZER: dict[str, Any] = {"lower": True, "stopwords": "en", "token_pattern": r"(?u)\b\w\w+\b"}
PARAMS_FILE = "params.index.json"


class BM25UnavailableError(IndexError_):
    """The index (version) has no BM25 side index, so hybrid retrieval cannot run on it."""


def import_bm25s():
    try:
        import bm25s
    except ImportError as e:
        raise ImportError("the BM25 side index (hybrid retrieval) needs bm25s: pip install 'onegen[default-model]'") from e
    return bm25s


def document_text(template: str, text: str, title: str | None = None) -> str:
    """The text BM25 indexes for a document: its document template filled in, as the dense encoder renders it."""
    return "".join(segment for segment, _ in template_segments(template, text=text, title=title or ""))


def write_bm25(index_dir: str | os.PathLike, document_template: str, *, progress: bool = False) -> dict[str, Any]:
    """Index the docstore of ``index_dir`` (every row, in vector-id order) into ``index_dir/bm25``.

    Returns the manifest's ``bm25`` record. A corpus without a single term (empty, or stopwords only) gets a
    record of 0 terms and no directory: searching it finds nothing. Memory: every text at once (``bm25s``
    indexes in memory).
    """
    index_dir = Path(index_dir)
    con = sqlite3.connect(sqlite_uri(index_dir / DOCSTORE), uri=True)
    try:
        rows = con.execute("SELECT vector_id, title, text FROM documents ORDER BY vector_id").fetchall()
    finally:
        con.close()
    if [r[0] for r in rows] != list(range(len(rows))):
        raise AssertionError(f"{index_dir / DOCSTORE}: vector ids are not 0..{len(rows) - 1}")
    texts = [document_text(document_template, text, title) for _, title, text in rows]
    model, terms = _index_texts(texts, progress)
    out = index_dir / BM25_DIR
    shutil.rmtree(out, ignore_errors=True)
    if model is not None:
        model.save(out, show_progress=False)
    return _record(len(texts), terms, document_template)


def _index_texts(texts: list[str], progress: bool = False) -> tuple[Any, int]:
    """-> (the ``bm25s.BM25`` model of ``texts``, row i = text i, or None when they hold no term; the term count)."""
    bm25s = import_bm25s()
    tokens = bm25s.tokenize(texts, **TOKENIZER, show_progress=progress)
    if not tokens.vocab:  # bm25s cannot index a corpus without a term
        return None, 0
    model = bm25s.BM25()
    model.index(tokens, show_progress=progress)
    return model, len(tokens.vocab)


def _record(documents: int, terms: int, document_template: str) -> dict[str, Any]:
    return {"path": BM25_DIR, "documents": documents, "terms": terms, "document_template": document_template,
            "tokenizer": dict(TOKENIZER), "bm25s": import_bm25s().__version__}


class BM25Index:
    """A version's ``bm25/`` opened for search: query strings -> (vector id, score) per query."""

    def __init__(self, path: Path | None, record: dict[str, Any], model: Any):
        self.path = path  # None: built in memory (``from_texts``)
        self.record = record
        self.model = model  # None for a corpus without a term
        self._tokenize = import_bm25s().tokenize if model is not None else None

    @classmethod
    def open(cls, index_dir: str | os.PathLike, manifest: Manifest, *, mmap: bool = False) -> BM25Index:
        """``index_dir``: a version's directory (``IndexStore.path``); ``mmap`` maps the arrays instead of reading them."""
        index_dir = Path(index_dir)
        record = manifest.bm25
        if record is None:
            raise BM25UnavailableError(
                f"index {index_dir} has no BM25 side index (built with --no-bm25, or before the builder wrote one), "
                "so hybrid retrieval is unavailable on it; rebuild it with python -m index_builder build, or publish "
                "a new version with python -m index_builder update, which writes one"
            )
        if record.get("tokenizer") != TOKENIZER:
            raise IndexError_(f"{index_dir}: the BM25 side index was tokenised with {record.get('tokenizer')}, "
                              f"this version of onegen reads {TOKENIZER}; rebuild the index")
        path = index_dir / record.get("path", BM25_DIR)
        if not record.get("terms"):
            return cls(path, record, None)
        bm25s = import_bm25s()
        try:
            num_docs = json.loads((path / PARAMS_FILE).read_text()).get("num_docs")
            model = bm25s.BM25.load(path, mmap=mmap, load_corpus=False, show_progress=False)
        except (OSError, ValueError, KeyError) as e:
            raise IndexError_(f"{path}: cannot read the BM25 side index: {e}") from None
        if not num_docs == record["documents"] == manifest.count:
            raise IndexError_(f"{path}: the BM25 side index holds {num_docs} documents, the manifest says "
                              f"{record['documents']} (and {manifest.count} vectors)")
        return cls(path, record, model)

    @classmethod
    def from_texts(cls, texts: Sequence[str], document_template: str = "{text}") -> BM25Index:
        """Index ``texts`` in memory (vector id = position), as ``write_bm25`` indexes a docstore: for a pool of
        documents that is not an index directory's (the quality bench's held-out pool)."""
        model, terms = _index_texts(list(texts))
        return cls(None, _record(len(texts), terms, document_template), model)

    def __len__(self) -> int:
        return int(self.record["documents"])

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """Per query, up to ``k`` (vector id, score) pairs, best first; ties go to the lower vector id."""
        if isinstance(queries, str):
            raise TypeError("search takes a sequence of query strings, not one string")
        if self.model is None or k <= 0 or not queries:
            return [[] for _ in queries]
        tokenized = self._tokenize(list(queries), **TOKENIZER, return_ids=False, show_progress=False)
        return [self._top(self.model.get_tokens_ids([t for t in tokens if t]), k) for tokens in tokenized]

    def _top(self, term_ids: list[int], k: int) -> list[tuple[int, float]]:
        if not term_ids:
            return []
        scores = self.model.get_scores_from_ids(term_ids)  # [documents]
        cand = np.flatnonzero(scores > 0)
        if len(cand) > k:  # keep every document scoring at least the k-th best, ties included
            cand = cand[scores[cand] >= np.partition(scores[cand], -k)[-k]]
        order = np.lexsort((cand, -scores[cand]))[:k]  # score descending, then vector id ascending
        return [(int(cand[i]), float(scores[cand[i]])) for i in order]


class BM25Retriever:
    """BM25 search returning the dense retrievers' ``RetrievalHit`` (documents looked up by vector id).

    Unlike the dense ``Retriever`` protocol it takes query strings, not vectors. ``open`` searches an index
    version's ``bm25/`` with its docstore; ``over`` a list of documents indexed in memory.
    """

    def __init__(self, index: BM25Index, docs_for: Callable[[list[int]], list[Document | None]]):
        self.index = index
        self.docs_for = docs_for  # vector ids -> their documents (None: no such row)

    @classmethod
    def open(cls, store: IndexStore, *, mmap: bool = False) -> BM25Retriever:
        """The BM25 side index of an opened version (``BM25UnavailableError`` when it has none); its documents
        come from the version's docstore, so closing the store closes this too."""
        return cls(BM25Index.open(store.path, store.manifest, mmap=mmap), store.docstore.get)

    @classmethod
    def over(cls, documents: Sequence[Document], document_template: str = "{text}") -> BM25Retriever:
        """BM25 over ``documents`` in memory, vector id = position (``TorchRetriever``'s numbering)."""
        docs = list(documents)
        index = BM25Index.from_texts([document_text(document_template, d.text, d.title) for d in docs],
                                     document_template)
        return cls(index, lambda ids: [docs[i] if 0 <= i < len(docs) else None for i in ids])

    def __len__(self) -> int:
        return len(self.index)

    def search(self, queries: Sequence[str], k: int) -> list[list[RetrievalHit]]:
        out: list[list[RetrievalHit]] = []
        for pairs in self.index.search(queries, k):
            docs = self.docs_for([v for v, _ in pairs])
            out.append([
                RetrievalHit(doc_id=d.id, score=s, vector_id=v, title=d.title, text=d.text, metadata=d.metadata)
                for (v, s), d in zip(pairs, docs, strict=True) if d is not None
            ])
        return out
