"""Memory-mapped indexes (issue #22): replicas on one host share the pages of one ``index.faiss``.

``IndexStore.open(mmap=True)`` maps ``index.faiss`` (FAISS' ``IO_FLAG_MMAP_IFC``: every type the index
builder writes); the answer to a search is the same as from an index read into memory. Whether the file
is mapped, and whether its pages stay the page cache's (shared by every process that maps the file)
rather than private copies, is read from this process's own ``/proc/self/smaps``, not taken on trust.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from onegen_core.engine import Engine, EngineConfig
from onegen_core.formats.index_store import (
    INDEX_FILE,
    VERSIONS,
    Document,
    IndexStore,
    mmap_read_flags,
    version_name,
    write_index_dir,
)
from onegen_core.retrieval.registry import load_index

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _docs(n: int, prefix: str = "d") -> list[Document]:
    return [Document(id=f"{prefix}{i}", text=f"text {i}") for i in range(n)]


def file_mapping(path: Path) -> dict[str, int] | None:
    """This process's mapping of ``path`` from /proc/self/smaps, its kB fields summed; None when not mapped."""
    target = str(path.resolve())
    out: dict[str, int] | None = None
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
            inside = len(head) >= 6 and head[5] == target
            if inside and out is None:
                out = {}
        elif inside and out is not None and line.endswith(" kB"):
            key, value = line.split(":", 1)
            out[key] = out.get(key, 0) + int(value.split()[0])
    return out


def _flush(path: Path) -> None:
    """Write the file's pages out: smaps counts a page still dirty from the write as dirty in every mapping."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF4,Flat", "IVF4,PQ4x4np", "SQ8", "PCA16,Flat"])
def test_mapped_with_shared_pages_and_the_same_answers(tmp_path, factory):
    """The index builder's presets (flat, hnsw, ivfpq) and other factory strings: FAISS 1.15 maps them all."""
    import faiss

    if not hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        pytest.skip(f"faiss {faiss.__version__} maps only IVF inverted lists (no IO_FLAG_MMAP_IFC)")
    vecs = _unit(512, 32, 0)
    out = write_index_dir(tmp_path / "idx", vecs, _docs(512), checkpoint_fingerprint="fp", factory=factory)
    _flush(out / INDEX_FILE)
    queries = _unit(8, 32, 1)
    read = IndexStore.open(out)
    assert not read.mmapped and file_mapping(out / INDEX_FILE) is None
    store = IndexStore.open(out, mmap=True)
    assert store.mmapped and mmap_read_flags(factory)
    for a, b in zip(store.search(queries, 5), read.search(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    mapping = file_mapping(out / INDEX_FILE)
    assert mapping is not None and mapping["Rss"] > 0, mapping
    # the pages are the page cache's, which every process mapping the file shares; none copied or written
    assert mapping["Private_Dirty"] == 0 and mapping["Anonymous"] == 0, mapping


def test_older_faiss_maps_only_bare_ivf_indexes(monkeypatch):
    import faiss

    monkeypatch.delattr(faiss, "IO_FLAG_MMAP_IFC", raising=False)
    assert mmap_read_flags("IVF1024,PQ32np") == faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    assert mmap_read_flags("Flat") == 0 and mmap_read_flags("HNSW32") == 0 and mmap_read_flags("OPQ8,IVF64,Flat") == 0


def test_a_mapped_version_serves_after_update_removed_its_directory(tmp_path):
    """The mapping outlives the file's name, as an index read into memory does (``update --keep``)."""
    root = tmp_path / "idx"
    v1 = write_index_dir(root / VERSIONS / version_name(1), _unit(64, 16, 0), _docs(64), checkpoint_fingerprint="fp")
    (root / "CURRENT").write_text(version_name(1) + "\n")
    loaded = load_index("default", root, fingerprint="fp", dim=16, retriever="faiss", device=torch.device("cpu"),
                        mmap=True)
    assert loaded.store is not None and loaded.store.mmapped
    shutil.rmtree(v1)
    hits = loaded.retriever.search(_unit(1, 16, 0), 3)[0]
    assert hits[0].doc_id == "d0" and len(hits) == 3
    loaded.close()


@pytest.mark.parametrize("mmap", [True, False])
def test_the_engine_maps_its_indexes_as_configured(retrieving_checkpoint, tiny_index, mmap):
    engine = Engine.from_checkpoint(retrieving_checkpoint, tiny_index,
                                    EngineConfig(num_kv_blocks=64, block_size=8, index_mmap=mmap, retriever="faiss"))
    assert engine.index.mmapped is mmap
    assert engine.load_index("default").store.mmapped is mmap  # a reload maps (or reads) alike
