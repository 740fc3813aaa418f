"""OneGen's documents: one reader for a ``db.jsonl`` / corpus line, one rule for the tokens that encode its units.

Training (``training.data``) and the index builder (``index_builder``) both read documents
through this module, so a checkpoint is served against the vectors it was trained to match.

A line is one of two shapes:

* OneGen's ``db.jsonl`` entry ``{"uid": str, "messages": [{"role", "content"}, ...]}``: the
  contents concatenated (OneGen's ``DocumentTemplator``) are the entry's text. Every
  occurrence of the checkpoint's document token (``[RD]``) ends a *unit*: unit *k* is
  named ``"<uid>-<k>"`` (OneGen's ``doc-sent`` ids). Text after the last document token has
  no vector: it is context only (``Units.trailing``). An entry without the token is a
  single unit named ``uid``. Other top-level fields are kept as metadata.
* a corpus line ``{"id": str, "text": str, "title"?: str, "metadata"?: object}``: one unit
  named ``id``. Its text must not hold the document token (only OneGen's entries are cut
  into units at it); other top-level fields are kept in metadata.

The encoding rule (``render_units``): unit 0 renders as ``Renderer.document`` renders any
document (``document template + [RD]``); unit *k* > 0 follows in the same sequence as its
plain text + ``[RD]``, so its vector — the final-layer hidden state at its ``[RD]`` — is
computed after units ``0 .. k-1``, in one forward. A single unit therefore renders exactly
as a plain document does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .rendering import Renderer

CORPUS_FIELDS = ("id", "text", "title", "metadata")
DB_FIELDS = ("uid", "messages")


@dataclass(frozen=True)
class Entry:
    """One line of a db.jsonl or corpus file, validated (its units are ``split_units``')."""

    id: str  # the uid of a db.jsonl entry, the id of a corpus line
    text: str
    title: str | None
    metadata: dict[str, Any] | None
    onegen: bool  # a {uid, messages} entry, whose text the document token cuts into units


@dataclass(frozen=True)
class Units:
    """An entry's retrievable units: the text of each, and what follows the last one."""

    texts: list[str]  # unit k's text, in order
    trailing: str  # text after the last document token: context, no vector ("" when none)
    split: bool  # whether the document token cut the text (units are then named "<id>-<k>")

    def names(self, entry_id: str) -> list[str]:
        """The id of each unit: ``"<id>-<k>"`` when the document token cut the text, else ``id``."""
        return [f"{entry_id}-{k}" for k in range(len(self.texts))] if self.split else [entry_id]


class EntryError(ValueError):
    """A line that is not a valid entry; ``entry_id`` names the document when the line has a valid id."""

    def __init__(self, reason: str, entry_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.entry_id = entry_id


def parse_entry(obj: Any) -> Entry:
    """A parsed JSON line as an ``Entry``; ``EntryError`` says why it is not one."""
    if not isinstance(obj, dict):
        raise EntryError(f"expected a JSON object, got {type(obj).__name__}")
    if "uid" in obj and "messages" in obj:  # else a corpus line (whose other fields are metadata)
        return _db_entry(obj)
    if "id" not in obj:
        raise EntryError("missing 'id' (a corpus line is {\"id\", \"text\", \"title\"?, \"metadata\"?})")
    return _corpus_entry(obj)


def _db_entry(obj: dict[str, Any]) -> Entry:
    uid = as_id(obj["uid"], "uid")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise EntryError("'messages' must be a non-empty list of {role, content}", uid)
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise EntryError(f"messages[{i}] must be an object with a string 'content'", uid)
        parts.append(m["content"])
    extra = {k: v for k, v in obj.items() if k not in DB_FIELDS} or None
    return Entry(uid, "".join(parts), None, extra, onegen=True)


def _corpus_entry(obj: dict[str, Any]) -> Entry:
    doc_id = as_id(obj["id"], "id")
    if "text" not in obj:
        raise EntryError("missing 'text'", doc_id)
    text, title, metadata = obj["text"], obj.get("title"), obj.get("metadata")
    if not isinstance(text, str):
        raise EntryError(f"'text' must be a string, got {json_type(text)}", doc_id)
    if title is not None and not isinstance(title, str):
        raise EntryError(f"'title' must be a string, got {json_type(title)}", doc_id)
    if metadata is not None and not isinstance(metadata, dict):
        raise EntryError(f"'metadata' must be an object, got {json_type(metadata)}", doc_id)
    extra = {k: v for k, v in obj.items() if k not in CORPUS_FIELDS}
    if extra:
        metadata = {**extra, **(metadata or {})}
    return Entry(doc_id, text, title or None, metadata, onegen=False)


def split_units(entry: Entry, document_token: str | None) -> Units:
    """The entry's units (module docstring); ``EntryError`` for a corpus line whose text holds the token."""
    if not document_token or document_token not in entry.text:
        return Units([entry.text], "", split=False)
    if not entry.onegen:
        # only OneGen's {uid, messages} entries are cut into units at the token
        raise EntryError(f"text contains the checkpoint's document token {document_token!r}", entry.id)
    *texts, trailing = entry.text.split(document_token)
    return Units(texts, trailing, split=True)


def render_units(renderer: Renderer, texts: list[str], title: str | None = None,
                 trailing: str = "") -> tuple[list[int], list[int]]:
    """Token ids of an entry's units in one sequence, and the position of each unit's document token.

    Unit 0 is ``Renderer.document(texts[0], title)``; each further unit is its plain text + the
    document token; ``trailing`` (context) follows the last. The vector of unit *k* is the hidden
    state at ``positions[k]`` of this one sequence.
    """
    if not texts:
        raise ValueError("an entry has at least one unit")
    doc = renderer.token_ids.document
    ids = renderer.document(texts[0], title)
    positions = [len(ids) - 1]
    for text in texts[1:]:
        ids += renderer.text(text) + [doc]
        positions.append(len(ids) - 1)
    ids += renderer.text(trailing)
    return ids, positions


def as_id(value: Any, field: str) -> str:
    """A document id: a non-blank string, or an integer taken as its decimal string."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EntryError(f"{field!r} must be a string, got {json_type(value)}")
    doc_id = str(value)
    if not doc_id.strip():
        raise EntryError(f"{field!r} is empty")
    return doc_id


def json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)
