"""The build's work directory and the atomic publish of its result.

Everything happens in a work directory beside the output, ``{out}.building/``:

* ``state.json`` — the settings that decide the vectors (checkpoint fingerprint,
  chunking, encode dtype, device type, batching, shard size) and the corpus' size/mtime;
  a rerun with the same arguments resumes, a rerun with others is refused (or
  ``--restart`` discards the old work).
* ``staged.sqlite`` — the docstore being built (``index_builder.ingest``); ``ingest.json``
  marks it complete.
* ``shards/NNNNN.npy`` — vectors of vector ids ``[N*shard_size, (N+1)*shard_size)``,
  each written aside and renamed, so a shard file is complete or absent; a rerun
  encodes only the missing ones.
* ``final/`` — the index directory being assembled (``index_builder.merge``); renamed to
  ``out`` when complete, so the output appears whole or not at all.

A lock file keeps two builds of one output apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BuildError

# 2: a OneGen db.jsonl entry of several units is encoded in one sequence, as training encodes it
BUILDER_VERSION = 2


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

    def prepare(self, settings: dict[str, Any], signature: list[dict[str, Any]], *, overwrite: bool,
                restart: bool, log: Any) -> None:
        """Rank 0: check the output, create or resume the work dir, take its lock."""
        out = self.out
        if out.exists() and not overwrite:
            raise BuildError(f"{out} already exists; pass --overwrite to replace it")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
        except OSError as e:
            raise BuildError(f"cannot write the output {out}: {e.strerror or e} ({e.filename or self.path})") from None
        state = {"settings": settings, "corpus_signature": signature}
        if self.state.is_file() and self.ingest_done.is_file() and not restart:
            try:
                old = json.loads(self.state.read_text())
            except (json.JSONDecodeError, OSError):
                old = None
            if old == state:
                done = len(list(self.shards.glob("*.npy"))) if self.shards.is_dir() else 0
                log(f"resuming the interrupted build in {self.path} ({done} shard(s) already encoded)")
                return
            if old is not None:
                diffs = [
                    f"{k}: {old.get('settings', {}).get(k)!r} -> {settings[k]!r}"
                    for k in settings if old.get("settings", {}).get(k) != settings[k]
                ]
                if old.get("corpus_signature") != signature:
                    diffs.append("the corpus files changed (size or modification time)")
                raise BuildError(
                    f"{self.path} holds an interrupted build with other settings ({'; '.join(diffs)}); rerun with "
                    "the same arguments to resume it, or pass --restart to discard it"
                )
        # Nothing worth resuming (no finished corpus read): start afresh.
        for child in self.path.iterdir():
            if child.name != "lock":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        self.shards.mkdir()
        write_json_atomic(self.state, state)

    def discard(self) -> None:
        self.unlock()
        shutil.rmtree(self.path, ignore_errors=True)

    def publish(self) -> None:
        """Rename the finished index into place (the old one, with --overwrite, is moved aside first)."""
        out = self.out
        old = None
        if out.exists():
            old = out.with_name(out.name + f".old{os.getpid()}")
            os.replace(out, old)
        os.replace(self.final, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.discard()


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
