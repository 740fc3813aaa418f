"""What the tests import to build tiny random checkpoints (``onegen_core.random_checkpoint``).

The builders themselves are no test code (``server.demo`` serves one), so they live in
``random_checkpoint``; the tests keep importing them from here: the tiny architectures the
suite covers (``ARCHS``), the tokenizer and config builders, and the checkpoint editors; and
``add_bm25_side_index``, which gives an index dir written in a test its BM25 side index.
"""

from __future__ import annotations

import os
from pathlib import Path

from .formats.index_store import MANIFEST, Manifest
from .random_checkpoint import (
    ARCHS,
    build_tiny_checkpoint,
    build_tokenizer,
    make_query_token_likely,
    tiny_config,
)

__all__ = ["ARCHS", "add_bm25_side_index", "build_tiny_checkpoint", "build_tokenizer", "make_query_token_likely",
           "tiny_config"]


def add_bm25_side_index(index_dir: str | os.PathLike, document_template: str) -> Path:
    """Write the BM25 side index of ``index_dir`` (as the builder's ``--bm25`` does) and record it in its manifest,
    in place (the builder writes both before its atomic rename; a test's index is its own) -> ``index_dir``."""
    from .retrieval.bm25 import write_bm25

    out = Path(index_dir)
    m = Manifest.from_file(out / MANIFEST)
    m.bm25 = write_bm25(out, document_template)
    (out / MANIFEST).write_text(m.to_json())
    return out
