"""Phase 3 of a build: merge the shard files into the index directory and publish it (rank 0 alone).

The shards' vectors go into one FAISS index (trained on a seeded sample for IVF / PQ
factories, ``faiss_index.assemble``), the staged docstore's documents into
``docstore.sqlite``, the rejected inputs (``--skip-invalid``) into ``rejected.jsonl``, the
docstore's texts into the BM25 side index ``bm25/`` (unless ``--no-bm25``;
``onegen_core.retrieval.bm25.write_bm25``, through the checkpoint's document template), and
the manifest records the checkpoint's fingerprint, the resolved encode dtype
(``Manifest.encode_dtype``) and the builder's settings. The directory is assembled in the
work directory's ``final/`` and renamed into place (``WorkDir.publish``).
"""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from onegen_core.formats.checkpoint import Checkpoint
from onegen_core.formats.index_store import (
    DOCSTORE,
    INDEX_FILE,
    MANIFEST,
    Manifest,
    create_docstore,
    import_faiss,
    sqlite_uri,
)
from onegen_core.retrieval.bm25 import write_bm25

from .faiss_index import assemble
from .ingest import REJECTED_FILE
from .workdir import BUILDER_VERSION, WorkDir, write_text_atomic

if TYPE_CHECKING:
    from .config import BuildConfig


def n_shards(count: int, shard_size: int) -> int:
    return (count + shard_size - 1) // shard_size


def merge_and_publish(work: WorkDir, cfg: BuildConfig, ckpt: Checkpoint, ingest: dict[str, Any], factory: str,
                      dim: int, world: int, encode_dtype: str) -> Manifest:
    faiss = import_faiss()
    threads = faiss.omp_get_max_threads()
    if cfg.faiss_threads is not None:  # FAISS and torch may share one OpenMP runtime: restored below
        faiss.omp_set_num_threads(cfg.faiss_threads)
    try:
        manifest = _merge(work, cfg, ckpt, ingest, factory, dim, world, encode_dtype)
    finally:
        faiss.omp_set_num_threads(threads)
    work.publish()
    return manifest


def _merge(work: WorkDir, cfg: BuildConfig, ckpt: Checkpoint, ingest: dict[str, Any], factory: str, dim: int,
           world: int, encode_dtype: str) -> Manifest:
    faiss = import_faiss()
    count = int(ingest["count"])
    n = n_shards(count, cfg.shard_size)
    missing = [i for i in range(n) if not work.shard_path(i).is_file()]
    if missing:
        raise AssertionError(f"shards {missing[:5]} are missing after encoding")
    if work.final.exists():
        shutil.rmtree(work.final)
    work.final.mkdir()

    def load_shard(i: int) -> np.ndarray:
        return np.load(work.shard_path(i), mmap_mode="r", allow_pickle=False)

    bar = tqdm(total=count, desc=f"building {factory}", unit="vec", disable=not cfg.progress, dynamic_ncols=True)
    try:
        index, facts = assemble(
            factory, dim, count, load_shard, [i * cfg.shard_size for i in range(n)],
            train_size=cfg.train_size, seed=cfg.seed, nprobe=cfg.nprobe, ef_search=cfg.ef_search,
            on_shard=bar.update,
        )
    finally:
        bar.close()
    faiss.write_index(index, str(work.final / INDEX_FILE))
    del index

    con = create_docstore(work.final / DOCSTORE)
    with con:
        con.execute("ATTACH DATABASE ? AS staged", (sqlite_uri(work.staged),))
        con.execute("INSERT INTO documents SELECT * FROM staged.documents ORDER BY vector_id")
    rejected = con.execute("SELECT origin, doc_id, reason FROM staged.rejected ORDER BY seq").fetchall()
    con.execute("DETACH DATABASE staged")
    con.close()
    if rejected:
        with open(work.final / REJECTED_FILE, "w") as f:
            for origin, doc_id, reason in rejected:
                f.write(json.dumps({"origin": origin, "id": doc_id, "reason": reason}) + "\n")
    bm25 = write_bm25(work.final, ckpt.spec.document_template, progress=cfg.progress) if cfg.bm25 else None

    manifest = Manifest(
        checkpoint_fingerprint=ckpt.fingerprint,
        dim=dim,
        count=count,
        factory=factory,
        special_token_ids=dict(ckpt.token_ids.by_name),
        corpus_digest=ingest["digest"],
        encode_dtype=encode_dtype,
        bm25=bm25,
        extra={
            "builder": {
                "version": BUILDER_VERSION,
                "index": cfg.index,
                "dtype": encode_dtype,
                "chunk_tokens": cfg.chunk_tokens,
                "chunk_overlap": cfg.chunk_overlap,
                "max_doc_tokens": cfg.max_doc_tokens,
                "shard_size": cfg.shard_size,
                "batch_tokens": cfg.batch_tokens,
                "world_size": world,
            },
            "train_size": facts["train_size"],
            "search_defaults": facts["search_defaults"],
            "corpus": {
                "files": ingest["files"],
                "source_documents": ingest["sources"],
                "chunked_sources": ingest["chunked_sources"],
                "truncated": ingest["truncated"],
                "rejected": ingest["rejected"],
                "tokens": ingest["tokens"],
            },
        },
    )
    write_text_atomic(work.final / MANIFEST, manifest.to_json())
    return manifest
