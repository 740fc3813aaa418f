"""Passage chunking by tokens, with overlap, keeping the source id and token offsets.

A source document longer than ``chunk_tokens`` tokens of the checkpoint's tokenizer is
split into windows of ``chunk_tokens`` with ``chunk_overlap`` tokens shared between
neighbours; each window becomes a document ``{id}#{k}`` whose ``source`` is the
original id and whose ``start`` / ``end`` are token offsets in the source's
tokenisation. A window's text is the source text its tokens cover (through the
tokenizer's offset mapping, so no character is mangled at a window edge).

Without chunking, ``max_doc_tokens`` truncates a long document to its first tokens,
and every document is also cut to fit the model's context once rendered (document
template + title + the document RET token). Truncations are counted and reported,
and a truncated document keeps its ``source`` and offsets so the cut is visible.
Rendering itself is ``onegen_core.text.rendering.Renderer.document``: never re-done here.
"""

from __future__ import annotations

from dataclasses import dataclass

from onegen_core.formats.index_store import Document
from onegen_core.text.rendering import Renderer

from .config import ChunkConfig
from .corpus import SourceRecord


@dataclass
class Piece:
    """A document ready to stage: what goes to the docstore, and its rendered length in tokens."""

    document: Document
    n_tokens: int
    truncated: bool


class Chunker:
    def __init__(self, renderer: Renderer, config: ChunkConfig, max_length: int):
        self.renderer = renderer
        self.tokenizer = renderer.tokenizer
        self.config = config
        self.max_length = max_length  # the model's context: a rendered document must fit in it
        if max_length < 2:
            raise ValueError(f"the model's context ({max_length} tokens) cannot hold a document")

    def split(self, rec: SourceRecord) -> list[Piece]:
        try:  # corpus text is plain text, as Renderer.document tokenises it: special-token strings stay characters
            enc = self.tokenizer(rec.text, add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=True, verbose=False)
            ids: list[int] = enc["input_ids"]
            offsets: list[tuple[int, int]] | None = enc["offset_mapping"]
        except NotImplementedError:  # a slow (Python) tokenizer has no offsets: windows are decoded instead
            ids, offsets = self.renderer.text(rec.text), None
        n = len(ids)
        cfg = self.config
        if cfg.chunk_tokens is not None and n > cfg.chunk_tokens:
            step = cfg.chunk_tokens - cfg.chunk_overlap
            spans = []
            start = 0
            while True:
                end = min(start + cfg.chunk_tokens, n)
                spans.append((start, end))
                if end == n:
                    break
                start += step
            return [self._piece(rec, ids, offsets, s, e, n, f"{rec.id}#{k}", chunk=True)
                    for k, (s, e) in enumerate(spans)]
        limit = cfg.max_doc_tokens if cfg.chunk_tokens is None else None
        end = min(n, limit) if limit else n
        return [self._piece(rec, ids, offsets, 0, end, n, rec.id, chunk=False)]

    def _piece(self, rec: SourceRecord, ids: list[int], offsets: list[tuple[int, int]] | None, start: int,
               end: int, n: int, doc_id: str, *, chunk: bool) -> Piece:
        truncated = not chunk and end < n
        while True:
            text = self._span_text(rec.text, ids, offsets, start, end, n)
            n_tokens = len(self.renderer.document(text, rec.title))
            if n_tokens <= self.max_length:
                break
            if end - start <= 1:
                raise ValueError(
                    f"{rec.origin}: document {rec.id!r} cannot fit the model's context of {self.max_length} tokens "
                    "even with one text token (is the title or the document template too long?)"
                )
            # Cut the span by the excess (rendering adds template tokens around it) and measure again.
            end = max(start + 1, end - (n_tokens - self.max_length))
            truncated = True
        whole = start == 0 and end == n
        doc = Document(
            id=doc_id,
            text=text,
            title=rec.title,
            metadata=rec.metadata,
            source=rec.id if not whole else rec.source,
            start=None if whole else start,
            end=None if whole else end,
        )
        return Piece(doc, n_tokens, truncated)

    def _span_text(self, text: str, ids: list[int], offsets: list[tuple[int, int]] | None, start: int, end: int,
                   n: int) -> str:
        if start == 0 and end == n:
            return text
        if offsets is None:
            return self.tokenizer.decode(ids[start:end])
        return text[offsets[start][0]:offsets[end - 1][1]]
