"""Chunking by tokens: windows, overlap, source ids and offsets, truncation to the model's context."""

from __future__ import annotations

import pytest

from index_builder.chunking import ChunkConfig, Chunker
from index_builder.corpus import SourceRecord
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.text.rendering import Renderer


@pytest.fixture(scope="module")
def renderer(tiny_checkpoint):
    return Renderer.for_checkpoint(load_checkpoint(tiny_checkpoint))


TEXT = " ".join(f"Paris {i} is the capital of France and the river flows to the sea." for i in range(12))


def record(text=TEXT, title=None):
    return SourceRecord("doc", text, title, {"m": 1}, "c.jsonl:3")


def test_windows_overlap_offsets_and_text(renderer):
    ids = renderer.text(TEXT)
    n = len(ids)
    pieces = Chunker(renderer, ChunkConfig(chunk_tokens=32, chunk_overlap=8), max_length=512).split(record())
    docs = [p.document for p in pieces]
    assert [d.id for d in docs] == [f"doc#{k}" for k in range(len(docs))]
    assert all(d.source == "doc" and d.metadata == {"m": 1} for d in docs)
    spans = [(d.start, d.end) for d in docs]
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (s0, e0), (s1, _e1) in zip(spans, spans[1:], strict=False):
        assert e0 - s0 == 32 and s1 == s0 + 24  # window 32, step 32 - 8
    for d in docs:
        assert d.text in TEXT  # the source text the window's tokens cover, unmangled
        # the window's text tokenises back to (about) the window: BPE may merge differently only at the edges
        assert abs(len(renderer.text(d.text)) - (d.end - d.start)) <= 2
    assert docs[0].text.startswith("Paris 0") and TEXT.endswith(docs[-1].text)
    assert all(p.n_tokens == len(renderer.document(p.document.text)) and not p.truncated for p in pieces)


def test_short_documents_are_not_chunked(renderer):
    (piece,) = Chunker(renderer, ChunkConfig(chunk_tokens=10_000), max_length=512).split(record())
    d = piece.document
    assert (d.id, d.text, d.source, d.start, d.end) == ("doc", TEXT, None, None, None)


def test_max_doc_tokens_truncates_and_says_so(renderer):
    (piece,) = Chunker(renderer, ChunkConfig(max_doc_tokens=20), max_length=512).split(record())
    d = piece.document
    assert piece.truncated and (d.id, d.source, d.start, d.end) == ("doc", "doc", 0, 20)
    assert TEXT.startswith(d.text) and len(d.text) < len(TEXT)


def test_documents_are_cut_to_the_models_context(renderer):
    (piece,) = Chunker(renderer, ChunkConfig(), max_length=24).split(record(title="A title"))
    assert piece.truncated and piece.n_tokens <= 24
    assert piece.n_tokens == len(renderer.document(piece.document.text, "A title"))
    assert piece.document.end is not None and piece.document.end < len(renderer.text(TEXT))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunk_tokens": 0}, "--chunk-tokens must be >= 1"),
        ({"chunk_tokens": 8, "chunk_overlap": 8}, "must be smaller than --chunk-tokens"),
        ({"chunk_overlap": 2}, "--chunk-overlap needs --chunk-tokens"),
        ({"max_doc_tokens": 0}, "--max-doc-tokens must be >= 1"),
    ],
)
def test_invalid_chunk_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChunkConfig(**kwargs)


def test_a_title_longer_than_the_context_is_an_error_naming_the_line(renderer):
    from dataclasses import replace

    titled = Renderer(renderer.tokenizer, replace(renderer.spec, document_template="{title}\n{text}"),
                      renderer.token_ids)
    with pytest.raises(ValueError, match=r"c.jsonl:3: document 'doc' cannot fit the model's context of 4 tokens"):
        Chunker(titled, ChunkConfig(), max_length=4).split(record(title="a title far longer than four tokens"))
