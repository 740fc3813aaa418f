"""Corpus readers: formats, gzip, and rejections that name the file and line."""

from __future__ import annotations

import gzip
import json

import pytest

from index_builder.corpus import CorpusReader, Rejection, SourceEntry, SourceRecord, expand_corpus
from index_builder.errors import BuildError


def read(paths, token="[RD]"):
    reader = CorpusReader(expand_corpus(paths), document_token=token)
    return list(reader), reader


def test_jsonl_fields_gzip_and_blank_lines(tmp_path):
    lines = [
        {"id": "a", "text": "alpha text", "title": "A", "metadata": {"k": 1}},
        {"id": 7, "text": "seven", "url": "http://x"},
    ]
    raw = json.dumps(lines[0]) + "\n\n   \n" + json.dumps(lines[1]) + "\n"
    plain = tmp_path / "c.jsonl"
    plain.write_text(raw)
    gz = tmp_path / "c2.jsonl.gz"
    gz.write_bytes(gzip.compress(raw.encode()))
    items, reader = read([plain])
    assert [type(i) for i in items] == [SourceRecord, SourceRecord]
    a, b = items
    assert (a.id, a.text, a.title, a.metadata, a.origin) == ("a", "alpha text", "A", {"k": 1}, f"{plain}:1")
    assert (b.id, b.title, b.metadata, b.origin) == ("7", None, {"url": "http://x"}, f"{plain}:4")
    gz_items, gz_reader = read([gz])
    assert [(i.id, i.text) for i in gz_items] == [(i.id, i.text) for i in items]
    # the digest is over content, so the gzip copy of the same lines has the same digest
    assert gz_reader.digest == reader.digest and reader.digest.startswith("sha256:")


def test_digest_changes_with_content(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    _, r1 = read([p])
    p.write_text(json.dumps({"id": "a", "text": "y"}) + "\n")
    _, r2 = read([p])
    assert r1.digest != r2.digest


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"id": "a", "text": ', "malformed JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"text": "no id"}', "missing 'id'"),
        ('{"id": "a"}', "missing 'text'"),
        ('{"id": "a", "text": 5}', "'text' must be a string, got number"),
        ('{"id": "a", "text": "   "}', "empty text"),
        ('{"id": true, "text": "x"}', "'id' must be a string, got boolean"),
        ('{"id": "a", "text": "x", "title": 3}', "'title' must be a string"),
        ('{"id": "a", "text": "x", "metadata": [1]}', "'metadata' must be an object, got array"),
        ('{"id": "a", "text": "x [RD] y"}', "contains the checkpoint's document token"),
    ],
)
def test_bad_lines_are_rejected_with_file_and_line(tmp_path, line, reason):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"id": "ok", "text": "fine"}) + "\n" + line + "\n")
    items, _ = read([p])
    assert isinstance(items[0], SourceRecord)
    rej = items[1]
    assert isinstance(rej, Rejection), rej
    assert rej.origin == f"{p}:2"
    assert reason in rej.reason
    assert str(rej).startswith(f"{p}:2: ")


def test_invalid_utf8_and_empty_file(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"id": "a", "text": "\xff"}\n')
    (rej,) = read([p])[0]
    assert isinstance(rej, Rejection) and rej.origin == f"{p}:1" and "UTF-8" in rej.reason
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    (rej,) = read([empty])[0]
    assert isinstance(rej, Rejection) and rej.origin == str(empty) and "empty corpus file" in rej.reason


def test_onegen_db_jsonl_fragments(tmp_path):
    p = tmp_path / "db.jsonl"
    p.write_text(
        json.dumps({"uid": "q1", "messages": [{"role": "user", "content": "Paris is in France."}]}) + "\n"
        + json.dumps({"uid": 2, "messages": [{"role": "user", "content": "First fact.[RD] Second fact.[RD]"}],
                      "src": "wiki"}) + "\n"
        + json.dumps({"uid": "bad", "messages": [{"role": "user"}]}) + "\n"
        + json.dumps({"uid": "one", "messages": [{"role": "user", "content": "Only fact.[RD]\n"}]}) + "\n"
        + json.dumps({"uid": "t", "messages": [{"role": "user", "content": "A.[RD][RD]B.[RD] tail"}]}) + "\n"
    )
    items, _ = read([p])
    q1, two, bad, one, t, tail = items
    assert (q1.id, q1.text, q1.source) == ("q1", "Paris is in France.", None)
    # an entry of several units comes whole: they are encoded in one sequence
    assert isinstance(two, SourceEntry) and two.id == "2" and two.texts == ["First fact.", " Second fact."]
    assert [(u.id, u.text) for u in two.units] == [("2-0", "First fact."), ("2-1", " Second fact.")]
    assert two.units[0].source == "2" and two.units[0].metadata == {"src": "wiki", "uid": "2", "fragment": 0}
    assert isinstance(bad, Rejection) and "messages[0]" in bad.reason and bad.origin == f"{p}:3"
    # a single unit is a document like any other (the same rendering either way)
    assert isinstance(one, SourceRecord) and (one.id, one.text, one.source) == ("one-0", "Only fact.", "one")
    # an empty unit is left out but keeps its place; text after the last [RD] has no vector: reported
    assert isinstance(t, SourceEntry) and t.texts == ["A.", "", "B."]
    assert [type(u) for u in t.units] == [SourceRecord, Rejection, SourceRecord]
    assert "fragment 1 ('t-1'): empty text" in t.units[1].reason
    assert isinstance(tail, Rejection) and tail.doc_id == "t-3" and "after its last '[RD]'" in tail.reason


def test_folder_of_text_and_markdown(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("plain text file")
    (root / "a.md").write_text("# Heading One\n\nBody of a.")
    (root / "sub" / "c.md.gz").write_bytes(gzip.compress(b"compressed markdown"))
    (root / ".hidden.txt").write_text("skip me")
    (root / "notes.csv").write_text("ignored: not a text document")
    (root / "empty.txt").write_text("  \n")
    items, _ = read([root])
    ok = [i for i in items if isinstance(i, SourceRecord)]
    assert [(i.id, i.title) for i in ok] == [("a.md", "Heading One"), ("b.txt", None), ("sub/c.md", None)]
    assert ok[2].text == "compressed markdown"
    (rej,) = [i for i in items if isinstance(i, Rejection)]
    assert rej.origin == str(root / "empty.txt") and "empty text" in rej.reason


def test_paths_that_are_not_corpora(tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        expand_corpus([tmp_path / "missing.jsonl"])
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(BuildError, match="unknown corpus format"):
        expand_corpus([tmp_path / "x.parquet"])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(BuildError, match="no .txt or .md files"):
        expand_corpus([tmp_path / "emptydir"])
    with pytest.raises(BuildError, match="no corpus given"):
        expand_corpus([])
