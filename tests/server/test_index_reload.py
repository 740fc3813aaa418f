"""A corpus that changes while the server runs (issue #20 items 3-4), against a real ``python -m server``.

The server serves two indexes built by ``index_builder`` with a tiny model that retrieves while it
generates: ``default`` (documents ``m*``) and ``side`` (documents ``s*``), and polls them every 0.1 s.
A new version published by ``index_builder update`` is swapped in under a stream that keeps running
and finishes normally; the next requests retrieve the new documents. A corrupt version is refused
(logged, counted) while the old one keeps serving. Requests choose an index by name; an unknown
name is a 422 that names the served ones.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_harness import API_KEY, RETRIEVING_PROMPT, ServerProcess, metric, scrape, sse_events, wait_for

from onegen_core.formats.index_store import CURRENT, INDEX_FILE, VERSIONS, version_name
from onegen_core.retrieval.bm25 import BM25_DIR
from server.demo import DEMO_CORPUS, corpus_text

POLL_S = 0.1
# A stream that outlasts a reload on any machine (about 1000 tokens/s on an idle CPU), retrieving all along.
LONG_STREAM = {"prompt": RETRIEVING_PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True,
               "retrieval": {"max_retrievals": 64, "k": 2}}


def _write_corpus(path: Path, prefix: str, docs=DEMO_CORPUS) -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "title": d.title, "text": d.text}) + "\n"
                            for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(checkpoint, default index dir, side index dir): a retrieving tiny model with an 8k context."""
    from index_builder import BuildConfig, build_index
    from onegen_core.random_checkpoint import build_tiny_checkpoint, make_query_token_likely

    root = tmp_path_factory.mktemp("reload")
    ckpt = build_tiny_checkpoint(root / "ckpt", arch="llama", extra_text=corpus_text(DEMO_CORPUS), max_positions=8192)
    make_query_token_likely(ckpt, rank=0)
    out = []
    for name, prefix in (("main", "m"), ("side", "s")):
        corpus = _write_corpus(root / f"{name}.jsonl", prefix)
        build_index(BuildConfig(checkpoint=ckpt, corpus=[corpus], out=root / name, device="cpu", dtype="float32",
                                progress=False))
        out.append(root / name)
    return ckpt, out[0], out[1]


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    ckpt, main, side = assets
    with ServerProcess(["--checkpoint", str(ckpt), "--index", str(main), "--index", f"side={side}",
                        "--index-poll-s", str(POLL_S), "--max-tokens-limit", "4000", "--max-num-seqs", "8"],
                       tmp_path_factory.mktemp("logs") / "reload.log", api_key=API_KEY) as srv:
        yield srv


def _info(c: httpx.Client) -> dict[str, dict]:
    r = c.get("/info")
    assert r.status_code == 200, r.text
    return {i["name"]: i for i in r.json()["indexes"]}


def _retrieved_ids(c: httpx.Client, index: str | None = None, k: int = 5) -> list[str]:
    body: dict = {"queries": ["who wrote the book?", "Zorblat the baker"], "k": k}
    if index is not None:
        body["index"] = index
    r = c.post("/retrieve", json=body)
    assert r.status_code == 200, r.text
    return [h["doc_id"] for q in r.json()["results"] for h in q["hits"]]


def _generated_ids(c: httpx.Client, index: str | None = None) -> list[str]:
    retrieval: dict = {"max_retrievals": 4, "k": 2}
    if index is not None:
        retrieval["index"] = index
    r = c.post("/generate", json={"prompt": RETRIEVING_PROMPT, "max_tokens": 60, "retrieval": retrieval})
    assert r.status_code == 200, r.text
    ids = [h["doc_id"] for x in r.json()["retrievals"] for h in x["hits"]]
    assert ids, "the fixture model retrieves on this prompt"
    return ids


