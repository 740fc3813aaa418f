"""The sharded, resumable, atomic index build: read → encode → merge → publish.

The phases, each in its own module, share a work directory beside the output
(``index_builder.workdir``: its layout, the resume check, the atomic publish):

1. ``ingest`` — rank 0 reads the corpus into the staged docstore;
2. encode (here) — every rank encodes its share of the pending shards into shard files;
3. ``merge`` — rank 0 assembles the FAISS index, docstore, BM25 side index and manifest, and publishes them.

Encoding goes through ``onegen_core.retrieval.encoder.Encoder``, the standalone encoder: the engine's
native forward, rendering and normalisation, run without the engine. A document is rendered
by ``Renderer.document`` and encoded at its document token; the units of a OneGen entry of
several units are encoded in one sequence (``onegen_core.text.documents``), each at its own
document token, as training encodes them. Within a shard, ``Encoder.encode_sorted`` groups
the sequences in length buckets (``onegen_core.model.bucketing``: at most ``batch_tokens`` tokens
and ``batch_size`` sequences, little padding) and puts the vectors back in order. A shard's
vectors do not depend on which rank or run encoded it, so an interrupted, resumed or
distributed build gives the same index as an uninterrupted single-process one. The settings
are ``BuildConfig`` (``index_builder.config``), the command line's flags derived from them.

The BM25 side index (``bm25/``, for hybrid retrieval; ``onegen_core.retrieval.bm25`` says what it indexes) is
written by default and needs ``bm25s`` (the ``default-model`` extra): without it the build stops before any
work with one line naming the extra and ``--no-bm25``, rather than publish an index that cannot serve hybrid
retrieval. It does not decide the vectors, so a build resumed with or without ``--no-bm25`` reuses its shards.

Under ``torchrun`` the ranks share the work directory (one node, or a filesystem every node
sees) and run every phase together (``onegen_core.distributed.RankContext.synced``): rank 0
reads the corpus, every rank encodes its share of the pending shards, rank 0 merges. The
process group carries only barriers and failure flags (no vectors, no pickled objects), and
a failure on any rank stops all of them at the end of the phase instead of leaving them
waiting.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from onegen_core.device import resolve_device, resolve_dtype
from onegen_core.distributed import RankContext
from onegen_core.formats.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from onegen_core.formats.index_store import Manifest, sqlite_uri
from onegen_core.formats.spec import SpecError
from onegen_core.retrieval.bm25 import import_bm25s
from onegen_core.retrieval.encoder import Encoder
from onegen_core.text.rendering import Renderer

from .config import BuildConfig
from .corpus import corpus_signature, expand_corpus
from .errors import BuildError
from .faiss_index import check_trainable, make_index, resolve_factory
from .ingest import ingest
from .merge import merge_and_publish, n_shards
from .workdir import BUILDER_VERSION, WorkDir, save_npy_atomic


@dataclass
class BuildResult:
    out: Path
    count: int
    factory: str
    shards: int
    shards_encoded: int  # by this run (rank 0: all ranks; other ranks: their own)
    shards_reused: int  # found complete from an interrupted run
    documents_encoded: int
    rejected: int
    truncated: int
    seconds: float
    manifest: Manifest | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: read, load_model, encode, merge


# ---------------------------------------------------------------------- the build
def build_index(cfg: BuildConfig, *, dist: RankContext | None = None) -> BuildResult:
    """Build ``cfg.out``: every rank encodes its share of the shards, rank 0 merges and publishes, and every
    rank returns once the index is published (rank 0's result counts all ranks, another's only its own share)."""
    dist = dist or RankContext()
    t0 = time.monotonic()
    work = WorkDir(cfg.out)
    ckpt = _load_checkpoint(cfg.checkpoint)
    if cfg.bm25:
        require_bm25s()
    dim = int(ckpt.config.hidden_size)
    max_length = int(ckpt.config.max_position_embeddings)
    try:  # the engine's resolvers (onegen_core.device); their messages start with the option's name
        dev = resolve_device(cfg.device, local_rank=dist.local_rank if dist.distributed else None)
        dtype = str(resolve_dtype(cfg.dtype, dev)).removeprefix("torch.")
    except ValueError as e:
        raise BuildError(f"--{e}") from None
    device = str(dev)
    if cfg.batch_tokens is None:  # a CPU runs big GEMMs out of cache; a GPU wants them big
        cfg = replace(cfg, batch_tokens=4096 if device == "cpu" else 16384)
    settings = _settings(cfg, ckpt, device, dtype)
    timings: dict[str, float] = {}
    try:
        with dist.synced():
            files = expand_corpus(cfg.corpus)
            if cfg.index.strip().lower() not in ("flat", "hnsw", "ivfpq"):
                make_index(cfg.index, dim)  # an unknown factory string fails now, not after encoding
            if dist.is_main:
                work.prepare(settings, corpus_signature(files), overwrite=cfg.overwrite, restart=cfg.restart,
                             log=cfg.log)
        with dist.synced():
            if not work.state.is_file():
                raise BuildError(
                    f"{work.path}: the work directory is not visible from rank {dist.rank}; a distributed build "
                    "needs its output on a filesystem every rank sees"
                )
            if dist.is_main and not work.ingest_done.is_file():
                t_read = time.monotonic()
                try:
                    ingest(work, cfg, ckpt, files, max_length)
                    timings["read"] = time.monotonic() - t_read
                except BuildError:
                    work.discard()  # an invalid corpus leaves nothing behind: the next run starts afresh
                    raise
        ingested = json.loads(work.ingest_done.read_text())
        count = int(ingested["count"])
        with dist.synced():
            factory = resolve_factory(cfg.index, dim, count)
            check_trainable(factory, dim, count, cfg.train_size)
            t_encode = time.monotonic()
            encoded, encoded_docs, reused = _encode(work, cfg, ckpt, count, dim, device, dtype, dist, timings)
            timings["encode"] = time.monotonic() - t_encode - timings.get("load_model", 0.0)
        shards = n_shards(count, cfg.shard_size)
        reused_docs = sum(min(cfg.shard_size, count - i * cfg.shard_size) for i in reused)
        result = BuildResult(cfg.out, count, factory, shards, encoded, len(reused), encoded_docs,
                             int(ingested["rejected"]), int(ingested["truncated"]), time.monotonic() - t0,
                             timings=timings)
        # every rank waits for the merge: a rank exits 0 only once the index is published, and no rank tears
        # down the process group while another still uses it (gloo can abort a process that does)
        with dist.synced():
            if dist.is_main:
                result.shards_encoded = shards - len(reused)  # all ranks together
                result.documents_encoded = count - reused_docs
                t_merge = time.monotonic()
                result.manifest = merge_and_publish(work, cfg, ckpt, ingested, factory, dim, dist.world_size, dtype)
                timings["merge"] = time.monotonic() - t_merge
        result.seconds = time.monotonic() - t0
        return result  # on other ranks: this rank's share
    finally:
        work.unlock()


def _load_checkpoint(path: Path) -> Checkpoint:
    try:
        return load_checkpoint(path)
    except (CheckpointError, SpecError, OSError) as e:
        raise BuildError(f"--checkpoint {path}: {e}") from None


def require_bm25s() -> None:
    """Stop before any work when the BM25 side index cannot be written."""
    try:
        import_bm25s()
    except ImportError as e:
        raise BuildError(f"{e}, or pass --no-bm25 to do without it") from None


def _settings(cfg: BuildConfig, ckpt: Checkpoint, device: str, dtype: str) -> dict[str, Any]:
    """What decides the staged documents and their vectors: a resumed build must use the same."""
    return {
        "builder_version": BUILDER_VERSION,
        "checkpoint_fingerprint": ckpt.fingerprint,
        "corpus": [str(p.resolve()) for p in cfg.corpus],
        "chunk_tokens": cfg.chunk_tokens,
        "chunk_overlap": cfg.chunk_overlap,
        "max_doc_tokens": cfg.max_doc_tokens,
        "on_invalid": cfg.on_invalid,
        "dtype": dtype,  # resolved: "auto" resumes only where it means the same
        "device_type": device.split(":")[0],
        "batch_tokens": cfg.batch_tokens,
        "batch_size": cfg.batch_size,
        "shard_size": cfg.shard_size,
    }


# ---------------------------------------------------------------------- phase 2: encode shards
def _shard_done(work: WorkDir, i: int, rows: int, dim: int) -> bool:
    p = work.shard_path(i)
    if not p.is_file():
        return False
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float32


def _encode(work: WorkDir, cfg: BuildConfig, ckpt: Checkpoint, count: int, dim: int, device: str, dtype: str,
            dist: RankContext, timings: dict[str, float]) -> tuple[int, int, set[int]]:
    """Encode this rank's share of the missing shards. Returns (shards and documents it encoded, shards reused)."""
    n = n_shards(count, cfg.shard_size)
    rows = [min(cfg.shard_size, count - i * cfg.shard_size) for i in range(n)]
    pending = [i for i in range(n) if not _shard_done(work, i, rows[i], dim)]
    reused = set(range(n)) - set(pending)
    dist.sync()  # every rank has listed the shards before any writes one
    mine = pending[dist.rank::dist.world_size]
    if reused and dist.is_main:
        cfg.log(f"{len(reused)} of {n} shard(s) already encoded; encoding the other {len(pending)}")
    if not mine:
        return 0, 0, reused
    t_load = time.monotonic()
    encoder = Encoder.from_checkpoint(ckpt, dtype=dtype, device=device)
    timings["load_model"] = time.monotonic() - t_load
    if encoder.dim != dim:
        raise AssertionError(f"encoder dim {encoder.dim} != config hidden size {dim}")
    renderer = Renderer.for_checkpoint(ckpt)
    total = sum(rows[i] for i in mine)
    bar = tqdm(total=total, desc="encoding" if dist.world_size == 1 else f"encoding (rank {dist.rank})", unit="doc",
               disable=not cfg.progress or not dist.is_main, dynamic_ncols=True, smoothing=0.1)
    con = sqlite3.connect(sqlite_uri(work.staged), uri=True)
    try:
        for i in mine:
            seqs, positions = _shard_sequences(con, renderer, i * cfg.shard_size, rows[i], i)
            vecs = encoder.encode_sorted(seqs, positions, batch_tokens=cfg.batch_tokens, batch_size=cfg.batch_size,
                                         progress=bar.update)
            save_npy_atomic(work.shard_path(i), vecs)
    finally:
        con.close()
        bar.close()
    return len(mine), total, reused


