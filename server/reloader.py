"""Index reloads without downtime: notice a new current version, load it aside, swap it in between two steps.

``IndexReloader`` runs on its own thread. Every ``--index-poll-s`` seconds (0: never) it reads each
index directory's version stamp (``CURRENT`` and one ``stat``: ``registry.VersionStamp``), and
``POST /admin/reload`` asks for the same check at once. A changed stamp is loaded *here*, off the
engine's thread (``Engine.load_index``: files read, fingerprint, dimension and encode dtype checked,
retriever built), while the engine goes on stepping with the version it serves; then the worker swaps
it in between two steps (``EngineWorker.swap_index``). A search runs inside a step, so the ones
already running finish on the old version and every later one uses the new; no request waits for the
load or fails because of it. The swap closes the old version.

A version that fails to load is refused: an error in the log, ``onegen_index_reloads_total{result=
"failed"}``, and the old version keeps serving. The poll does not retry a refused version (it would
log the same error every interval); a newer version is tried as usual, and ``/admin/reload`` retries
the refused one (after a fix in place, say). One check runs at a time, so at most one version is being
loaded beside the served ones: a reload needs memory for the index twice, briefly.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from onegen_core.formats.index_store import IndexError_
from onegen_core.retrieval.registry import LoadedIndex, VersionStamp

from .metrics import Metrics
from .worker import EngineUnavailable, EngineWorker

log = logging.getLogger("onegen.server")

Result = Literal["reloaded", "unchanged", "failed"]


@dataclass
class ReloadOutcome:
    """What one check did to one index."""

    index: str
    result: Result
    version: int | None  # the version served after the check (None: a plain directory)
    previous_version: int | None = None
    documents: int | None = None
    error: str | None = None


class IndexReloader:
    def __init__(self, worker: EngineWorker, metrics: Metrics, poll_s: float):
        self.worker = worker
        self.metrics = metrics
        self.poll_s = poll_s
        self._lock = threading.Lock()  # one check at a time: the poll's or an admin request's
        self._refused: dict[str, VersionStamp | str] = {}  # index -> the version (or error) it last refused
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.poll_s > 0:
            self._thread = threading.Thread(target=self._poll, name="onegen-index-poll", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.worker.state == "ready":
                try:
                    self.check(retry_refused=False)
                except EngineUnavailable:  # stopped (or failed) meanwhile: the next look finds it not ready
                    pass
                except Exception:  # noqa: BLE001 - a poll that fails must not end the polling
                    log.exception("index poll failed")

    def check(self, names: list[str] | None = None, *, retry_refused: bool = True) -> list[ReloadOutcome]:
        """Reload each named index (all when None) whose current version changed; blocks until done.

        Raises ``EngineUnavailable`` when the engine is not serving."""
        engine = self.worker.engine
        if self.worker.state != "ready" or engine is None:
            raise EngineUnavailable(self.worker.unavailable_reason() or "engine unavailable")
        with self._lock:
            return [self._check_one(engine, name, retry_refused) for name in names or engine.indexes.names]

    def _check_one(self, engine: Any, name: str, retry_refused: bool) -> ReloadOutcome:
        entry: LoadedIndex = engine.indexes.entries[name]
        served = ReloadOutcome(name, "unchanged", entry.version, entry.version, entry.size)
        if entry.store is None:  # a bare retriever (tests): nothing to reload from
            return served
        try:
            stamp: VersionStamp | str = VersionStamp.of(entry.store.root)
        except IndexError_ as e:
            stamp = str(e)  # e.g. CURRENT names a version that is not there: refused below, once
        if stamp == entry.stamp:
            return served
        if not retry_refused and self._refused.get(name) == stamp:
            served.result, served.error = "failed", "this version was refused before (see the log)"
            return served
        t0 = time.perf_counter()
        try:
            if isinstance(stamp, str):
                raise IndexError_(stamp)
            loaded = engine.load_index(name)
        except Exception as e:  # noqa: BLE001 - any load failure refuses the version, never the server
            return self._refuse(name, stamp, entry, e)
        try:
            self.worker.swap_index(loaded).result()
        except BaseException as e:
            loaded.close()
            if isinstance(e, EngineUnavailable):
                raise
            return self._refuse(name, stamp, entry, e)
        self._refused.pop(name, None)
        self.metrics.on_index_reload(name, "success")
        log.info("index reloaded", extra={"index": name, "version": loaded.version, "previous_version": entry.version,
                                          "documents": loaded.size, "path": str(loaded.store.path),
                                          "load_s": round(time.perf_counter() - t0, 3)})
        return ReloadOutcome(name, "reloaded", loaded.version, entry.version, loaded.size)

    def _refuse(self, name: str, stamp: VersionStamp | str, entry: LoadedIndex, error: BaseException
                ) -> ReloadOutcome:
        self._refused[name] = stamp
        self.metrics.on_index_reload(name, "failed")
        message = f"{type(error).__name__}: {error}"
        log.error("index reload refused; the served version keeps serving",
                  extra={"index": name, "served_version": entry.version, "error": message,
                         "candidate": stamp.directory if isinstance(stamp, VersionStamp) else None})
        return ReloadOutcome(name, "failed", entry.version, entry.version, entry.size, error=message)