# ---------------------------------------------------------------------------- named indexes
def test_requests_choose_their_index_by_name(server):
    with server.client() as c:
        info = c.get("/info").json()
        assert [i["name"] for i in info["indexes"]] == ["default", "side"]
        assert info["index"]["name"] == "default" and info["retrieval_defaults"]["index"] == "default"
        assert all(i.startswith("m") for i in _retrieved_ids(c))
        assert all(i.startswith("s") for i in _retrieved_ids(c, "side"))
        assert all(i.startswith("m") for i in _generated_ids(c, "default"))
        assert all(i.startswith("s") for i in _generated_ids(c, "side"))
        r = c.post("/v1/completions", json={"prompt": RETRIEVING_PROMPT, "max_tokens": 60, "temperature": 0,
                                            "retrieval": {"index": "side", "max_retrievals": 4}})
        assert r.status_code == 200, r.text
        ids = [h["doc_id"] for x in r.json()["choices"][0]["retrievals"] for h in x["hits"]]
        assert ids and all(i.startswith("s") for i in ids)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", {"prompt": "x", "retrieval": {"index": "nope"}}, "retrieval.index"),
    ("/retrieve", {"queries": "x", "index": "nope"}, "index"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "retrieval": {"index": "nope"}},
     "retrieval.index"),
    ("/admin/reload", {"index": "nope"}, "index"),
])
def test_an_unknown_index_is_a_422_naming_the_served_ones(server, path, body, param):
    with server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "unknown_index"
    assert err["message"] == f"{param}: unknown index 'nope'; this server serves: 'default', 'side'"