def _shard_sequences(con: sqlite3.Connection, renderer: Renderer, lo: int, rows: int,
                     shard: int) -> tuple[list[list[int]], list[list[int]]]:
    """The sequences that encode vector ids ``[lo, lo + rows)``, and the positions to take in each, such
    that the rows come out in vector-id order: a document rendered alone, at its last token; the units of
    one OneGen entry in one sequence, at their positions (``ingest``)."""
    docs = con.execute(
        "SELECT d.text, d.title, u.entry, u.position FROM documents d LEFT JOIN units u ON u.vector_id = d.vector_id "
        "WHERE d.vector_id >= ? AND d.vector_id < ? ORDER BY d.vector_id",
        (lo, lo + rows),
    ).fetchall()
    if len(docs) != rows:
        raise AssertionError(f"shard {shard}: {len(docs)} staged documents, expected {rows}")
    seqs: list[list[int]] = []
    positions: list[list[int]] = []
    last_entry = None
    for text, title, entry, position in docs:
        if entry is None:
            seqs.append(renderer.document(text, title))
            positions.append([len(seqs[-1]) - 1])
            last_entry = None
        elif entry == last_entry:  # an entry's units are consecutive vector ids
            positions[-1].append(position)
        else:
            (blob,) = con.execute("SELECT ids FROM entries WHERE entry = ?", (entry,)).fetchone()
            seqs.append(np.frombuffer(blob, dtype=np.int32).tolist())
            positions.append([position])
            last_entry = entry
    return seqs, positions
