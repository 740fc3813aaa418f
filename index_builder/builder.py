"""The sharded, resumable, atomic index build: read → encode → merge → publish.

Everything happens in a work directory beside the output, ``{out}.building/``:

* ``state.json`` — the settings that decide the vectors (checkpoint fingerprint,
  chunking, dtype, device type, batching, shard size) and the corpus' size/mtime;
  a rerun with the same arguments resumes, a rerun with others is refused (or
  ``--restart`` discards the old work).
* ``staged.sqlite`` — the docstore being built (duplicate ids caught by a unique
  index, so memory stays bounded), each document's origin (file:line) and rendered
  length, and the rejected inputs. ``ingest.json`` marks it complete.
* ``shards/NNNNN.npy`` — vectors of vector ids ``[N*shard_size, (N+1)*shard_size)``,
  each written aside and renamed, so a shard file is complete or absent; a rerun
  encodes only the missing ones.
* ``final/`` — the index directory being assembled; renamed to ``out`` when complete.

Encoding goes through ``onegen_core.encoder.Encoder`` (the engine's encoder) on the
documents rendered by ``Renderer.document``; within a shard documents are sorted by
length, packed into token-budget batches, and put back in order. A shard's vectors do
not depend on which rank or run encoded it, so an interrupted, resumed or distributed
build gives the same index as an uninterrupted single-process one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from onegen_core.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from onegen_core.index_store import (
    DOCSTORE,
    INDEX_FILE,
    MANIFEST,
    Manifest,
    create_docstore,
    import_faiss,
    insert_documents,
    sqlite_uri,
)
from onegen_core.model.attention import MAX_PAD_WASTE
from onegen_core.rendering import Renderer
from onegen_core.spec import SpecError

from .chunking import ChunkConfig, Chunker
from .corpus import CorpusReader, Rejection, corpus_signature, expand_corpus
from .distributed import Dist
from .errors import BuildError
from .faiss_index import assemble, check_trainable, make_index, resolve_factory

BUILDER_VERSION = 1
REJECTED_FILE = "rejected.jsonl"
MAX_REPORTED_ERRORS = 20


@dataclass
class BuildConfig:
    """Everything ``python -m index_builder build`` takes; validates on construction."""

    checkpoint: Path
    corpus: list[Path]
    out: Path
    index: str = "flat"  # flat | hnsw | ivfpq | a FAISS factory string
    batch_tokens: int | None = None  # token budget of one packed forward; None: 4096 on CPU, 16384 on GPU
    batch_size: int = 512  # most documents in one forward
    device: str = "auto"
    dtype: str = "float32"
    chunk_tokens: int | None = None
    chunk_overlap: int = 0
    max_doc_tokens: int | None = None
    shard_size: int = 4096  # documents per shard file (the unit of resumption)
    train_size: int = 100_000  # most vectors an IVF / PQ index trains on
    nprobe: int | None = 16
    ef_search: int | None = 64
    on_invalid: Literal["error", "skip"] = "error"
    overwrite: bool = False
    restart: bool = False
    progress: bool = True
    seed: int = 0
    faiss_threads: int | None = None  # OpenMP threads FAISS trains and adds with; None: FAISS's default (all cores)
    log: Callable[[str], None] = field(default=lambda msg: None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.out = Path(self.out)
        self.corpus = [Path(p) for p in self.corpus]
        for name in ("batch_size", "shard_size", "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_tokens", "nprobe", "ef_search", "faiss_threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"--dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.on_invalid not in ("error", "skip"):
            raise ValueError(f"on_invalid must be 'error' or 'skip', got {self.on_invalid!r}")
        self.chunking = ChunkConfig(self.chunk_tokens, self.chunk_overlap, self.max_doc_tokens)


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


# ---------------------------------------------------------------------- the work directory
class WorkDir:
    def __init__(self, out: Path):
        self.out = out
        self.path = out.with_name(out.name + ".building")
        self.state = self.path / "state.json"
        self.staged = self.path / "staged.sqlite"
        self.ingest_done = self.path / "ingest.json"
        self.shards = self.path / "shards"
        self.final = self.path / "final"
        self._lock_fd: int | None = None

    def shard_path(self, i: int) -> Path:
        return self.shards / f"{i:05d}.npy"

    def lock(self) -> None:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BuildError(f"{self.path}: another build of {self.out} is running (it holds the lock)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``path`` aside and rename it into place: after a crash it is complete or absent."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the build
def build_index(cfg: BuildConfig, *, dist: Dist | None = None) -> BuildResult:
    """Build ``cfg.out`` (rank 0 publishes it); other ranks return after encoding their shards."""
    dist = dist or Dist()
    t0 = time.monotonic()
    work = WorkDir(cfg.out)
    ckpt = _load_checkpoint(cfg.checkpoint)
    dim = int(ckpt.config.hidden_size)
    max_length = int(ckpt.config.max_position_embeddings)
    device = _resolve_device(cfg.device, dist)
    if cfg.batch_tokens is None:  # a CPU runs big GEMMs out of cache; a GPU wants them big
        cfg = replace(cfg, batch_tokens=4096 if device == "cpu" else 16384)
    settings = _settings(cfg, ckpt, device)
    timings: dict[str, float] = {}
    try:
        err: BaseException | None = None
        try:
            files = expand_corpus(cfg.corpus)
            if cfg.index.strip().lower() not in ("flat", "hnsw", "ivfpq"):
                make_index(cfg.index, dim)  # an unknown factory string fails now, not after encoding
            if dist.is_main:
                _prepare(work, cfg, settings, corpus_signature(files))
        except BaseException as e:  # handed to every rank by sync
            err = e
        dist.sync(err)
        try:
            if not work.state.is_file():
                raise BuildError(
                    f"{work.path}: the work directory is not visible from rank {dist.rank}; a distributed build "
                    "needs its output on a filesystem every rank sees"
                )
            if dist.is_main and not work.ingest_done.is_file():
                t_read = time.monotonic()
                try:
                    _ingest(work, cfg, ckpt, files, max_length)
                    timings["read"] = time.monotonic() - t_read
                except BuildError:
                    _discard(work)  # an invalid corpus leaves nothing behind: the next run starts afresh
                    raise
        except BaseException as e:
            err = e
        dist.sync(err)
        ingest = json.loads(work.ingest_done.read_text())
        count = int(ingest["count"])
        factory = ""
        try:
            factory = resolve_factory(cfg.index, dim, count)
            check_trainable(factory, dim, count, cfg.train_size)
            t_encode = time.monotonic()
            encoded, encoded_docs, reused = _encode(work, cfg, ckpt, count, dim, device, dist, timings)
            timings["encode"] = time.monotonic() - t_encode - timings.get("load_model", 0.0)
        except BaseException as e:
            err = e
        dist.sync(err)
        n_shards = _n_shards(count, cfg.shard_size)
        reused_docs = sum(min(cfg.shard_size, count - i * cfg.shard_size) for i in reused)
        result = BuildResult(cfg.out, count, factory, n_shards, encoded, len(reused), encoded_docs,
                             int(ingest["rejected"]), int(ingest["truncated"]), time.monotonic() - t0,
                             timings=timings)
        if dist.is_main:
            result.shards_encoded = n_shards - len(reused)  # all ranks together
            result.documents_encoded = count - reused_docs
            t_merge = time.monotonic()
            try:
                result.manifest = _merge_and_publish(work, cfg, ckpt, ingest, factory, dim, dist.world)
            except BaseException as e:
                err = e
            timings["merge"] = time.monotonic() - t_merge
        # every rank waits for the merge: a rank exits 0 only once the index is published, and no rank tears
        # down the process group while another still uses it (gloo can abort a process that does)
        dist.sync(err)
        result.seconds = time.monotonic() - t0
        return result  # on other ranks: this rank's share
    finally:
        work.unlock()


def _discard(work: WorkDir) -> None:
    work.unlock()
    shutil.rmtree(work.path, ignore_errors=True)


def _load_checkpoint(path: Path) -> Checkpoint:
    try:
        return load_checkpoint(path)
    except (CheckpointError, SpecError, OSError) as e:
        raise BuildError(f"--checkpoint {path}: {e}") from None


def _resolve_device(device: str, dist: Dist) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BuildError(f"--device {device}: CUDA is not available on this machine")
        if device == "cuda" and dist.world > 1:
            device = f"cuda:{dist.local_rank % torch.cuda.device_count()}"
    elif device != "cpu" and not device.startswith("mps"):
        raise BuildError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return device


def _settings(cfg: BuildConfig, ckpt: Checkpoint, device: str) -> dict[str, Any]:
    """What decides the staged documents and their vectors: a resumed build must use the same."""
    return {
        "builder_version": BUILDER_VERSION,
        "checkpoint_fingerprint": ckpt.fingerprint,
        "corpus": [str(p.resolve()) for p in cfg.corpus],
        "chunk_tokens": cfg.chunk_tokens,
        "chunk_overlap": cfg.chunk_overlap,
        "max_doc_tokens": cfg.max_doc_tokens,
        "on_invalid": cfg.on_invalid,
        "dtype": cfg.dtype,
        "device_type": device.split(":")[0],
        "batch_tokens": cfg.batch_tokens,
        "batch_size": cfg.batch_size,
        "shard_size": cfg.shard_size,
    }


def _prepare(work: WorkDir, cfg: BuildConfig, settings: dict[str, Any], signature: list[dict[str, Any]]) -> None:
    """Rank 0: check the output, create or resume the work dir, take its lock."""
    out = cfg.out
    if out.exists() and not cfg.overwrite:
        raise BuildError(f"{out} already exists; pass --overwrite to replace it")
    try:
        work.path.mkdir(parents=True, exist_ok=True)
        work.lock()
    except OSError as e:
        raise BuildError(f"cannot write the output {out}: {e.strerror or e} ({e.filename or work.path})") from None
    state = {"settings": settings, "corpus_signature": signature}
    if work.state.is_file() and work.ingest_done.is_file() and not cfg.restart:
        try:
            old = json.loads(work.state.read_text())
        except (json.JSONDecodeError, OSError):
            old = None
        if old == state:
            done = len(list(work.shards.glob("*.npy"))) if work.shards.is_dir() else 0
            cfg.log(f"resuming the interrupted build in {work.path} ({done} shard(s) already encoded)")
            return
        if old is not None:
            diffs = [
                f"{k}: {old.get('settings', {}).get(k)!r} -> {settings[k]!r}"
                for k in settings if old.get("settings", {}).get(k) != settings[k]
            ]
            if old.get("corpus_signature") != signature:
                diffs.append("the corpus files changed (size or modification time)")
            raise BuildError(
                f"{work.path} holds an interrupted build with other settings ({'; '.join(diffs)}); rerun with the "
                "same arguments to resume it, or pass --restart to discard it"
            )
    # Nothing worth resuming (no finished corpus read): start afresh.
    for child in work.path.iterdir():
        if child.name != "lock":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    work.shards.mkdir()
    write_json_atomic(work.state, state)


# ---------------------------------------------------------------------- phase 1: read the corpus
_STAGING_SCHEMA = (
    "CREATE UNIQUE INDEX IF NOT EXISTS staged_doc_id_unique ON documents(doc_id)",
    "CREATE TABLE IF NOT EXISTS origins (vector_id INTEGER PRIMARY KEY, origin TEXT NOT NULL, n_tokens INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rejected (seq INTEGER PRIMARY KEY, origin TEXT NOT NULL, doc_id TEXT, reason TEXT NOT NULL)",
)


def _ingest(work: WorkDir, cfg: BuildConfig, ckpt: Checkpoint, files: list, max_length: int) -> None:
    """Rank 0: stream the corpus into the staged docstore; any invalid input fails it (or is reported)."""
    work.staged.unlink(missing_ok=True)
    con = create_docstore(work.staged)
    for stmt in _STAGING_SCHEMA:
        con.execute(stmt)
    con.execute("PRAGMA synchronous=OFF")  # an interrupted ingest restarts from scratch
    renderer = Renderer.for_checkpoint(ckpt)
    try:
        chunker = Chunker(renderer, cfg.chunking, max_length)
    except ValueError as e:
        raise BuildError(str(e)) from None
    reader = CorpusReader(files, document_token=ckpt.spec.document_token)
    errors: list[str] = []
    stats = {"sources": 0, "truncated": 0, "rejected": 0, "tokens": 0, "chunked_sources": 0}
    vid = 0

    def reject(r: Rejection) -> None:
        if cfg.on_invalid == "error":
            errors.append(str(r))
            if len(errors) >= MAX_REPORTED_ERRORS:
                raise _TooManyErrors
        else:
            stats["rejected"] += 1
            con.execute("INSERT INTO rejected (origin, doc_id, reason) VALUES (?,?,?)", (r.origin, r.doc_id, r.reason))

    bar = tqdm(desc="reading corpus", unit="doc", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for item in reader:
            bar.update(1)
            if isinstance(item, Rejection):
                reject(item)
                continue
            try:
                pieces = chunker.split(item)
            except ValueError as e:
                reject(Rejection(item.origin, str(e).removeprefix(f"{item.origin}: "), item.id))
                continue
            ids = [p.document.id for p in pieces]
            clash = _first_clash(con, ids)
            if clash is not None:
                cid, first = clash
                what = f"duplicate id {cid!r}" if cid == item.id else f"id {cid!r} (a chunk of {item.id!r}) is a duplicate"
                reject(Rejection(item.origin, f"{what}; first seen at {first}", item.id))
                continue
            stats["sources"] += 1
            stats["chunked_sources"] += len(pieces) > 1
            for p in pieces:
                insert_documents(con, vid, [p.document])
                con.execute("INSERT INTO origins VALUES (?,?,?)", (vid, item.origin, p.n_tokens))
                stats["truncated"] += p.truncated
                stats["tokens"] += p.n_tokens
                vid += 1
            if vid % 2048 < len(pieces):
                con.commit()
    except _TooManyErrors:
        pass
    finally:
        bar.close()
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
    if vid == 0:
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
    write_json_atomic(work.ingest_done, {"count": vid, "digest": reader.digest, "files": len(files), **stats})


class _TooManyErrors(Exception):
    pass


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


# ---------------------------------------------------------------------- phase 2: encode shards
def _n_shards(count: int, shard_size: int) -> int:
    return (count + shard_size - 1) // shard_size


def _shard_done(work: WorkDir, i: int, rows: int, dim: int) -> bool:
    p = work.shard_path(i)
    if not p.is_file():
        return False
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float32


def _encode(work: WorkDir, cfg: BuildConfig, ckpt: Checkpoint, count: int, dim: int, device: str,
            dist: Dist, timings: dict[str, float]) -> tuple[int, int, set[int]]:
    """Encode this rank's share of the missing shards. Returns (shards and documents it encoded, shards reused)."""
    n = _n_shards(count, cfg.shard_size)
    rows = [min(cfg.shard_size, count - i * cfg.shard_size) for i in range(n)]
    pending = [i for i in range(n) if not _shard_done(work, i, rows[i], dim)]
    reused = set(range(n)) - set(pending)
    dist.sync()  # every rank has listed the shards before any writes one
    mine = pending[dist.rank::dist.world]
    if reused and dist.is_main:
        cfg.log(f"{len(reused)} of {n} shard(s) already encoded; encoding the other {len(pending)}")
    if not mine:
        return 0, 0, reused
    from onegen_core.encoder import Encoder

    t_load = time.monotonic()
    encoder = Encoder.from_checkpoint(ckpt, dtype=cfg.dtype, device=device)
    timings["load_model"] = time.monotonic() - t_load
    if encoder.dim != dim:
        raise AssertionError(f"encoder dim {encoder.dim} != config hidden size {dim}")
    renderer = Renderer.for_checkpoint(ckpt)
    total = sum(rows[i] for i in mine)
    bar = tqdm(total=total, desc="encoding" if dist.world == 1 else f"encoding (rank {dist.rank})", unit="doc",
               disable=not cfg.progress or not dist.is_main, dynamic_ncols=True, smoothing=0.1)
    con = sqlite3.connect(sqlite_uri(work.staged), uri=True)
    try:
        for i in mine:
            lo = i * cfg.shard_size
            docs = con.execute(
                "SELECT text, title FROM documents WHERE vector_id >= ? AND vector_id < ? ORDER BY vector_id",
                (lo, lo + rows[i]),
            ).fetchall()
            if len(docs) != rows[i]:
                raise AssertionError(f"shard {i}: {len(docs)} staged documents, expected {rows[i]}")
            seqs = [renderer.document(text, title) for text, title in docs]
            vecs = encode_sorted(encoder, seqs, cfg.batch_tokens, cfg.batch_size, bar.update)
            save_npy_atomic(work.shard_path(i), vecs)
    finally:
        con.close()
        bar.close()
    return len(mine), total, reused


