"""``update``: a new version of an index directory from changed and deleted documents, encoding only those.

An update reads the current version of ``DIR`` (``onegen_core.formats.index_store.resolve_version``),
then:

1. **checks** that the checkpoint's fingerprint and the encode dtype are the manifest's, and that the
   index stores its vectors exactly (Flat, HNSW over Flat, IVF-Flat): carrying a vector over is then
   reading it back bit for bit. A compressed index (PQ, SQ) is refused: re-adding its decoded
   vectors would quantise them a second time, so it is rebuilt with ``build`` instead;
2. **encodes the changed documents** with the ordinary resumable build (``build_index``) into a
   small Flat index, ``DIR.updating/delta``, with the base version's chunking, dtype and batching
   (its manifest's ``extra.builder``): a document of several chunks or a OneGen entry of several units
   is re-encoded whole, as a build would;
3. **composes the new version**: every row of the base whose document (``source``, else ``id``) is
   neither changed nor deleted keeps its stored vector (``reconstruct_n``), in vector-id order, then the
   delta's rows follow; the FAISS index is the base's, emptied (its training, nprobe, efSearch kept)
   and refilled; the BM25 side index (``bm25/``, unless ``--no-bm25``) is rebuilt from the new version's
   docstore, every document's text tokenised afresh: BM25 needs no model, so a rebuild takes about 20 s
   per 100,000 passages of 120 words on one busy core (encoding takes minutes per thousand), and its
   statistics (document frequencies, mean length) change with every added or deleted document anyway;
4. **publishes** it: ``versions/NNNNNN`` is written aside and renamed into place; a plain ``DIR`` then
   gets ``versions/000001`` (hard links to its files and its ``bm25/``, so nothing is copied); then ``CURRENT`` is
   replaced by an atomic rename, and a plain ``DIR`` loses its plain files only after that switch. Versions beyond the
   newest ``keep`` are removed last.

The work directory ``DIR.updating/`` (``state.json``: the base version, the target version and the
arguments) makes an update resumable: a rerun with the same arguments reuses the delta's encoded
shards or the finished delta, and a version already written or already published; a rerun with other
arguments is refused until ``--restart``. A crash before the switch leaves the old version current; a
crash after it leaves only cleanup, which the rerun does.

A server holding an old version keeps serving it after that version's directory is removed: its FAISS
index is in memory and its open SQLite file stays readable (POSIX unlink). Only a process that has not
yet opened the files of a version it resolved can miss them; keep N >= 2 so that the version that was
current a moment before a switch survives it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from onegen_core.device import resolve_device, resolve_dtype
from onegen_core.formats.checkpoint import Checkpoint
from onegen_core.formats.index_store import (
    CURRENT,
    DOCSTORE,
    INDEX_FILE,
    MANIFEST,
    VERSIONS,
    IndexError_,
    Manifest,
    create_docstore,
    import_faiss,
    list_versions,
    resolve_version,
    sqlite_uri,
    version_name,
)
from onegen_core.retrieval.bm25 import BM25_DIR, write_bm25

from .builder import _load_checkpoint, build_index, require_bm25s
from .config import BuildConfig
from .corpus import corpus_signature, expand_corpus
from .errors import BuildError
from .faiss_index import is_exact
from .ingest import REJECTED_FILE
from .workdir import write_json_atomic, write_text_atomic

PLAIN_FILES = (MANIFEST, INDEX_FILE, DOCSTORE, REJECTED_FILE)
# the steps of publishing, in order; ``update_index(on_step=...)`` is called before each (tests crash there)
PUBLISH_STEPS = ("write", "version1", "switch", "unlink_plain", "prune", "cleanup")


class ArgumentError(BuildError):
    """--corpus or --delete do not fit the index: the interrupted work of these arguments is discarded."""


@dataclass
class UpdateConfig:
    index: Path
    checkpoint: Path
    corpus: list[Path] = field(default_factory=list)
    delete: Path | None = None
    keep: int = 3
    device: str = "auto"
    dtype: str | None = None  # None: the manifest's encode dtype
    restart: bool = False
    bm25: bool = True  # write the new version's BM25 side index
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.corpus and self.delete is None:
            raise ValueError("update needs --corpus (documents to add or replace), --delete (ids to remove), or both")
        if self.keep < 1:
            raise ValueError(f"--keep: expected an integer >= 1, got {self.keep}")


@dataclass
class UpdateResult:
    index: Path
    base_version: int | None  # None: the index was a plain directory (now version 1)
    version: int
    count: int
    added: int
    replaced: int
    deleted: int
    documents_encoded: int  # by this run; 0 when a finished delta was reused
    removed_versions: list[int]
    seconds: float


def read_delete_ids(path: Path) -> dict[str, int]:
    """Ids to delete, one a line (blank lines skipped), mapped to their line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"--delete {path}: {e}") from None
    ids: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        doc_id = line.strip()
        if not doc_id:
            continue
        if doc_id in ids:
            raise BuildError(f"{path}:{n}: id {doc_id!r} is listed twice (first at line {ids[doc_id]})")
        ids[doc_id] = n
    if not ids:
        raise BuildError(f"--delete {path}: no id in the file")
    return ids


