"""FAISS index types for the builder: presets, early validation, assembly from shard files.

``flat`` is exact inner product, ``hnsw`` a graph (``HNSW32``), ``ivfpq`` an inverted
file with product quantisation whose list count (~4·sqrt(N), at least 39 training
points per list) and code size (d/2 sub-quantisers, at most 64) follow the corpus size
and the model's dimension; any other string goes to ``faiss.index_factory`` as is.
The metric is always inner product (vectors are L2-normalised). Indexes that need
training train on a seeded sample of at most ``train_size`` vectors read from the
shards, so memory stays bounded by the sample, and the manifest reports its size.
Search defaults (``nprobe``, ``efSearch``) are stored in ``index.faiss`` itself, so
the engine and plain FAISS users get them without configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from onegen_core.formats.index_store import import_faiss

from .errors import BuildError

PRESETS = ("flat", "hnsw", "ivfpq")


def resolve_factory(index: str, dim: int, count: int) -> str:
    """The FAISS factory string for ``--index`` (a preset or a factory string) on ``count`` vectors of ``dim``."""
    name = index.strip()
    low = name.lower()
    if low == "flat":
        return "Flat"
    if low == "hnsw":
        return "HNSW32"
    if low == "ivfpq":
        if count < 256:
            raise BuildError(
                f"--index ivfpq needs at least 256 documents to train its 8-bit product quantiser; the corpus has "
                f"{count}: use --index flat (exact, and fast at this size)"
            )
        nlist = 2 ** max(0, round(math.log2(4 * math.sqrt(count))))
        nlist = max(1, min(nlist, 2 ** int(math.log2(max(1, count // 39)))))  # FAISS wants >= 39 points per list
        m = next(m for m in range(min(64, max(1, dim // 2)), 0, -1) if dim % m == 0)
        return f"IVF{nlist},PQ{m}np"  # np: no polysemous training (slow, and unused by ordinary search)
    if not name:
        raise BuildError("--index must not be empty")
    return name


def make_index(factory: str, dim: int) -> Any:
    """An empty index for ``factory`` with the inner-product metric; ``BuildError`` if FAISS rejects it."""
    faiss = import_faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise BuildError(
            f"--index {factory!r} is not a FAISS factory string FAISS accepts for dimension {dim} ({first}); "
            f"use one of {', '.join(PRESETS)} or a string such as 'IVF256,Flat', 'HNSW32,Flat', 'IVF1024,PQ32'"
        ) from None


def check_trainable(factory: str, dim: int, count: int, train_size: int) -> None:
    """Fail before encoding if the index cannot be trained on this many vectors."""
    faiss = import_faiss()
    index = make_index(factory, dim)
    if index.is_trained:
        return
    n_train = min(count, train_size)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None and n_train < ivf.nlist:
        raise BuildError(
            f"--index {factory!r} has {ivf.nlist} inverted lists but only {n_train} training vectors "
            f"({count} documents, --train-size {train_size}); use fewer lists (e.g. IVF{_pow2_floor(max(1, n_train // 39))}) "
            "or --index flat"
        )
    pq = _find_pq(index)
    if pq is not None and n_train < pq.ksub:
        raise BuildError(
            f"--index {factory!r} quantises with {pq.ksub} centroids per sub-vector but only {n_train} training "
            "vectors are available; use fewer bits (e.g. PQ16x4) or --index flat"
        )


def _pow2_floor(n: int) -> int:
    return 2 ** int(math.log2(n)) if n >= 1 else 1


def _find_pq(index: Any) -> Any:
    faiss = import_faiss()
    idx = faiss.downcast_index(index)
    for candidate in (idx, getattr(idx, "storage", None)):
        if candidate is None:
            continue
        candidate = faiss.downcast_index(candidate)
        if hasattr(candidate, "pq"):
            return candidate.pq
    return None


def set_search_defaults(index: Any, *, nprobe: int | None, ef_search: int | None) -> dict[str, int]:
    """Store search-time parameters in the index where they apply; returns those that applied."""
    faiss = import_faiss()
    applied: dict[str, int] = {}
    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError:
            continue  # the parameter does not exist for this index type
        applied[name] = int(value)
    return applied


def assemble(
    factory: str,
    dim: int,
    count: int,
    load_shard: Callable[[int], np.ndarray],
    shard_starts: Sequence[int],
    *,
    train_size: int,
    seed: int,
    nprobe: int | None,
    ef_search: int | None,
    on_shard: Callable[[int], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Build the FAISS index from shards (vector ids in shard order). Returns (index, facts for the manifest)."""
    index = make_index(factory, dim)
    facts: dict[str, Any] = {"train_size": None}
    if not index.is_trained:
        n_train = min(count, train_size)
        rng = np.random.default_rng(seed)
        sample_ids = np.sort(rng.choice(count, size=n_train, replace=False)) if n_train < count else np.arange(count)
        sample = gather(sample_ids, load_shard, shard_starts)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise BuildError(f"training --index {factory!r} on {n_train} vectors failed: {str(e).strip()}") from None
        facts["train_size"] = int(n_train)
        del sample
    facts["search_defaults"] = set_search_defaults(index, nprobe=nprobe, ef_search=ef_search)
    for i in range(len(shard_starts)):
        vecs = np.ascontiguousarray(load_shard(i), dtype=np.float32)
        index.add(vecs)
        if on_shard is not None:
            on_shard(len(vecs))
    if index.ntotal != count:
        raise AssertionError(f"index holds {index.ntotal} vectors, expected {count}")
    return index, facts


def gather(ids: np.ndarray, load_shard: Callable[[int], np.ndarray], shard_starts: Sequence[int]) -> np.ndarray:
    """Vectors of sorted global ``ids`` read shard by shard."""
    starts = np.asarray(shard_starts)
    which = np.searchsorted(starts, ids, side="right") - 1
    parts = []
    for s in np.unique(which):
        shard = load_shard(int(s))
        parts.append(np.asarray(shard[ids[which == s] - starts[s]], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, 0), np.float32)


def codec_of(index: Any) -> Any:
    """The part of an index that encodes vectors (HNSW: its storage), for comparing stored vectors."""
    faiss = import_faiss()
    idx = faiss.downcast_index(index)
    storage = getattr(idx, "storage", None)
    return faiss.downcast_index(storage) if storage is not None else idx


def is_exact(index: Any) -> bool:
    """True when the index stores vectors uncompressed (reconstruction returns them bit for bit)."""
    faiss = import_faiss()
    codec = codec_of(index)
    if isinstance(codec, faiss.IndexFlat):
        return True
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)


def reconstruct(index: Any, ids: np.ndarray) -> np.ndarray:
    """Stored vectors of ``ids`` (IVF indexes get a direct map first)."""
    faiss = import_faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
    except RuntimeError:
        pass
    return np.stack([index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, index.d), np.float32)
