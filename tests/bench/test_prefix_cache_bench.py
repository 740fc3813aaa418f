"""bench/prefix_cache.py end to end on a tiny random model: two real servers (the prefix cache on and off), its quick
mode at small sizes, the report's tables, figure and JSON; and where its results go."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import prefix_cache  # noqa: E402

CORPUS = ["Paris is the capital of France.", "Zorblat lives in Quenta and works as a baker.",
          "Mirelle was born in Odrin and plays the harp.", "The quick brown fox jumps over the lazy dog."]


@pytest.mark.parametrize("argv,full", [([], True), (["--quick"], False), (["--repeats", "2"], False),
                                       (["--checkpoint", "c", "--index", "i"], False), (["--concurrency", "8"], False),
                                       (["--server-arg=--max-num-batched-tokens", "--server-arg=1024"], False),
                                       (["--block-size", "32"], False), (["--repeats", "5"], True)])
def test_a_quick_or_partial_run_writes_elsewhere(argv, full):
    assert Path(prefix_cache.parse_args(argv).out) == (common.RESULTS if full else common.QUICK_RESULTS) / "prefix_cache"
    assert prefix_cache.parse_args([*argv, "--out", "/tmp/p"]).out == "/tmp/p"


@pytest.mark.parametrize("usage,cached", [({"prompt_tokens": 9, "cached_tokens": 5}, 5),
                                          ({"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 3}}, 3),
                                          ({"prompt_tokens": 9}, None), ({"prompt_tokens_details": None}, None),
                                          (None, None)])
def test_cached_tokens_are_read_from_either_usage_shape_or_are_absent(usage, cached):
    assert prefix_cache._cached_of(usage) == cached


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.formats.index_store import Document, write_index_dir
    from onegen_core.retrieval.encoder import Encoder
    from onegen_core.testing import build_tiny_checkpoint, make_query_token_likely

    d = tmp_path_factory.mktemp("prefix-cache-bench")
    ckpt_dir = build_tiny_checkpoint(d / "ckpt", seed=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt_dir)  # [RQ] takes the place of the commonest token after these questions
    make_query_token_likely(ckpt_dir, [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                               add_generation_prompt=True)
                                       for q in prefix_cache.questions()[:24]], rank=0)
    ckpt = load_checkpoint(ckpt_dir)
    docs = [Document(id=f"d{i}", text=t) for i, t in enumerate(CORPUS)]
    vecs = Encoder.from_checkpoint(ckpt, dtype="float32", device="cpu").encode_documents([x.text for x in docs])
    index = write_index_dir(d / "index", vecs, docs, checkpoint_fingerprint=ckpt.fingerprint,
                            special_token_ids=ckpt.token_ids.by_name)
    out = d / "out" / "prefix_cache"
    rc = prefix_cache.main(["--checkpoint", str(ckpt_dir), "--index", str(index), "--quick", "--concurrency", "4",
                            "--system-tokens", "96", "--max-tokens", "4", "--turns", "4", "--conv-system-tokens", "24",
                            "--conv-max-tokens", "6", "--block-size", "4", "--log-dir", str(d), "--out", str(out)])
    assert rc == 0
    return json.loads(out.with_suffix(".json").read_text()), out


def test_both_servers_answer_alike_and_the_report_is_complete(report):
    result, out = report
    summary = result["summary"]
    assert len(result["bursts"]) == 2 * 2 * 2  # repeats x cold/warm x cache
    assert all(len(b["replies"]) == 4 for b in result["bursts"])
    assert len(result["conversations"]) == 2 * 2 and all(len(c["turns"]) == 4 for c in result["conversations"])
    for phase in ("cold", "warm"):  # greedy float32: the cache changes no token
        assert summary["system_prompt"][phase]["same_text"] == [8, 8]
    assert summary["conversation"]["same_text"] == [8, 8]
    assert sum(t["retrievals"] for c in result["conversations"] for t in c["turns"]) > 0
    assert [t["pass"] in (True, False) for t in summary["targets"]] == [True] * 3
    md = out.with_suffix(".md").read_text()
    for heading in ("4 concurrent requests sharing a 96-token system prompt", "A 4-turn conversation",
                    "Targets (issue #21)", "--no-enable-prefix-caching"):
        assert heading in md
    assert out.with_suffix(".png").stat().st_size > 0


def test_cached_tokens_where_the_server_reports_them(report):
    """Where the responses carry the cached count: none with the cache off; with it on, the shared system prompt's
    blocks for all but the first request of a cold burst, and from turn 2 every full block of the previous turn's
    prompt (the conversation decision, docs/prefix-caching.md)."""
    result, _ = report
    replies = {c: [r for b in result["bursts"] if b["cache"] == c for r in b["replies"]] for c in ("off", "on")}
    if replies["on"][0]["cached_tokens"] is None:
        pytest.skip("this server does not report usage.cached_tokens")
    assert all(r["cached_tokens"] == 0 for r in replies["off"])
    for b in result["bursts"]:
        if b["cache"] == "on":
            assert sum(r["cached_tokens"] > 0 for r in b["replies"]) >= 3
    for conv in result["conversations"]:
        for prev, cur in zip(conv["turns"], conv["turns"][1:], strict=False):
            if conv["cache"] == "on":
                assert cur["cached_tokens"] >= prev["prompt_tokens"] // 4 * 4
            else:
                assert cur["cached_tokens"] == 0