def update_index(cfg: UpdateConfig, *, on_step: Callable[[str], None] = lambda step: None) -> UpdateResult:
    t0 = time.monotonic()
    root = Path(cfg.index)
    try:
        base_dir, base_version = resolve_version(root)
        base_manifest = Manifest.from_file(base_dir / MANIFEST)
    except IndexError_ as e:
        raise BuildError(f"--index {root}: {e}") from None
    ckpt = _load_checkpoint(cfg.checkpoint)
    if cfg.bm25:
        require_bm25s()
    dtype = _check_compatible(cfg, ckpt, base_manifest, base_dir)
    deletes = read_delete_ids(cfg.delete) if cfg.delete is not None else {}
    files = expand_corpus(cfg.corpus) if cfg.corpus else []

    work = root.with_name(root.name + ".updating")
    work.mkdir(parents=True, exist_ok=True)
    lock = _lock(work, root)
    try:
        args = {
            "checkpoint_fingerprint": ckpt.fingerprint,
            "dtype": dtype,
            "corpus": [str(p.resolve()) for p in cfg.corpus],
            "corpus_signature": corpus_signature(files) if files else [],
            "delete": str(cfg.delete.resolve()) if cfg.delete is not None else None,
            "delete_digest": hashlib.sha256(cfg.delete.read_bytes()).hexdigest() if cfg.delete is not None else None,
            "bm25": cfg.bm25,
        }
        state = _prepare(work, root, args, base_version, cfg)
        target = int(state["target"])
        if base_version == target:  # published by the interrupted run: only cleanup is left
            cfg.log(f"version {target} of {root} was already published; finishing the interrupted update's cleanup")
            return _finish(cfg, root, work, state, target, t0, encoded=0, on_step=on_step)
        base_dir = Path(state["base_dir"])
        try:  # a wrong argument discards the work: its rerun has other arguments
            if deletes:
                _check_deletes(base_dir, deletes, cfg.delete)

            encoded = 0
            delta = work / "delta"
            if files and not (delta / MANIFEST).is_file():
                encoded = _encode_delta(cfg, base_manifest, files, delta, dtype)
            version_dir = root / VERSIONS / version_name(target)
            on_step("write")
            if not (version_dir / MANIFEST).is_file():
                bm25_template = ckpt.spec.document_template if cfg.bm25 else None
                _compose(base_dir, delta if files else None, deletes, cfg.delete, version_dir, base_manifest,
                         base_version, bm25_template=bm25_template, progress=cfg.progress)
        except ArgumentError:
            shutil.rmtree(work, ignore_errors=True)
            raise
        on_step("version1")
        if base_version is None:
            _link_plain_as_version1(root)
        on_step("switch")
        write_text_atomic(root / CURRENT, version_name(target) + "\n")
        return _finish(cfg, root, work, state, target, t0, encoded=encoded, on_step=on_step)
    finally:
        os.close(lock)


