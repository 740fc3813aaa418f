"""The indexes an engine serves, by name, and how a version of one is loaded and checked.

An engine serves zero or more *named* indexes (``default`` is what a bare index directory is
called). Each entry is a ``LoadedIndex``: one version of an index directory, opened
(``IndexStore``) and wrapped in its retriever, with its BM25 side index (hybrid retrieval's
lexical half, ``bm25.py``) when the version has one: the two are loaded, checked and swapped
together, so a search never fuses one version's dense hits with another's BM25 hits. A request
names the index it searches (``RetrievalParams.index``); ``IndexRegistry.name_for`` resolves a name, ``None`` meaning the
registry's default: ``default`` when there is one, else the first index given.

Reloading without downtime is two halves on two threads:

* ``load_index`` — open the current version of a directory and check it against what the
  engine serves (checkpoint fingerprint, model dimension, encode dtype, docstore rows against the
  manifest; a BM25 side index that does not load or does not match the manifest), then build its
  retriever. Slow (it reads the files), pure, any thread: the server
  runs it on a background thread while the engine goes on stepping.
* ``IndexRegistry.swap`` — replace an entry, on the engine's own thread between two steps. A
  search runs inside one step, so the searches already running finished on the old version and
  every later one uses the new. The registry's mapping is replaced, never mutated, so another
  thread reading it (``/info``, ``/metrics``) sees the old mapping or the new one, never a mix.

``VersionStamp`` is what a poll compares to know that a directory's current version changed:
the ``CURRENT`` pointer's version number plus the manifest file's identity, so that a plain
directory rebuilt in place (``index_builder build`` replaces it) counts as changed too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..formats.index_store import INDEX_FILE, MANIFEST, IndexError_, IndexStore, resolve_version
from .bm25 import BM25Retriever, BM25UnavailableError
from .retriever import Retriever, make_retriever

DEFAULT_INDEX = "default"
log = logging.getLogger(__name__)


class UnknownIndex(ValueError):
    """A request named an index this engine does not serve; ``known`` lists the ones it does."""

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        served = ", ".join(repr(k) for k in known) if known else "none (no index is loaded)"
        super().__init__(f"unknown index {name!r}; this server serves: {served}")


@dataclass(frozen=True)
class VersionStamp:
    """Which files a directory's current version is: the version dir, its number, its manifest's inode and mtime."""

    directory: str
    version: int | None
    manifest_id: tuple[int, int]

    @classmethod
    def of(cls, root: str | os.PathLike) -> VersionStamp:
        """Read ``CURRENT`` and stat one manifest: cheap enough to poll. Raises ``IndexError_``."""
        version_dir, version = resolve_version(root)
        try:
            st = (version_dir / MANIFEST).stat()
        except OSError as e:  # removed between the two looks
            raise IndexError_(f"{version_dir / MANIFEST}: {e}") from None
        return cls(str(version_dir), version, (st.st_ino, st.st_mtime_ns))


@dataclass
class LoadedIndex:
    """One version of a named index, opened and ready to search. ``store`` is None for a bare retriever (tests)."""

    name: str
    retriever: Retriever
    store: IndexStore | None = None
    stamp: VersionStamp | None = None
    loaded_at: float = field(default_factory=time.time)  # wall-clock time it was loaded
    bm25: BM25Retriever | None = None  # the version's BM25 side index (hybrid retrieval); None: it has none

    @property
    def version(self) -> int | None:
        return self.store.version if self.store is not None else None

    def require_bm25(self) -> BM25Retriever:
        """Its BM25 side index, or ``BM25UnavailableError`` saying how to get one (what a hybrid search needs)."""
        if self.bm25 is None:
            raise BM25UnavailableError(self.no_bm25_message())
        return self.bm25

    def no_bm25_message(self) -> str:
        """Why it cannot serve hybrid retrieval, and what to run."""
        if self.store is None:
            return (f"index {self.name!r} has no BM25 side index (a retriever built in code), so it cannot serve "
                    "hybrid retrieval")
        return no_bm25_message(self.name, self.store.root, unreadable=self.store.manifest.bm25 is not None)

    @property
    def size(self) -> int:
        return len(self.retriever)

    def close(self) -> None:
        """Release its files (once no search can use it: after a swap, on the engine thread)."""
        if self.store is not None:
            self.store.close()


def load_index(name: str, root: str | os.PathLike, *, fingerprint: str, dim: int, retriever: str,
               device: torch.device, accepted_dtypes: tuple[str, ...] = (), require_bm25: bool = False,
               mmap: bool = False) -> LoadedIndex:
    """Open the current version of ``root`` as index ``name``, checked against the engine, with its retriever
    and its BM25 side index when it has one.

    Raises ``IndexError_`` (``FingerprintMismatchError`` among them) naming what does not match:
    another checkpoint's fingerprint, vectors of another dimension than the model's hidden size, an
    encode dtype outside ``accepted_dtypes`` (empty: any), a docstore whose row count is not the
    manifest's, files FAISS / SQLite cannot read, a BM25 side index that cannot be read or does not
    match the manifest; and ``BM25UnavailableError`` for a version without one when ``require_bm25``
    (an engine whose default mode is hybrid). ``mmap``: ``IndexStore.open``'s. Any thread.
    """
    root = Path(root)
    stamp = VersionStamp.of(root)
    try:
        store = IndexStore.open(root, expected_fingerprint=fingerprint, mmap=mmap)
    except RuntimeError as e:  # FAISS' reader: a truncated or foreign index.faiss
        raise IndexError_(f"{stamp.directory}: cannot read {INDEX_FILE}: {str(e).strip().splitlines()[0]}") from None
    try:
        _check(store, dim, accepted_dtypes)
        searcher = make_retriever(store, retriever, device)
        lexical = _open_bm25(name, store, require_bm25, mmap)
    except BaseException:
        store.close()
        raise
    return LoadedIndex(name, searcher, store, stamp, bm25=lexical)


def _open_bm25(name: str, store: IndexStore, required: bool, mmap: bool) -> BM25Retriever | None:
    """The version's BM25 side index, None when it has none (or ``bm25s`` is missing and it is not required);
    ``mmap`` maps its arrays, as the FAISS index is, so replicas on one host share their pages."""
    if store.manifest.bm25 is None:
        if required:
            raise BM25UnavailableError(no_bm25_message(name, store.root))
        return None
    try:
        return BM25Retriever.open(store, mmap=mmap)
    except ImportError as e:  # bm25s: an optional dependency; dense retrieval serves without it
        if required:
            raise IndexError_(f"{store.path}: {e}") from None
        log.warning("index %r: %s; it serves dense retrieval only", name, e)
        return None


def no_bm25_message(name: str, root: str | os.PathLike, *, unreadable: bool = False) -> str:
    """Why index ``name`` (directory ``root``) cannot serve hybrid retrieval, and what to run. ``unreadable``: its
    version has a BM25 side index that this process cannot open (``bm25s`` is missing)."""
    if unreadable:
        return (f"index {name!r} ({root}) has a BM25 side index, but this server cannot read it: "
                "pip install 'onegen[default-model]' (bm25s)")
    return (f"index {name!r} ({root}) has no BM25 side index, so it cannot serve hybrid retrieval: publish "
            f"a version with one (python -m index_builder update --index {root} --checkpoint CHECKPOINT "
            "with --corpus and/or --delete writes it), or rebuild the index without --no-bm25")


def _check(store: IndexStore, dim: int, accepted_dtypes: tuple[str, ...]) -> None:
    m = store.manifest
    where = store.path
    if m.dim != dim:
        raise IndexError_(f"{where}: the index holds vectors of dimension {m.dim}, but the served model's hidden "
                          f"size is {dim}")
    if accepted_dtypes and m.encode_dtype is not None and m.encode_dtype not in accepted_dtypes:
        raise IndexError_(f"{where}: encoded in {m.encode_dtype}, but this server accepts "
                          f"{' or '.join(accepted_dtypes)} (the served dtype, or the replaced version's)")
    try:
        rows = len(store.docstore)
    except Exception as e:  # noqa: BLE001 - sqlite3.DatabaseError and friends: an unreadable docstore
        raise IndexError_(f"{where}: cannot read the docstore: {type(e).__name__}: {e}") from None
    if rows != m.count:
        raise IndexError_(f"{where}: the docstore has {rows} documents but the manifest says {m.count}")


class IndexRegistry:
    """The engine's named indexes. Read from any thread; changed (``add``, ``swap``) by the engine's thread only."""

    def __init__(self, indexes: Mapping[str, LoadedIndex] | None = None):
        self._entries: dict[str, LoadedIndex] = dict(indexes or {})

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def entries(self) -> dict[str, LoadedIndex]:
        """The current mapping (a snapshot: it is replaced, never changed in place)."""
        return self._entries

    @property
    def default(self) -> str | None:
        """``default`` when served, else the first index added; None when there is none."""
        if DEFAULT_INDEX in self._entries:
            return DEFAULT_INDEX
        return next(iter(self._entries), None)

    def name_for(self, name: str | None) -> str | None:
        """The index a request's ``name`` means (None: the default, itself None without indexes)."""
        if name is None:
            return self.default
        if name not in self._entries:
            raise UnknownIndex(name, self.names)
        return name

    def get(self, name: str | None) -> LoadedIndex | None:
        resolved = self.name_for(name)
        return None if resolved is None else self._entries[resolved]

    def retriever(self, name: str | None) -> Retriever | None:
        entry = self.get(name)
        return None if entry is None else entry.retriever

    def add(self, entry: LoadedIndex) -> None:
        if entry.name in self._entries:
            raise ValueError(f"index {entry.name!r} is given twice")
        self._entries = {**self._entries, entry.name: entry}

    def swap(self, entry: LoadedIndex) -> LoadedIndex:
        """Serve ``entry`` in place of the index of its name -> the replaced one (for the caller to ``close``)."""
        old = self._entries.get(entry.name)
        if old is None:
            raise UnknownIndex(entry.name, self.names)
        self._entries = {**self._entries, entry.name: entry}
        return old