def test_admin_reload_needs_the_api_key(server):
    r = httpx.post(server.url + "/admin/reload", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with server.client() as c:
        r = c.post("/admin/reload")
    assert r.status_code == 200, r.text
    assert {x["index"]: x["result"] for x in r.json()["indexes"]} == {"default": "unchanged", "side": "unchanged"}


# ---------------------------------------------------------------------------- reloads
def _stream(c: httpx.Client, events: list[tuple[float, dict | str]], retrieved: threading.Event) -> None:
    """Read a LONG_STREAM into ``events`` (arrival time, event); ``retrieved`` is set at its first retrieval."""
    with c.stream("POST", "/generate", json=LONG_STREAM) as r:
        assert r.status_code == 200
        for e in sse_events(r.iter_lines()):
            events.append((time.monotonic(), e))
            if isinstance(e, dict) and e["type"] == "retrieval":
                retrieved.set()


def test_a_stream_runs_across_a_reload_and_the_next_request_sees_the_new_version(server, assets, tmp_path):
    """The poll notices ``update``'s new CURRENT; the version is swapped in under a running stream, which finishes
    normally, its searches before the swap on the old version and after it on the new; the next /retrieve and
    /generate retrieve only new documents (all old ones were deleted)."""
    from index_builder.update import UpdateConfig, update_index

    ckpt, main, _ = assets
    with server.client() as c:
        before = scrape(c)
        assert _info(c)["default"]["version"] is None  # a plain directory
        changes = _write_corpus(tmp_path / "changes.jsonl", "n", DEMO_CORPUS[:4])
        deletes = tmp_path / "deletes.txt"
        deletes.write_text("".join(f"m{i}\n" for i in range(len(DEMO_CORPUS))))
        at_switch, go = threading.Event(), threading.Event()

        def hold_at_switch(step: str) -> None:  # the new version is written; publish it once the stream runs
            if step == "switch":
                at_switch.set()
                assert go.wait(60)

        result: list = []
        updater = threading.Thread(target=lambda: result.append(update_index(
            UpdateConfig(index=main, checkpoint=ckpt, corpus=[changes], delete=deletes, keep=1, device="cpu",
                         progress=False), on_step=hold_at_switch)))
        updater.start()
        assert at_switch.wait(120), "update did not reach its switch"
        events: list[tuple[float, dict | str]] = []
        retrieved = threading.Event()
        streamer = threading.Thread(target=_stream, args=(server.client(timeout=120), events, retrieved))
        streamer.start()
        assert retrieved.wait(60), "the stream has not retrieved"
        go.set()  # publish: CURRENT names version 2 (and version 1, the one served, is removed: --keep 1)
        updater.join(60)
        assert result and result[0].version == 2 and result[0].removed_versions == [1]  # the served one is gone
        assert wait_for(lambda: _info(c)["default"]["version"] == 2, timeout=10, interval=POLL_S)
        swapped_at = time.monotonic()
        streamer.join(120)
        assert not streamer.is_alive()
        kinds = [e["type"] if isinstance(e, dict) else e for _, e in events]
        assert "error" not in kinds and kinds[-2:] == ["final", "[DONE]"], kinds[-5:]
        final = events[-2][1]
        assert final["finish_reason"] in ("length", "stop") and final["usage"]["completion_tokens"] > 100
        trace = [h["doc_id"][0] for x in final["retrievals"] for h in x["hits"]]  # in the order they were made
        assert set(trace) == {"m", "n"} and trace == sorted(trace), f"old, then only new: {''.join(trace)}"
        assert any(t > swapped_at for t, e in events if isinstance(e, dict) and e["type"] == "token"), \
            "the stream ended before the swap: it did not run across the reload"
        assert set(_retrieved_ids(c)) <= {f"n{i}" for i in range(4)}
        assert all(i.startswith("n") for i in _generated_ids(c))
        info = _info(c)["default"]
        assert info["size"] == 4 and info["path"].endswith(f"{VERSIONS}/{version_name(2)}")
        after = scrape(c)
    assert metric(after, "onegen_index_reloads_total", index="default", result="success") == \
        metric(before, "onegen_index_reloads_total", index="default", result="success") + 1
    assert metric(after, "onegen_index_version", index="default") == 2
    assert metric(after, "onegen_index_documents", index="default") == 4
    assert metric(after, "onegen_index_last_reload_timestamp_seconds", index="default") > \
        metric(before, "onegen_index_last_reload_timestamp_seconds", index="default") > 0
    server.wait_for_log(lambda r: r.get("msg") == "index reloaded" and r.get("index") == "default")


def _publish_copy(index: Path, number: int, *, corrupt: bool) -> Path:
    """``index``'s plain files as ``versions/NNNNNN`` (with half of index.faiss when ``corrupt``), made current.
    The BM25 side index comes along: its manifest names it, and a version without the files it names is refused."""
    version = index / VERSIONS / version_name(number)
    version.mkdir(parents=True)
    for name in ("manifest.json", INDEX_FILE, "docstore.sqlite"):
        shutil.copy2(index / name, version / name)
    if (index / BM25_DIR).is_dir():
        shutil.copytree(index / BM25_DIR, version / BM25_DIR)
    if corrupt:
        data = (version / INDEX_FILE).read_bytes()
        (version / INDEX_FILE).write_bytes(data[: len(data) // 2])
    (index / "CURRENT.tmp").write_text(version_name(number) + "\n")
    (index / "CURRENT.tmp").rename(index / CURRENT)
    return version


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(server, assets):
    _, _, side = assets
    failed = {"index": "side", "result": "failed"}
    with server.client() as c:
        before = metric(scrape(c), "onegen_index_reloads_total", **failed)
        bad = _publish_copy(side, 2, corrupt=True)
        assert wait_for(lambda: metric(scrape(c), "onegen_index_reloads_total", **failed) == before + 1,
                        timeout=10, interval=POLL_S)
        records = server.wait_for_log(lambda r: r.get("msg", "").startswith("index reload refused")
                                      and r.get("index") == "side")
        assert records[-1]["level"] == "error" and INDEX_FILE in records[-1]["error"]
        assert records[-1]["candidate"] == str(bad)
        assert _info(c)["side"]["version"] is None  # still the plain directory it started with
        assert all(i.startswith("s") for i in _retrieved_ids(c, "side"))
        time.sleep(5 * POLL_S)  # more polls: a refused version is not tried (nor logged, nor counted) again
        assert metric(scrape(c), "onegen_index_reloads_total", **failed) == before + 1
        r = c.post("/admin/reload", json={"index": "side"})  # an explicit reload tries it again
        assert r.status_code == 200, r.text
        [outcome] = r.json()["indexes"]
        assert outcome["result"] == "failed" and INDEX_FILE in outcome["error"] and outcome["version"] is None
        assert metric(scrape(c), "onegen_index_reloads_total", **failed) == before + 2
        _publish_copy(side, 3, corrupt=False)  # the fix: a good version
        r = c.post("/admin/reload", json={"index": "side"})
        assert r.status_code == 200 and r.json()["indexes"][0]["result"] in ("reloaded", "unchanged")  # or polled
        assert _info(c)["side"]["version"] == 3
        assert all(i.startswith("s") for i in _retrieved_ids(c, "side"))
