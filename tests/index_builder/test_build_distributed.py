"""``torchrun --nproc_per_node 2`` (gloo, CPU) builds the same index as one process."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def _rows(index_dir: Path) -> list[tuple]:
    with sqlite3.connect(index_dir / "docstore.sqlite") as con:
        return con.execute("SELECT * FROM documents ORDER BY vector_id").fetchall()


def test_two_ranks_give_the_single_process_vectors_and_ids(small_corpus, tiny_checkpoint, tmp_path):
    from index_builder import BuildConfig, build_index

    # the single-process reference, built now: with the thread count the ranks are given below
    single_dir = tmp_path / "single"
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[small_corpus], out=single_dir, shard_size=16,
                            device="cpu", progress=False))
    out = tmp_path / "dist"
    # each rank with this process' intra-op thread count, so that GEMMs round exactly as in the reference build
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "index_builder", "build", "--checkpoint", str(tiny_checkpoint), "--corpus", str(small_corpus),
         "--out", str(out), "--shard-size", "16", "--device", "cpu", "--quiet"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("built") == 1 and "in 4 shard(s)" in proc.stdout  # rank 0 reports for all
    assert "rank 1: encoded 28 documents in 2 shard(s)" in proc.stderr  # shards 1 and 3 of 16, 16, 16, 12
    single = faiss.read_index(str(single_dir / "index.faiss"))
    dist = faiss.read_index(str(out / "index.faiss"))
    assert dist.ntotal == single.ntotal == 60
    assert np.array_equal(dist.reconstruct_n(0, 60), single.reconstruct_n(0, 60))
    assert _rows(out) == _rows(single_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["builder"]["world_size"] == 2
    assert manifest["corpus_digest"] == json.loads((single_dir / "manifest.json").read_text())["corpus_digest"]
