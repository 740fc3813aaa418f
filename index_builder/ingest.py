"""Phase 1 of a build: read the corpus into the staged docstore (rank 0 alone).

``staged.sqlite`` in the work directory is the docstore being built: table ``documents``
(the final docstore's rows, in vector-id order; duplicate ids caught by a unique index, so
memory stays bounded), each document's origin (file:line) and rendered length, the
rejected inputs, and for the units of a OneGen entry of several units (``SourceEntry``)
the entry's token ids and each unit's position in them (tables ``entries`` and
``units``): such units are encoded together, in one sequence, as training encodes them.

Every invalid input either stops the build with a list of what is wrong (file:line) or,
with ``--skip-invalid``, is recorded and listed in ``rejected.jsonl`` in the index;
``ingest.json`` marks the staged docstore complete.
"""

from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from onegen_core.formats.checkpoint import Checkpoint
from onegen_core.formats.index_store import Document, create_docstore, insert_documents
from onegen_core.text.documents import render_units
from onegen_core.text.rendering import Renderer

from .chunking import Chunker
from .corpus import CorpusFile, CorpusReader, Rejection, SourceEntry, SourceRecord
from .errors import BuildError
from .workdir import WorkDir, write_json_atomic

if TYPE_CHECKING:
    from .config import BuildConfig

REJECTED_FILE = "rejected.jsonl"
MAX_REPORTED_ERRORS = 20

_STAGING_SCHEMA = (
    "CREATE UNIQUE INDEX IF NOT EXISTS staged_doc_id_unique ON documents(doc_id)",
    "CREATE TABLE IF NOT EXISTS origins (vector_id INTEGER PRIMARY KEY, origin TEXT NOT NULL, n_tokens INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rejected (seq INTEGER PRIMARY KEY, origin TEXT NOT NULL, doc_id TEXT, reason TEXT NOT NULL)",
    # a OneGen entry of several units: its token ids (int32) up to its last staged unit, and where each unit is
    "CREATE TABLE IF NOT EXISTS entries (entry INTEGER PRIMARY KEY, ids BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS units (vector_id INTEGER PRIMARY KEY, entry INTEGER NOT NULL, position INTEGER NOT NULL)",
)


class _TooManyErrors(Exception):
    pass


class _Staging:
    """The staged docstore being written: documents, their origins, entries' units, rejections."""

    def __init__(self, work: WorkDir, cfg: BuildConfig):
        self.cfg = cfg
        work.staged.unlink(missing_ok=True)
        self.con = con = create_docstore(work.staged)
        for stmt in _STAGING_SCHEMA:
            con.execute(stmt)
        con.execute("PRAGMA synchronous=OFF")  # an interrupted ingest restarts from scratch
        self.errors: list[str] = []
        self.stats = {"sources": 0, "truncated": 0, "rejected": 0, "tokens": 0, "chunked_sources": 0}
        self.vid = 0
        self.entries = 0

    def reject(self, r: Rejection) -> None:
        if self.cfg.on_invalid == "error":
            self.errors.append(str(r))
            if len(self.errors) >= MAX_REPORTED_ERRORS:
                raise _TooManyErrors
        else:
            self.stats["rejected"] += 1
            self.con.execute("INSERT INTO rejected (origin, doc_id, reason) VALUES (?,?,?)",
                             (r.origin, r.doc_id, r.reason))

    def clash(self, item: SourceRecord, ids: list[str]) -> bool:
        """Whether one of ``ids`` (the documents ``item`` becomes) is taken; rejects ``item`` if so."""
        found = _first_clash(self.con, ids)
        if found is None:
            return False
        cid, first = found
        what = f"duplicate id {cid!r}" if cid == item.id else f"id {cid!r} (a chunk of {item.id!r}) is a duplicate"
        self.reject(Rejection(item.origin, f"{what}; first seen at {first}", item.id))
        return True

    def add(self, doc: Document, origin: str, n_tokens: int) -> int:
        vid = self.vid
        insert_documents(self.con, vid, [doc])
        self.con.execute("INSERT INTO origins VALUES (?,?,?)", (vid, origin, n_tokens))
        self.stats["tokens"] += n_tokens
        self.vid += 1
        if self.vid % 2048 == 0:
            self.con.commit()
        return vid

    def add_entry(self, ids: list[int], units: list[tuple[int, int]]) -> None:
        """An entry's token ids and its staged units ``(vector_id, position)``."""
        entry = self.entries
        self.entries += 1
        self.con.execute("INSERT INTO entries VALUES (?,?)", (entry, np.asarray(ids, dtype=np.int32).tobytes()))
        self.con.executemany("INSERT INTO units VALUES (?,?,?)", [(vid, entry, pos) for vid, pos in units])


