"""Small corpora for the index builder's tests, written on the fly."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over lazy dog paris capital france berlin germany rome italy river flows sea "
    "question answer author wrote book year zorblat lives quenta baker mirelle born odrin plays harp"
).split()


def make_records(n: int, *, seed: int = 0, min_words: int = 3, max_words: int = 60, prefix: str = "d") -> list[dict]:
    """``n`` corpus records with varied lengths (so that length sorting has something to do)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))}
        if i % 3 == 0:
            rec["title"] = f"Title {i % 5}"
        if i % 4 == 0:
            rec["metadata"] = {"n": i}
        out.append(rec)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def kill_after_shards(cli_args: list[str], shards: Path, repo: Path, *, at_least: int = 3) -> None:
    """Run ``python -m index_builder *cli_args`` and SIGKILL it once ``shards`` holds ``at_least`` shard files.

    The child uses this process's intra-op thread count (CPU GEMMs may round differently with another), so a
    rerun here is byte-comparable with an uninterrupted run here.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    import pytest
    import torch

    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "index_builder", *cli_args], env=env, cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    try:
        while len(list(shards.glob("*.npy"))) < at_least:
            if proc.poll() is not None:
                pytest.fail(f"{cli_args[0]} ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read()}")
            assert time.monotonic() < deadline, "no shard was written within 180 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
