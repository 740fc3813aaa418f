"""Index directories (Contract 2): ``manifest.json`` + ``index.faiss`` + ``docstore.sqlite``.

* ``index.faiss`` — a plain FAISS index (``faiss.read_index`` opens it); vector ids are
  positions 0..N-1 (or explicit ids through an ``IndexIDMap``) and key the docstore.
* ``docstore.sqlite`` — table ``documents(vector_id, doc_id, title, text, metadata,
  source, start, end)``; open it with any SQLite client.
* ``manifest.json`` — format version, checkpoint fingerprint, special-token ids,
  dimension, metric (inner product on L2-normalised vectors), FAISS factory string,
  vector count, corpus digest, the encode dtype (``encode_dtype``), build time, and ``bm25`` when the
  directory holds a BM25 side index.
* ``bm25/`` (optional) — the BM25 side index of hybrid retrieval, the ``bm25s`` package's files (``.npy``
  arrays and JSON, no pickle); written and read by ``onegen_core.retrieval.bm25``.

The engine opens an index only if its fingerprint matches the checkpoint's.

Versions. An index directory is either *plain* (the three files above, what ``build`` writes) or
*versioned*: ``versions/NNNNNN/`` each a complete plain index directory, and ``CURRENT``, a
one-line text file naming the current one (``000002``). ``CURRENT`` is replaced by writing a
temporary file and renaming it over the old one, so a reader sees the old name or the new one,
never a mix; a version directory is complete before ``CURRENT`` names it and is never changed
after. ``resolve_version`` is the one place that decides which directory holds the current
version; ``IndexStore.open`` (hence the engine, the server and the tools) goes through it.
A reader that has opened a version keeps reading it even when a later update removes its
directory: FAISS holds the index in memory (or an mmap of a file whose name alone is gone) and
POSIX keeps an unlinked file readable through the descriptors already open.

Memory-mapping (``IndexStore.open(mmap=True)``, the server's ``--index-mmap``). Replicas on one host
that map the same ``index.faiss`` share its pages through the page cache instead of each holding a
private copy. With a FAISS that has ``IO_FLAG_MMAP_IFC`` (measured with faiss-cpu 1.15) every index
type we build is mapped with clean, file-backed pages: flat vectors, an HNSW graph and its vectors, IVF
inverted lists and PQ codes alike (``mmap_read_flags``); an older FAISS maps only a bare IVF index's
inverted lists. A mapped file is read through once when it is opened, so its pages are in the page
cache before the first search (which runs on the engine's thread) instead of coming from the disk
during it. A file must never change in place while mapped; versions never do (see above).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INDEX_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
DOCSTORE = "docstore.sqlite"
CURRENT = "CURRENT"
VERSIONS = "versions"
# Fields added to format version 1 after indexes were written with it, with their defaults: a manifest that
# leaves them at the default is written without them, so a manifest written before they existed is read and
# written back byte for byte (the committed default index's among them).
MANIFEST_ADDED_FIELDS: dict[str, Any] = {"bm25": None}


class IndexError_(ValueError):
    """A missing, malformed or mismatched index directory."""


class FingerprintMismatchError(IndexError_):
    pass


def sqlite_uri(path: str | os.PathLike, *, mode: str = "ro") -> str:
    """A ``file:`` URI for ``sqlite3.connect(..., uri=True)`` / ``ATTACH`` that names exactly ``path``.

    The absolute path is percent-encoded (``Path.as_uri``): an unescaped ``#``, ``?`` or ``%``
    in a directory name would otherwise start the URI's fragment or query, or decode to
    another byte, and SQLite would open (and, ignoring ``mode``, create) a different file.
    """
    return f"{Path(path).absolute().as_uri()}?mode={mode}"


def import_faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover
        raise ImportError("the FAISS backend needs faiss: pip install faiss-cpu (or the 'gpu' extra)") from e
    return faiss


@dataclass
class Document:
    id: str
    text: str
    title: str | None = None
    metadata: dict[str, Any] | None = None
    source: str | None = None  # source document id when the document is a chunk
    start: int | None = None  # token offsets of a chunk in its source
    end: int | None = None


@dataclass
class Manifest:
    checkpoint_fingerprint: str
    dim: int
    count: int
    factory: str = "Flat"
    metric: str = "inner_product"
    normalized: bool = True
    special_token_ids: dict[str, int] = field(default_factory=dict)
    corpus_digest: str = ""
    # the dtype the documents were encoded in, resolved ("float32", "bfloat16", "float16"): queries encoded in
    # another give other vectors. None in manifests written before the field existed.
    encode_dtype: str | None = None
    # the BM25 side index in ``bm25/`` (``onegen_core.retrieval.bm25.write_bm25`` writes it and this record:
    # documents, the document template its text follows, tokenizer, bm25s version); None: there is none
    bm25: dict[str, Any] | None = None
    build_time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    format_version: int = INDEX_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # builder settings, training size, …

    def to_json(self) -> str:
        data = asdict(self)
        for name, default in MANIFEST_ADDED_FIELDS.items():  # written only when set: older files stay byte-identical
            if data[name] == default:
                del data[name]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise IndexError_(f"{path}:{e.lineno}:{e.colno}: malformed manifest JSON: {e.msg}") from None
        if data.get("format_version") != INDEX_FORMAT_VERSION:
            raise IndexError_(f"{path}: index format_version {data.get('format_version')} is not supported")
        known = set(cls.__dataclass_fields__)
        extra = {k: v for k, v in data.items() if k not in known}
        data = {k: v for k, v in data.items() if k in known}
        data.setdefault("extra", {}).update(extra)
        try:
            return cls(**data)
        except TypeError as e:
            raise IndexError_(f"{path}: {e}") from None


def version_name(number: int) -> str:
    """The directory name of version ``number`` under ``versions/``."""
    return f"{number:06d}"


def resolve_version(path: str | os.PathLike) -> tuple[Path, int | None]:
    """``(directory holding the current version of path, its number)``; a plain directory is ``(path, None)``.

    ``CURRENT`` wins over plain files: an update that converts a plain directory writes
    ``versions/000001`` (links to the plain files), the new version and ``CURRENT``, and only then
    removes the plain files; a reader that found no ``CURRENT`` and then no manifest looks again.
    """
    path = Path(path)
    for _ in range(3):  # CURRENT may appear between the two checks while a plain directory is converted
        pointer = path / CURRENT
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            name = None
        except OSError as e:
            raise IndexError_(f"{pointer}: cannot read the current-version pointer: {e}") from None
        if name is not None:
            if not name.isdigit():
                raise IndexError_(f"{pointer}: expected a version number, found {name[:40]!r}")
            version_dir = path / VERSIONS / name
            if not (version_dir / MANIFEST).is_file():
                raise IndexError_(f"{pointer} names version {name} but {version_dir} holds no {MANIFEST}")
            return version_dir, int(name)
        if (path / MANIFEST).is_file():
            return path, None
    raise IndexError_(f"{path}: not an index directory (no {MANIFEST} and no {CURRENT}); "
                      "build one with python -m index_builder build")


def list_versions(path: str | os.PathLike) -> list[int]:
    """The complete version numbers under ``path/versions`` (ascending); [] for a plain directory."""
    root = Path(path) / VERSIONS
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())


class DocStore:
    """Read access to ``docstore.sqlite`` through one read-only connection, held until ``close``.

    The connection opens the file at construction and keeps its descriptor for its lifetime, so a
    reader of an index version goes on reading its documents after ``index_builder update --keep``
    removes that version's directory (POSIX keeps an unlinked file readable through the descriptors
    already open); a connection per call would look the path up again and fail. Thread-safe: calls
    take turns on the connection.
    """

    def __init__(self, path: Path):
        if not path.is_file():
            raise IndexError_(f"{path}: docstore not found")
        self.path = path
        self._lock = threading.Lock()
        try:
            self._con: sqlite3.Connection | None = sqlite3.connect(sqlite_uri(path), uri=True,
                                                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise IndexError_(f"{path}: cannot open the docstore: {e}") from None

    def _query(self, sql: str, args: list[int] | tuple = ()) -> list[tuple]:
        with self._lock:
            if self._con is None:
                raise IndexError_(f"{self.path}: the docstore has been closed")
            return self._con.execute(sql, args).fetchall()

    def get(self, vector_ids: list[int]) -> list[Document | None]:
        if not vector_ids:
            return []
        wanted = sorted({int(v) for v in vector_ids})
        q = ",".join("?" * len(wanted))
        rows = self._query(f"SELECT vector_id, doc_id, title, text, metadata, source, start, end FROM documents "
                           f"WHERE vector_id IN ({q})", wanted)
        by_id = {r[0]: _row_to_doc(r) for r in rows}
        return [by_id.get(int(v)) for v in vector_ids]

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM documents")[0][0]

    def close(self) -> None:
        """Close the connection (and with it the file); later calls raise ``IndexError_``."""
        with self._lock:
            con, self._con = self._con, None
        if con is not None:
            con.close()


def _row_to_doc(r: tuple) -> Document:
    return Document(id=r[1], title=r[2], text=r[3], metadata=json.loads(r[4]) if r[4] else None,
                    source=r[5], start=r[6], end=r[7])


def create_docstore(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE IF NOT EXISTS documents (vector_id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, title TEXT, "
        "text TEXT NOT NULL, metadata TEXT, source TEXT, start INTEGER, end INTEGER)"
    )
    con.execute("CREATE INDEX IF NOT EXISTS documents_doc_id ON documents(doc_id)")
    return con


def insert_documents(con: sqlite3.Connection, first_vector_id: int, docs: list[Document]) -> None:
    con.executemany(
        "INSERT INTO documents VALUES (?,?,?,?,?,?,?,?)",
        [
            (first_vector_id + i, d.id, d.title, d.text, json.dumps(d.metadata) if d.metadata is not None else None,
             d.source, d.start, d.end)
            for i, d in enumerate(docs)
        ],
    )


_IVF = re.compile(r"IVF\d+(_HNSW\d+)?,.+")  # a factory string of a bare IVF index (no IDMap, no pre-transform)


def mmap_read_flags(factory: str) -> int:
    """``faiss.read_index`` flags that memory-map an index of ``factory`` (its manifest's factory string) with clean
    pages, which every process reading the same file shares; 0 where this FAISS can only read it into memory.

    A FAISS with ``IO_FLAG_MMAP_IFC`` (1.15 is measured) maps every type we build, vectors and codes, an HNSW
    graph and IVF inverted lists included; an older one maps only a bare IVF index's inverted lists (``IO_FLAG_MMAP``)."""
    faiss = import_faiss()
    if hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        return faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    if _IVF.fullmatch(factory):
        return faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    return 0


def warm_page_cache(path: Path, chunk: int = 8 << 20) -> None:
    """Read ``path`` once and drop what was read: its pages land in the page cache (shared, reclaimable), so
    a mapping of it faults them in from memory, not from the disk."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


class IndexStore:
    """An opened index directory: FAISS index + docstore + manifest. ``path`` is the directory the files
    were read from (a versioned directory's current version), ``root`` the one asked for, ``version``
    the version number (None for a plain directory)."""

    def __init__(self, path: Path, manifest: Manifest, index: Any, docstore: DocStore, *,
                 root: Path | None = None, version: int | None = None):
        self.path = path
        self.manifest = manifest
        self.index = index
        self.docstore = docstore
        self.root = root if root is not None else path
        self.version = version
        self.mmapped = False  # index.faiss memory-mapped (open(mmap=True) on a type FAISS maps), not read

    @classmethod
    def open(cls, path: str | os.PathLike, *, expected_fingerprint: str | None = None, mmap: bool = False) -> IndexStore:
        """Open the current version of ``path``; ``mmap``: memory-map ``index.faiss`` where FAISS can share its
        pages (``mmap_read_flags``; other types are read), never for a reader that changes the index."""
        faiss = import_faiss()
        root = Path(path)
        path, version = resolve_version(root)
        manifest = Manifest.from_file(path / MANIFEST)
        if expected_fingerprint is not None and manifest.checkpoint_fingerprint != expected_fingerprint:
            raise FingerprintMismatchError(
                f"index {path} was built with checkpoint fingerprint {manifest.checkpoint_fingerprint}, "
                f"but the checkpoint being served has fingerprint {expected_fingerprint}; rebuild the index "
                "with this checkpoint (python -m index_builder build)"
            )
        flags = mmap_read_flags(manifest.factory) if mmap else 0
        index = None
        if flags:
            warm_page_cache(path / INDEX_FILE)
            try:
                index = faiss.read_index(str(path / INDEX_FILE), flags)
            except RuntimeError:  # a type this FAISS cannot map: read it (a broken file fails the read too)
                flags = 0
        if index is None:
            index = faiss.read_index(str(path / INDEX_FILE))
        if index.d != manifest.dim or index.ntotal != manifest.count:
            raise IndexError_(
                f"{path}: index.faiss has dim {index.d} and {index.ntotal} vectors but the manifest says "
                f"dim {manifest.dim} and {manifest.count}"
            )
        store = cls(path, manifest, index, DocStore(path / DOCSTORE), root=root, version=version)
        store.mmapped = bool(flags)
        return store

    def close(self) -> None:
        """Close the docstore (the FAISS index is freed with the object)."""
        self.docstore.close()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries``: [n, d] float32, L2-normalised. Returns (scores [n, k], vector ids [n, k]; -1 = none)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(q, min(k, max(self.index.ntotal, 1)))


def write_index_dir(
    out: str | os.PathLike,
    vectors: np.ndarray,
    documents: list[Document],
    *,
    checkpoint_fingerprint: str,
    special_token_ids: dict[str, int] | None = None,
    factory: str = "Flat",
    corpus_digest: str = "",
    extra: dict[str, Any] | None = None,
    encode_dtype: str | None = None,
) -> Path:
    """Write a complete index dir from in-memory vectors (small corpora, tests). Atomic: built aside, renamed."""
    faiss = import_faiss()
    out = Path(out)
    if len(vectors) != len(documents):
        raise ValueError(f"{len(vectors)} vectors but {len(documents)} documents")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(tmp / INDEX_FILE))
    con = create_docstore(tmp / DOCSTORE)
    with con:
        insert_documents(con, 0, documents)
    con.close()
    manifest = Manifest(
        checkpoint_fingerprint=checkpoint_fingerprint,
        dim=int(vectors.shape[1]),
        count=len(documents),
        factory=factory,
        special_token_ids=special_token_ids or {},
        corpus_digest=corpus_digest,
        extra=extra or {},
        encode_dtype=encode_dtype,
    )
    (tmp / MANIFEST).write_text(manifest.to_json())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