def ingest(work: WorkDir, cfg: BuildConfig, ckpt: Checkpoint, files: list[CorpusFile], max_length: int) -> None:
    """Rank 0: stream the corpus into the staged docstore; any invalid input fails it (or is reported)."""
    staging = _Staging(work, cfg)
    renderer = Renderer.for_checkpoint(ckpt)
    try:
        chunker = Chunker(renderer, cfg.chunking, max_length)
    except ValueError as e:
        raise BuildError(str(e)) from None
    reader = CorpusReader(files, document_token=ckpt.spec.document_token)
    bar = tqdm(desc="reading corpus", unit="doc", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for item in reader:
            bar.update(1)
            if isinstance(item, Rejection):
                staging.reject(item)
            elif isinstance(item, SourceEntry):
                _stage_entry(staging, renderer, item, max_length)
            else:
                _stage_record(staging, chunker, item)
    except _TooManyErrors:
        pass
    finally:
        bar.close()
    con, errors, stats = staging.con, staging.errors, staging.stats
    if errors:
        con.close()
        more = " (stopped after the first 20)" if len(errors) >= MAX_REPORTED_ERRORS else ""
        raise BuildError(
            f"invalid corpus input{more}:\n  " + "\n  ".join(errors)
            + "\nfix these, or pass --skip-invalid to leave them out (they are then listed in "
            f"{REJECTED_FILE} in the index)"
        )
    con.commit()
    con.close()
    if staging.vid == 0:
        raise BuildError(
            f"the corpus ({', '.join(str(p) for p in cfg.corpus)}) holds no valid document"
            + (f"; {stats['rejected']} input(s) were rejected" if stats["rejected"] else "")
        )
    with open(work.staged, "rb+") as f:
        os.fsync(f.fileno())
    if stats["truncated"]:
        cfg.log(f"warning: {stats['truncated']} document(s) were truncated to fit --max-doc-tokens or the model's "
                f"context of {max_length} tokens (their source and token offsets are in the docstore)")
    if stats["rejected"]:
        cfg.log(f"warning: {stats['rejected']} invalid input(s) skipped; listed in {REJECTED_FILE}")
    write_json_atomic(work.ingest_done, {"count": staging.vid, "digest": reader.digest, "files": len(files), **stats})


def _stage_record(staging: _Staging, chunker: Chunker, item: SourceRecord) -> None:
    """A document: chunked (or truncated) to fit, each piece a staged document."""
    try:
        pieces = chunker.split(item)
    except ValueError as e:
        staging.reject(Rejection(item.origin, str(e).removeprefix(f"{item.origin}: "), item.id))
        return
    if staging.clash(item, [p.document.id for p in pieces]):
        return
    staging.stats["sources"] += 1
    staging.stats["chunked_sources"] += len(pieces) > 1
    for p in pieces:
        staging.add(p.document, item.origin, p.n_tokens)
        staging.stats["truncated"] += p.truncated


def _stage_entry(staging: _Staging, renderer: Renderer, item: SourceEntry, max_length: int) -> None:
    """A OneGen entry of several units: rendered once (``render_units``); each unit that fits the model's
    context is a staged document whose vector is taken at its position. Never chunked or truncated."""
    ids, positions = render_units(renderer, item.texts)
    staged: list[tuple[int, int]] = []
    for k, unit in enumerate(item.units):
        if isinstance(unit, Rejection):
            staging.reject(unit)
            continue
        pos = positions[k]
        if pos >= max_length:
            staging.reject(Rejection(item.origin, f"document {item.id!r}: fragment {k} ({unit.id!r}) ends at token "
                                     f"{pos + 1} of its entry, beyond the model's context of {max_length} tokens",
                                     unit.id))
            continue
        if staging.clash(unit, [unit.id]):
            continue
        staging.stats["sources"] += 1
        doc = Document(id=unit.id, text=unit.text, title=unit.title, metadata=unit.metadata, source=unit.source)
        n_tokens = pos - (positions[k - 1] if k else -1)  # the tokens this unit adds to the entry's sequence
        staged.append((staging.add(doc, unit.origin, n_tokens), pos))
    if staged:
        staging.add_entry(ids[: max(pos for _, pos in staged) + 1], staged)


def _first_clash(con: sqlite3.Connection, ids: list[str]) -> tuple[str, str] | None:
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        return dup, "the same document"
    q = ",".join("?" * len(ids))
    row = con.execute(
        f"SELECT d.doc_id, o.origin FROM documents d JOIN origins o ON o.vector_id = d.vector_id "
        f"WHERE d.doc_id IN ({q}) LIMIT 1", ids,
    ).fetchone()
    return (row[0], row[1]) if row else None
