"""Looking at a built index: ``info`` (what is in it), ``search`` (try it by hand), ``verify``.

``verify`` checks an index against a checkpoint: the manifest's fingerprint and
special-token ids must be the checkpoint's, the FAISS index, docstore and manifest
must agree on the count and dimension, and a seeded sample of documents is encoded
again with the engine's encoder, in the dtype the manifest records, and compared with
the stored vectors: a document alone (``Renderer.document``), a unit of a OneGen entry
after the units before it (``onegen_core.text.documents.render_units``), as the build did.
An exact index (Flat storage) must hold the same vector within ``atol``; a compressed
one (PQ, SQ) must hold what its own codec makes of the fresh vector, so a quantised
index is checked as strictly as its codec allows.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onegen_core.formats.checkpoint import Checkpoint
from onegen_core.formats.index_store import (
    DOCSTORE,
    INDEX_FILE,
    MANIFEST,
    VERSIONS,
    DocStore,
    Document,
    FingerprintMismatchError,
    IndexError_,
    IndexStore,
    Manifest,
    list_versions,
    sqlite_uri,
    version_name,
)
from onegen_core.text.documents import render_units
from onegen_core.text.rendering import Renderer

from .errors import BuildError, VerifyError
from .faiss_index import codec_of, is_exact, reconstruct


def open_index(path: str | Path, *, expected_fingerprint: str | None = None) -> IndexStore:
    """``IndexStore.open`` with user-facing errors (a mismatched fingerprint stays a ``VerifyError``)."""
    try:
        return IndexStore.open(path, expected_fingerprint=expected_fingerprint)
    except FingerprintMismatchError as e:
        raise VerifyError(str(e)) from None
    except (IndexError_, RuntimeError, OSError) as e:
        raise BuildError(f"{path}: cannot open the index: {str(e).strip()}") from None


# ---------------------------------------------------------------------- info
def index_info(path: str | Path, *, samples: int = 3) -> dict[str, Any]:
    """What is in an index dir: the manifest, file sizes, the FAISS type, docstore counts, a few documents."""
    store = open_index(path)
    path = store.path  # a versioned directory's current version
    with sqlite3.connect(sqlite_uri(path / DOCSTORE), uri=True) as con:
        n_docs = con.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        n_chunks = con.execute("SELECT COUNT(*) FROM documents WHERE source IS NOT NULL").fetchone()[0]
        n_sources = con.execute("SELECT COUNT(DISTINCT COALESCE(source, doc_id)) FROM documents").fetchone()[0]
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    from .faiss_index import import_faiss

    faiss = import_faiss()
    m = store.manifest
    return {
        "path": str(path),
        "version": store.version,
        "versions": _versions(store.root, store.version),
        "manifest": json.loads(m.to_json()),
        "faiss_type": type(faiss.downcast_index(store.index)).__name__,
        "ntotal": int(store.index.ntotal),
        "docstore_rows": n_docs,
        "documents_with_source": n_chunks,
        "distinct_sources": n_sources,
        "files": files,
        "sample": [
            {"vector_id": i, "id": d.id, "title": d.title, "text": _snippet(d.text)}
            for i, d in zip(range(min(samples, m.count)), store.docstore.get(list(range(min(samples, m.count)))),
                            strict=True) if d is not None
        ],
    }


def _versions(root: Path, current: int | None) -> list[dict[str, Any]]:
    """Every version of a versioned directory: number, vector count, build/update time, whether current."""
    out = []
    for n in list_versions(root):
        try:
            m = Manifest.from_file(root / VERSIONS / version_name(n) / MANIFEST)
        except IndexError_:
            continue  # removed (--keep) or unreadable while we looked
        out.append({"version": n, "count": m.count, "time": m.build_time, "current": n == current,
                    "update": m.extra.get("update")})
    return out


def format_info(info: dict[str, Any]) -> str:
    m = info["manifest"]
    extra = m.get("extra", {})
    corpus = extra.get("corpus", {})
    lines = [
        f"index        {info['path']}",
        f"vectors      {m['count']} x {m['dim']} ({m['metric']}, normalised={m['normalized']})",
        f"faiss        {m['factory']} ({info['faiss_type']})"
        + (f", trained on {extra['train_size']} vectors" if extra.get("train_size") else ""),
        f"search       {extra.get('search_defaults') or '-'}",
        "bm25         " + (f"{bm25['documents']} documents, {bm25['terms']} terms (bm25s {bm25['bm25s']}), text "
                           f"{bm25['document_template']!r}" if (bm25 := m.get("bm25")) else
                           "none: hybrid retrieval is unavailable (built with --no-bm25 or before BM25 side indexes)"),
        f"checkpoint   {m['checkpoint_fingerprint']}",
        f"tokens       {m['special_token_ids']}",
        f"corpus       {m['corpus_digest']}",
        f"documents    {info['docstore_rows']} rows, {info['distinct_sources']} sources, "
        f"{info['documents_with_source']} chunk/truncated rows",
    ]
    if corpus:
        lines.append(
            f"ingest       {corpus.get('files')} file(s), {corpus.get('truncated', 0)} truncated, "
            f"{corpus.get('rejected', 0)} rejected, {corpus.get('tokens', 0)} tokens"
        )
    lines.append(f"built        {m['build_time']}")
    for v in info.get("versions", []):
        u = v["update"]
        what = (f"update of {u['base_version']}: +{u['added']} ~{u['replaced']} -{u['deleted']} documents, "
                f"{u['encoded']} vectors encoded" if u else "build")
        lines.append(f"version {v['version']:>6}{' *' if v['current'] else '  '} {v['count']} vectors, {v['time']}, {what}")
    lines.append("files        " + ", ".join(f"{k} ({_size(v)})" for k, v in info["files"].items()))
    for s in info["sample"]:
        lines.append(f"  [{s['vector_id']}] {s['id']}" + (f" — {s['title']}" if s["title"] else "") + f": {s['text']}")
    return "\n".join(lines)


def _snippet(text: str, n: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------- search
def encode_dtype(manifest: Manifest) -> str:
    """The dtype the index's documents were encoded in (older manifests: the builder's setting, else float32)."""
    return manifest.encode_dtype or manifest.extra.get("builder", {}).get("dtype") or "float32"


def search(path: str | Path, checkpoint: Checkpoint, queries: list[str], k: int = 5, *,
           nprobe: int | None = None, ef_search: int | None = None, device: str = "cpu",
           dtype: str | None = None) -> list[list[Any]]:
    """Encode ``queries`` with the checkpoint (query template + [RQ]; in the index's encode dtype unless
    ``dtype`` is given) and search the index: hits per query."""
    from onegen_core.retrieval.encoder import Encoder
    from onegen_core.retrieval.retriever import FaissRetriever

    store = open_index(path, expected_fingerprint=checkpoint.fingerprint)
    retriever = FaissRetriever(store, nprobe=nprobe, ef_search=ef_search)
    encoder = Encoder.from_checkpoint(checkpoint, dtype=dtype or encode_dtype(store.manifest), device=device)
    return retriever.search(encoder.encode_queries(queries), k)


# ---------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    path: str
    fingerprint: str
    count: int
    checked: int
    exact: bool
    max_abs_diff: float
    min_cosine: float
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def verify(path: str | Path, checkpoint: Checkpoint, *, sample: int = 32, seed: int = 0, atol: float = 1e-4,
           device: str = "cpu", dtype: str | None = None, check_fingerprint: bool = True) -> VerifyReport:
    """Check the index against ``checkpoint``; raises ``VerifyError`` on a fingerprint mismatch, unless
    ``check_fingerprint`` is False (then only the content says: are the stored vectors this checkpoint's?)."""
    from onegen_core.retrieval.encoder import Encoder

    store = open_index(path, expected_fingerprint=checkpoint.fingerprint if check_fingerprint else None)
    m = store.manifest
    failures: list[str] = []
    if m.special_token_ids and m.special_token_ids != dict(checkpoint.token_ids.by_name):
        failures.append(f"special-token ids differ: index {m.special_token_ids}, checkpoint "
                        f"{dict(checkpoint.token_ids.by_name)}")
    if m.dim != int(checkpoint.config.hidden_size):
        failures.append(f"dimension {m.dim} differs from the model's hidden size {checkpoint.config.hidden_size}")
    n_rows = len(store.docstore)
    if n_rows != m.count:
        failures.append(f"{DOCSTORE} has {n_rows} rows but {MANIFEST} and {INDEX_FILE} hold {m.count} vectors")
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(m.count, size=min(sample, m.count), replace=False))
    docs = store.docstore.get([int(i) for i in ids])
    missing = [int(i) for i, d in zip(ids, docs, strict=True) if d is None]
    if missing:
        failures.append(f"vector ids {missing[:10]} have no row in {DOCSTORE}")
    keep = [k for k, d in enumerate(docs) if d is not None]
    ids = ids[keep]
    docs = [docs[k] for k in keep]
    exact = is_exact(store.index)
    max_diff, min_cos = 0.0, 1.0
    if docs:
        encoder = Encoder.from_checkpoint(checkpoint, dtype=dtype or encode_dtype(m), device=device)
        seqs = [_sequence_of(store.docstore, int(vid), d, encoder.renderer) for vid, d in zip(ids, docs, strict=True)]
        keep = [k for k, seq in enumerate(seqs) if seq is not None]  # the others are not counted as checked
        ids, docs, seqs = ids[keep], [docs[k] for k in keep], [seqs[k] for k in keep]
    if docs:
        fresh = encoder.encode_token_ids(seqs).numpy()
        stored = reconstruct(store.index, ids)
        if exact:
            expected = fresh
        else:
            codec = codec_of(store.index)
            expected = codec.sa_decode(codec.sa_encode(np.ascontiguousarray(fresh, dtype=np.float32)))
        diff = np.abs(expected - stored).max(axis=1)
        max_diff = float(diff.max())
        min_cos = float((fresh * stored).sum(axis=1).min())
        bad = [(int(i), float(x)) for i, x in zip(ids, diff, strict=True) if x > atol]
        limit = 0 if exact else max(1, len(ids) // 20)  # a quantiser may round a borderline vector differently
        if len(bad) > limit:
            shown = ", ".join(f"{i} ({docs[list(ids).index(i)].id!r}: {x:.2g})" for i, x in bad[:5])
            failures.append(
                f"{len(bad)} of {len(ids)} re-encoded vectors differ from the stored ones by more than {atol:g}: {shown}"
            )
    return VerifyReport(str(path), m.checkpoint_fingerprint, m.count, len(docs), exact, max_diff, min_cos, failures)


def _sequence_of(docstore: DocStore, vector_id: int, doc: Document, renderer: Renderer) -> list[int] | None:
    """The tokens whose last hidden state the build stored as ``doc``'s vector: the document alone, or for unit
    *k* of a OneGen entry, units 0 .. k of the entry in one sequence (None if one of them is not in the index,
    as an empty unit is not: its text is then unknown)."""
    k = _unit_of_entry(doc)
    if not k:
        return renderer.document(doc.text, doc.title)
    earlier = docstore.get(list(range(vector_id - k, vector_id)))  # an entry's units are consecutive vector ids
    if any(e is None or e.source != doc.source or _unit_of_entry(e) != j for j, e in enumerate(earlier)):
        return None
    ids, _ = render_units(renderer, [e.text for e in earlier] + [doc.text])
    return ids


def _unit_of_entry(doc: Document) -> int | None:
    """*k* if ``doc`` is unit *k* of a OneGen entry (document ``uid-k``, metadata ``uid`` and ``fragment``)."""
    meta = doc.metadata or {}
    k = meta.get("fragment")
    if doc.source is None or doc.start is not None or meta.get("uid") != doc.source or not isinstance(k, int):
        return None
    return k if doc.id == f"{doc.source}-{k}" else None