# The encoder runs a batch's attention as one padded call when padding costs at most this factor of the
# real work (onegen_core.model.attention), else one call per sequence: batches are cut to stay under it.
PAD_WASTE = MAX_PAD_WASTE  # the attention's own threshold for one padded call


def length_batches(lengths: list[int], batch_tokens: int, batch_size: int) -> Iterator[list[int]]:
    """Indices sorted longest first, cut into batches of at most ``batch_tokens`` tokens / ``batch_size`` docs,
    each of lengths close enough that its attention pads little (``PAD_WASTE``)."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    batch: list[int] = []
    tokens = squares = 0
    for k in order:
        n = lengths[k]
        if batch:
            longest = lengths[batch[0]]
            too_wasteful = (len(batch) + 1) * longest * longest > PAD_WASTE * (squares + n * n)
            if tokens + n > batch_tokens or len(batch) >= batch_size or too_wasteful:
                yield batch
                batch, tokens, squares = [], 0, 0
        batch.append(k)
        tokens += n
        squares += n * n
    if batch:
        yield batch


def encode_sorted(encoder: Any, seqs: list[list[int]], batch_tokens: int, batch_size: int,
                  progress: Callable[[int], Any] | None = None) -> np.ndarray:
    """Encode rendered documents in length-sorted batches; rows come back in the input order. [n, d] float32."""
    out = np.empty((len(seqs), encoder.dim), dtype=np.float32)
    for batch in length_batches([len(s) for s in seqs], batch_tokens, batch_size):
        vecs = encoder.encode_token_ids([seqs[k] for k in batch], batch_tokens=batch_tokens)
        out[batch] = vecs.numpy()
        if progress is not None:
            progress(len(batch))
    return out


# ---------------------------------------------------------------------- phase 3: merge and publish
def _merge_and_publish(work: WorkDir, cfg: BuildConfig, ckpt: Checkpoint, ingest: dict[str, Any], factory: str,
                       dim: int, world: int) -> Manifest:
    faiss = import_faiss()
    threads = faiss.omp_get_max_threads()
    if cfg.faiss_threads is not None:  # FAISS and torch may share one OpenMP runtime: restored below
        faiss.omp_set_num_threads(cfg.faiss_threads)
    try:
        return _merge(work, cfg, ckpt, ingest, factory, dim, world)
    finally:
        faiss.omp_set_num_threads(threads)


def _merge(work: WorkDir, cfg: BuildConfig, ckpt: Checkpoint, ingest: dict[str, Any], factory: str, dim: int,
           world: int) -> Manifest:
    faiss = import_faiss()
    count = int(ingest["count"])
    n = _n_shards(count, cfg.shard_size)
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

    manifest = Manifest(
        checkpoint_fingerprint=ckpt.fingerprint,
        dim=dim,
        count=count,
        factory=factory,
        special_token_ids=dict(ckpt.token_ids.by_name),
        corpus_digest=ingest["digest"],
        extra={
            "builder": {
                "version": BUILDER_VERSION,
                "index": cfg.index,
                "dtype": cfg.dtype,
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
    _publish(work, cfg.out)
    return manifest


def _publish(work: WorkDir, out: Path) -> None:
    """Rename the finished index into place (the old one, with --overwrite, is moved aside first)."""
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old{os.getpid()}")
        os.replace(out, old)
    os.replace(work.final, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _discard(work)
