"""bench/index_updates.py: where its results go, what it plans to change and how a probe recognises a change; and
its quick mode end to end on a tiny model that retrieves (a real server, real ``index_builder update`` runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import index_updates  # noqa: E402

CORPUS = ["Paris is the capital of France.", "Zorblat lives in Quenta and works as a baker.",
          "Mirelle was born in Odrin and plays the harp.", "The quick brown fox jumps over the lazy dog.",
          "The river Sennet floods every spring.", "Tobin Varro wrote the book of tides."]


@pytest.mark.parametrize("argv,full", [([], True), (["--quick"], False), (["--duration", "30"], False),
                                       (["--updates", "5"], True), (["--checkpoint", "c", "--index", "i"], False),
                                       (["--threads", "1"], False), (["--server-arg=--max-num-seqs"], False)])
def test_a_quick_or_partial_run_writes_elsewhere(argv, full):
    a = index_updates.parse_args(argv)
    assert Path(a.out) == (common.RESULTS if full else common.QUICK_RESULTS) / "index_updates"
    assert index_updates.parse_args([*argv, "--out", "/tmp/u"]).out == "/tmp/u"


def test_quick_sizes_and_what_is_refused():
    a = index_updates.parse_args(["--quick", "--updates", "4"])
    assert (a.duration, a.updates, a.clients, a.max_tokens) == (15.0, 4, 8, 32)  # a size given wins over --quick
    for bad in (["--checkpoint", "c"], ["--index", "i"], ["--updates", "0"], ["--probe-interval-s", "0"]):
        with pytest.raises(SystemExit):
            index_updates.parse_args(bad)


def test_a_probe_sees_an_addition_a_replacement_and_a_deletion():
    add = index_updates.Change("add", "new", "The zubalo is here.", "zubalo")
    rep = index_updates.Change("replace", "d1", "Old text. Also called kivaro.", "kivaro")
    gone = index_updates.Change("delete", "new", "The zubalo is here.", "zubalo")
    assert add.seen([{"doc_id": "new#0", "text": "The zubalo is here."}])
    assert not add.seen([{"doc_id": "newer", "text": "The zubalo is here."}])  # another document
    assert not rep.seen([{"doc_id": "d1", "text": "Old text."}])  # the old version of the document
    assert rep.seen([{"doc_id": "d1", "text": "Old text. Also called kivaro."}])
    assert gone.seen([{"doc_id": "d2", "text": "x"}]) and not gone.seen([{"doc_id": "new", "text": "x"}])
    assert add.query(hybrid=True) == "zubalo" and add.query(hybrid=False) == add.text


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(checkpoint, index): a tiny model that retrieves, its index with a BM25 side index."""
    from index_builder import BuildConfig, build_index
    from onegen_core.random_checkpoint import build_tiny_checkpoint, make_query_token_likely

    root = tmp_path_factory.mktemp("index-updates-bench")
    ckpt = build_tiny_checkpoint(root / "ckpt", arch="llama", extra_text=" ".join(CORPUS), max_positions=2048)
    make_query_token_likely(ckpt, rank=0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(CORPUS)))
    build_index(BuildConfig(checkpoint=ckpt, corpus=[corpus], out=root / "index", device="cpu", dtype="float32",
                            progress=False))
    return ckpt, root / "index"


def test_the_plan_adds_replaces_and_deletes(assets, tmp_path):
    _, index = assets
    updates = index_updates.plan_updates(index, tmp_path, 3, seed=7)
    assert [[c.kind for c in u.changes] for u in updates] == [["add"], ["add", "replace"], ["add", "delete"]]
    assert updates[2].changes[1].doc_id == updates[1].changes[0].doc_id  # deletes what update 2 added
    assert updates[1].changes[1].doc_id == "d0" and updates[1].changes[1].text.startswith(CORPUS[0])
    assert updates[2].delete.read_text() == updates[1].changes[0].doc_id + "\n"
    words = [c.word for u in updates for c in u.changes if c.kind != "delete"]
    assert len(set(words)) == len(words) and not any(w in " ".join(CORPUS).lower() for w in words)


def test_the_quick_mode_end_to_end_on_a_tiny_model(assets, tmp_path):
    """Streams, three real updates and their probes: nothing lost, every update seen, the original index untouched."""
    ckpt, index = assets
    before = sorted((p.relative_to(index), p.stat().st_mtime_ns) for p in index.rglob("*"))
    out = tmp_path / "out" / "index_updates"
    rc = index_updates.main(["--checkpoint", str(ckpt), "--index", str(index), "--dtype", "float32", "--quick",
                             "--duration", "6", "--clients", "3", "--max-tokens", "16", "--threads", "1",
                             "--log-dir", str(tmp_path), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.with_suffix(".json").read_text())
    s = result["summary"]
    assert result["probe_mode"] == "hybrid"
    assert s["requests"] > 0 and s["lost"] == 0 and s["clean"] == 0 and s["pass_requests"]
    assert [u["version"] for u in result["updates"]] == ["000002", "000003", "000004"]
    assert all(u["visible_after_s"] is not None for u in result["updates"])
    assert s["reloads"].get("success") == 3 and s["final_version"] == 4
    assert s["final_size"] == len(CORPUS) + 3 - 1  # three added, one replaced in place, one deleted
    assert s["versions_seen"][-1] == 4
    md = out.with_suffix(".md").read_text()
    assert "no request failed or lost" in md and "visible to `/retrieve` within 2 s" in md
    assert sorted((p.relative_to(index), p.stat().st_mtime_ns) for p in index.rglob("*")) == before
