"""Streaming corpus readers (Contract 3): JSONL, OneGen's ``db.jsonl``, folders of .txt / .md.

A corpus is one or more paths. Each is read line by line (gzip is detected by its
magic bytes), so memory stays bounded whatever the corpus size. Reading yields, in
corpus order, either a ``SourceRecord`` (a valid document) or a ``Rejection`` (an
invalid line, an empty text, an empty file) that names the file and line; the builder
decides whether a rejection stops the build or is reported and skipped, nothing is
dropped silently. Duplicate ids are found later, against the staged docstore.

Formats:

* JSONL ``{"id": str, "text": str, "title"?: str, "metadata"?: object}``; integer ids
  are accepted as their decimal string; other top-level fields are kept in metadata.
* OneGen ``db.jsonl`` ``{"uid": str, "messages": [{"role", "content"}, ...]}``: read, like the
  JSONL lines above, by ``onegen_core.text.documents`` — the reader training uses. If the contents
  hold the checkpoint's document token (OneGen ends each sentence-level unit with it), unit *k*
  is document ``uid-k``; otherwise the whole text is document ``uid``. An entry of several
  units is a ``SourceEntry``: its units are encoded in one sequence, unit *k* after units
  0 .. k-1, as training encodes them. Text after the last document token has no vector (it
  is context to training) and is reported.
* A folder: every ``.txt`` / ``.md`` (optionally ``.gz``) below it, sorted by path,
  hidden files skipped; the id is the path relative to the folder, a Markdown file's
  leading ``# heading`` is its title. A single .txt / .md path is one document.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from onegen_core.text.documents import Entry, EntryError, parse_entry, split_units

from .errors import BuildError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md")
GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class SourceRecord:
    """One valid document as read from the corpus, before chunking."""

    id: str
    text: str
    title: str | None
    metadata: dict[str, Any] | None
    origin: str  # "file:line" (JSONL) or "file" (text files), for error messages
    source: str | None = None  # the db.jsonl uid when this record is one fragment of it


@dataclass
class SourceEntry:
    """A OneGen entry of several units, encoded in one sequence (``onegen_core.text.documents.render_units``).

    ``texts`` holds every unit's text (the sequence needs them all); ``units[k]`` is unit *k*'s
    record, or the ``Rejection`` that leaves it out of the index. Its units are never chunked.
    """

    id: str
    texts: list[str]
    units: list[SourceRecord | Rejection]
    origin: str


@dataclass
class Rejection:
    """An input that is not a valid document, and why."""

    origin: str
    reason: str
    doc_id: str | None = None

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    kind: str  # "jsonl" | "text"
    name: str  # the id of a text document; the display name of a JSONL file
    display: str  # how error messages name the file


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _kind(path: Path) -> str | None:
    name = _strip_gz(path.name.lower())
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def expand_corpus(paths: list[str | os.PathLike]) -> list[CorpusFile]:
    """The corpus files, in reading order; ``BuildError`` for a path that is missing or of no known kind."""
    if not paths:
        raise BuildError("no corpus given: pass --corpus PATH (a .jsonl file, a db.jsonl or a folder)")
    files: list[CorpusFile] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(
                (f for f in path.rglob("*") if f.is_file() and _kind(f) == "text"
                 and not any(part.startswith(".") for part in f.relative_to(path).parts)),
                key=lambda f: f.relative_to(path).as_posix(),
            )
            if not found:
                raise BuildError(f"{path}: corpus folder has no .txt or .md files")
            for f in found:
                rel = _strip_gz(f.relative_to(path).as_posix())
                files.append(CorpusFile(f, "text", rel, str(f)))
        elif path.is_file():
            kind = _kind(path)
            if kind is None:
                raise BuildError(
                    f"{path}: unknown corpus format; expected .jsonl / .json / .ndjson, .txt / .md "
                    "(optionally .gz) or a folder"
                )
            files.append(CorpusFile(path, kind, _strip_gz(path.name), str(path)))
        else:
            raise BuildError(f"{path}: corpus path does not exist")
    return files


def corpus_signature(files: list[CorpusFile]) -> list[dict[str, Any]]:
    """Cheap identity of the corpus (path, size, mtime) to tell whether a resumed build reads the same input."""
    out = []
    for f in files:
        st = f.path.stat()
        out.append({"path": str(f.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _open(path: Path) -> IO[bytes]:
    with open(path, "rb") as raw:
        magic = raw.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


class CorpusReader:
    """Iterate a corpus as ``SourceRecord`` / ``Rejection``; ``digest`` is final once iteration ends.

    ``document_token`` is the checkpoint's document RET token: it splits OneGen
    db.jsonl entries into fragments and is never left inside a document's text.
    """

    def __init__(self, files: list[CorpusFile], *, document_token: str | None = None):
        self.files = files
        self.document_token = document_token
        self._digest = hashlib.sha256()
        self._nonblank = 0  # non-blank lines of the JSONL file being read

    @property
    def digest(self) -> str:
        return "sha256:" + self._digest.hexdigest()

    def __iter__(self) -> Iterator[SourceRecord | SourceEntry | Rejection]:
        for f in self.files:
            file_hash = hashlib.sha256()
            self._nonblank = 0
            try:
                reader = self._read_jsonl(f, file_hash) if f.kind == "jsonl" else self._read_text(f, file_hash)
                yield from reader
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise BuildError(f"{f.display}: cannot read: {e}") from None
            if self._nonblank == 0 and f.kind == "jsonl":
                yield Rejection(f.display, "empty corpus file: no documents in it")
            self._digest.update(f"{f.kind}\0{f.name if f.kind == 'text' else ''}\0".encode())
            self._digest.update(file_hash.digest())

    # ------------------------------------------------------------------ JSONL
    def _read_jsonl(self, f: CorpusFile, file_hash: Any) -> Iterator[SourceRecord | SourceEntry | Rejection]:
        with _open(f.path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                file_hash.update(raw)
                origin = f"{f.display}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._nonblank += 1
                    yield Rejection(origin, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                    continue
                if not line.strip():
                    continue  # blank lines separate nothing and hold no document
                self._nonblank += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Rejection(origin, f"malformed JSON: {e.msg} (column {e.colno})")
                    continue
                yield from self._entry(obj, origin)

    def _entry(self, obj: Any, origin: str) -> Iterator[SourceRecord | SourceEntry | Rejection]:
        """A JSONL line's documents: one record, or a OneGen entry's units, and what is rejected."""
        try:
            entry = parse_entry(obj)
            units = split_units(entry, self.document_token)
        except EntryError as e:
            reason = f"document {e.entry_id!r}: {e.reason}" if e.entry_id is not None else e.reason
            yield Rejection(origin, reason, e.entry_id)
            return
        names = units.names(entry.id)
        if not units.split:
            yield self._unit(entry, entry.text, entry.id, entry.metadata, origin, None)
        else:
            records = [self._unit(entry, text, name, {**(entry.metadata or {}), "uid": entry.id, "fragment": k},
                                  origin, f"fragment {k} ({name!r})")
                       for k, (text, name) in enumerate(zip(units.texts, names, strict=True))]
            if len(records) == 1:
                yield records[0]
            else:
                yield SourceEntry(entry.id, units.texts, records, origin)
        if units.trailing.strip():
            yield Rejection(origin, f"document {entry.id!r}: the text after its last {self.document_token!r} has no "
                            "document token, so no vector (training reads it as context only): end it with "
                            f"{self.document_token!r} to index it", f"{entry.id}-{len(names)}")

    def _unit(self, entry: Entry, text: str, doc_id: str, metadata: dict[str, Any] | None, origin: str,
              what: str | None) -> SourceRecord | Rejection:
        if not text.strip():
            where = f"document {entry.id!r}: " + (f"{what}: " if what else "")
            return Rejection(origin, f"{where}empty text", doc_id)
        return SourceRecord(doc_id, text, entry.title, metadata, origin, source=entry.id if what else None)

    # ------------------------------------------------------------------ text files
    def _read_text(self, f: CorpusFile, file_hash: Any) -> Iterator[SourceRecord | Rejection]:
        with _open(f.path) as fh:
            data = fh.read()
        file_hash.update(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Rejection(f.display, f"not valid UTF-8 ({e.reason} at byte {e.start})", f.name)
            return
        text, err = self._clean_text(text)
        if err:
            yield Rejection(f.display, f"document {f.name!r}: {err}", f.name)
            return
        title = None
        if _strip_gz(f.path.name.lower()).endswith(".md"):
            first = text.lstrip().split("\n", 1)[0]
            if first.startswith("# "):
                title = first[2:].strip() or None
        yield SourceRecord(f.name, text, title, None, f.display)

    def _clean_text(self, text: str) -> tuple[str, str | None]:
        """(text, None) or ("", reason). The document token must not occur inside a document."""
        if self.document_token and self.document_token in text:
            return "", f"text contains the checkpoint's document token {self.document_token!r}"
        if not text.strip():
            return "", "empty text"
        return text, None