# ---------------------------------------------------------------------- checks and state
def _check_compatible(cfg: UpdateConfig, ckpt: Checkpoint, m: Manifest, base_dir: Path) -> str:
    """Refuse, before anything is written, an update whose vectors could not sit beside the index's."""
    if ckpt.fingerprint != m.checkpoint_fingerprint:
        raise BuildError(
            f"--checkpoint {cfg.checkpoint} has fingerprint {ckpt.fingerprint}, but {base_dir} was built with "
            f"{m.checkpoint_fingerprint}; new vectors would not be comparable with the stored ones: rebuild the "
            "index with python -m index_builder build"
        )
    if m.encode_dtype is None:
        raise BuildError(f"{base_dir / MANIFEST} does not record the encode dtype (an index built before it was "
                         "recorded); rebuild it with python -m index_builder build")
    try:
        dev = resolve_device(cfg.device)
        dtype = str(resolve_dtype(cfg.dtype or m.encode_dtype, dev)).removeprefix("torch.")
    except ValueError as e:
        raise BuildError(f"--{e}") from None
    if dtype != m.encode_dtype:
        raise BuildError(f"--dtype {cfg.dtype} resolves to {dtype}, but {base_dir} was encoded in {m.encode_dtype}; "
                         f"update with --dtype {m.encode_dtype} (or rebuild the index)")
    faiss = import_faiss()
    index = faiss.read_index(str(base_dir / INDEX_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if not is_exact(index):
        raise BuildError(
            f"{base_dir} is a compressed index ({m.factory}): its stored vectors cannot be carried over bit for bit "
            "(re-adding decoded vectors quantises them twice); rebuild it with python -m index_builder build, or "
            "use an exact index (flat, hnsw) for a corpus that is updated"
        )
    return dtype


def _check_deletes(base_dir: Path, deletes: dict[str, int], path: Path) -> None:
    with sqlite3.connect(sqlite_uri(base_dir / DOCSTORE), uri=True) as con:
        keys = {k for row in con.execute(f"SELECT doc_id, {_doc_key_sql()} FROM documents") for k in row}
    for doc_id, line in deletes.items():
        if doc_id not in keys:
            raise ArgumentError(f"{path}:{line}: id {doc_id!r} is not in the index ({base_dir})")


def _lock(work: Path, root: Path) -> int:
    fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BuildError(f"{work}: another update of {root} is running (it holds the lock)") from None
    return fd


def _prepare(work: Path, root: Path, args: dict, base_version: int | None, cfg: UpdateConfig) -> dict:
    """Resume the interrupted update of the same arguments, or start afresh (refusing to mix arguments)."""
    path = work / "state.json"
    if path.is_file() and not cfg.restart:
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            old = None
        if old is not None and old.get("args") == args and base_version in (old.get("base_version"), old["target"]):
            cfg.log(f"resuming the interrupted update in {work}")
            return old
        if old is not None:
            raise BuildError(
                f"{work} holds an interrupted update with other arguments or of another version; rerun it with the "
                "same arguments to finish it, or pass --restart to discard it"
            )
    for child in work.iterdir():
        if child.name != "lock":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    numbers = list_versions(root)
    target = max([*numbers, base_version or 1]) + 1
    stale = root / VERSIONS / version_name(target)
    if stale.exists():  # an unpublished version left by a discarded update (never named by CURRENT)
        shutil.rmtree(stale)
    base_dir, _ = resolve_version(root)
    state = {"args": args, "base_version": base_version, "base_dir": str(base_dir), "target": target}
    write_json_atomic(path, state)
    return state


# ---------------------------------------------------------------------- encode, compose, publish
def _encode_delta(cfg: UpdateConfig, m: Manifest, files: list[Path], delta: Path, dtype: str) -> int:
    """Encode the changed documents with the base's settings into a Flat index (resumable)."""
    b = m.extra.get("builder", {})
    bcfg = BuildConfig(
        checkpoint=cfg.checkpoint, corpus=list(cfg.corpus), out=delta, index="flat", device=cfg.device, dtype=dtype,
        chunk_tokens=b.get("chunk_tokens"), chunk_overlap=b.get("chunk_overlap") or 0,
        max_doc_tokens=b.get("max_doc_tokens"), shard_size=b.get("shard_size") or 4096,
        batch_tokens=b.get("batch_tokens"), bm25=False, progress=cfg.progress, log=cfg.log,
    )
    return build_index(bcfg).documents_encoded


def _link_plain_as_version1(root: Path) -> None:
    """``versions/000001``: hard links to a plain directory's files (copies where links fail)."""
    v1 = root / VERSIONS / version_name(1)
    if (v1 / MANIFEST).is_file():
        return
    partial = v1.with_name(v1.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    names = [*PLAIN_FILES, *(f"{BM25_DIR}/{p.name}" for p in sorted((root / BM25_DIR).glob("*")))]
    if (root / BM25_DIR).is_dir():
        (partial / BM25_DIR).mkdir()
    for name in names:
        src = root / name
        if src.is_file():
            try:
                os.link(src, partial / name)
            except OSError:
                shutil.copy2(src, partial / name)
    os.replace(partial, v1)


def _doc_key_sql() -> str:
    return "COALESCE(source, doc_id)"  # a chunk or an entry's unit belongs to its source document


def _compose(base_dir: Path, delta: Path | None, deletes: dict[str, int], delete_file: Path | None,
             out: Path, m: Manifest, base_version: int | None, *, bm25_template: str | None,
             progress: bool) -> dict[str, int]:
    """Write the new version: the base's untouched rows with their stored vectors, then the delta's rows, and
    (with ``bm25_template``, the checkpoint's document template) its BM25 side index over all of them."""
    faiss = import_faiss()
    base = sqlite3.connect(sqlite_uri(base_dir / DOCSTORE), uri=True)
    rows = base.execute(f"SELECT *, {_doc_key_sql()} FROM documents ORDER BY vector_id").fetchall()
    base.close()
    new_rows: list[tuple] = []
    new_vecs = np.zeros((0, m.dim), np.float32)
    if delta is not None:
        con = sqlite3.connect(sqlite_uri(delta / DOCSTORE), uri=True)
        new_rows = con.execute(f"SELECT *, {_doc_key_sql()} FROM documents ORDER BY vector_id").fetchall()
        con.close()
        dindex = faiss.read_index(str(delta / INDEX_FILE))
        new_vecs = dindex.reconstruct_n(0, dindex.ntotal)
    changed = {r[-1] for r in new_rows} | {r[1] for r in new_rows}
    for doc_id, line in deletes.items():
        if doc_id in changed:
            raise ArgumentError(f"{delete_file}:{line}: id {doc_id!r} is both deleted and in --corpus; list it in one")
    gone = changed | set(deletes)
    kept = [r for r in rows if r[-1] not in gone and r[1] not in gone]
    replaced_sources = {r[-1] for r in rows if r[-1] in changed or r[1] in changed}
    new_sources = {r[-1] for r in new_rows}

    index = faiss.read_index(str(base_dir / INDEX_FILE))
    try:  # IVF: reconstruct_n needs the direct map
        faiss.extract_index_ivf(index).make_direct_map()
    except RuntimeError:
        pass
    old_vecs = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, m.dim), np.float32)
    kept_ids = np.array([r[0] for r in kept], dtype=np.int64)
    vecs = np.ascontiguousarray(np.concatenate([old_vecs[kept_ids], new_vecs]), dtype=np.float32)
    try:  # the base's index, emptied: its training, nprobe and efSearch carry over
        index.reset()
    except RuntimeError:
        index = faiss.clone_index(index)
        index.reset()
    if len(vecs):
        index.add(vecs)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    faiss.write_index(index, str(partial / INDEX_FILE))
    con = create_docstore(partial / DOCSTORE)
    with con:
        con.executemany("INSERT INTO documents VALUES (?,?,?,?,?,?,?,?)",
                        [(vid, *r[1:8]) for vid, r in enumerate([*kept, *new_rows])])
    con.close()
    bm25 = write_bm25(partial, bm25_template, progress=progress) if bm25_template is not None else None
    # "encoded": the delta's vectors, whichever run encoded them; everything else was carried over
    counts = {"added": len(new_sources - replaced_sources), "replaced": len(replaced_sources & new_sources),
              "deleted": len(deletes), "encoded": len(new_rows), "base_version": base_version or 1}
    delta_digest = Manifest.from_file(delta / MANIFEST).corpus_digest if delta is not None else ""
    digest = hashlib.sha256(f"{m.corpus_digest}|{delta_digest}|{sorted(deletes)}".encode()).hexdigest()[:16]
    manifest = replace(m, count=len(vecs), corpus_digest=f"update-{digest}", bm25=bm25,
                       build_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       extra={**m.extra, "update": counts})
    write_text_atomic(partial / MANIFEST, manifest.to_json())
    for p in partial.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    os.replace(partial, out)
    return counts


def _finish(cfg: UpdateConfig, root: Path, work: Path, state: dict, target: int, t0: float, *, encoded: int,
            on_step: Callable[[str], None]) -> UpdateResult:
    """After the switch: drop a converted directory's plain files, old versions, the work directory."""
    on_step("unlink_plain")
    if state["base_version"] is None:
        for name in PLAIN_FILES:
            (root / name).unlink(missing_ok=True)
        shutil.rmtree(root / BM25_DIR, ignore_errors=True)
    on_step("prune")
    numbers = list_versions(root)
    removed = [n for n in numbers[: max(len(numbers) - cfg.keep, 0)] if n != target]
    for n in removed:
        shutil.rmtree(root / VERSIONS / version_name(n), ignore_errors=True)
    on_step("cleanup")
    m = Manifest.from_file(root / VERSIONS / version_name(target) / MANIFEST)
    counts = m.extra.get("update", {})
    shutil.rmtree(work, ignore_errors=True)
    return UpdateResult(root, state["base_version"], target, m.count, counts.get("added", 0),
                        counts.get("replaced", 0), counts.get("deleted", 0), encoded, removed,
                        time.monotonic() - t0)
