"""bench/replicas.py and bench/index_memory.py: where their results go, their sizes, the /proc reading; and (slow)
bench/replicas.py end to end on a tiny model, two replicas behind a real nginx."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests" / "server"))

import common  # noqa: E402
import index_memory  # noqa: E402
import replicas  # noqa: E402
from nginx_harness import nginx_binary  # noqa: E402


@pytest.mark.parametrize("argv,full", [([], True), (["--quick"], False), (["--requests", "8"], False),
                                       (["--requests", "48"], True), (["--checkpoint", "c", "--index", "i"], False),
                                       (["--scenarios", "routing"], False), (["--threads", "1"], False),
                                       (["--server-arg=--max-num-seqs", "--server-arg=32"], False)])
def test_a_quick_or_partial_run_writes_elsewhere(argv, full):
    assert Path(replicas.parse_args(argv).out) == (common.RESULTS if full else common.QUICK_RESULTS) / "replicas"
    assert replicas.parse_args([*argv, "--out", "/tmp/r"]).out == "/tmp/r"


def test_quick_sizes_and_what_is_refused():
    a = replicas.parse_args(["--quick", "--turns", "5"])
    assert (a.requests, a.max_tokens, a.conversations, a.turns) == (16, 16, 4, 5)  # a size given wins over --quick
    assert a.scenarios == list(replicas.SCENARIOS)
    for bad in (["--checkpoint", "c"], ["--index", "i"], ["--scenarios", "throughput,nope"], ["--requests", "0"]):
        with pytest.raises(SystemExit):
            replicas.parse_args(bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_memory_reads_a_mapped_file(tmp_path):
    import mmap

    path = tmp_path / "index.faiss"
    path.write_bytes(b"\1" * (4 << 20))
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096  # every page touched
        got = index_memory.process_memory(os.getpid())
    assert got["index_rss"] == 4 << 20 and got["index_pss"] <= got["index_rss"]
    assert got["rss"] >= got["index_rss"] and got["pss"] > 0 and got["anonymous"] > 0


@pytest.mark.slow
@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (apt-get install nginx)")
def test_the_bench_end_to_end_on_a_tiny_model(tmp_path):
    """Every scenario with two replicas behind nginx, at the smallest sizes: nothing lost, the report complete."""
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.formats.index_store import Document, write_index_dir
    from onegen_core.random_checkpoint import build_tiny_checkpoint, make_query_token_likely
    from onegen_core.retrieval.encoder import Encoder

    ckpt_dir = build_tiny_checkpoint(tmp_path / "ckpt", seed=1, max_positions=2048)
    make_query_token_likely(ckpt_dir, rank=0)
    ckpt = load_checkpoint(ckpt_dir)
    docs = [Document(id=f"d{i}", text=t) for i, t in enumerate(["Paris is the capital of France.",
                                                                 "Zorblat lives in Quenta.", "Mirelle plays the harp."])]
    vecs = Encoder.from_checkpoint(ckpt, dtype="float32", device="cpu").encode_documents([d.text for d in docs])
    index = write_index_dir(tmp_path / "index", vecs, docs, checkpoint_fingerprint=ckpt.fingerprint,
                            special_token_ids=ckpt.token_ids.by_name, encode_dtype="float32")
    out = tmp_path / "out" / "replicas"
    rc = replicas.main(["--checkpoint", str(ckpt_dir), "--index", str(index), "--dtype", "float32", "--quick",
                        "--concurrency", "3", "--requests", "6", "--max-tokens", "8", "--conversations", "3",
                        "--turns", "3", "--update-docs", "2", "--drain-timeout-s", "3", "--threads", "1",
                        "--log-dir", str(tmp_path), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [t["replicas"] for t in result["throughput"]] == [1, 2]
    assert all(t["ok"] == t["requests"] == 6 for t in result["throughput"])
    assert all(m["index_rss"] > 0 for t in result["throughput"] for m in t["memory"])
    assert result["routing"]["session"]["replica_switches"] == 0
    assert result["routing"]["session"]["hit_rate"] > 0
    assert result["update"]["lost"] == 0 and result["update"]["versions"]["after"] == [2, 2]
    assert result["drain"]["lost"] == 0 and result["drain"]["after_signal"]["requests"] > 0
    late = result["drain"]["after_signal"]
    assert late["served_by_the_other"] == late["requests"]
    md = out.with_suffix(".md").read_text()
    for heading in ("1 against 2 replicas", "Resident memory per replica", "Cache-aware routing",
                    "Index update under load", "SIGTERM to one replica under load", "lost."):
        assert heading in md
