"""Hybrid retrieval over HTTP (issue #20 item 5), against a real ``python -m server``.

Two indexes built by ``index_builder`` with a tiny model that retrieves while it generates: ``default`` (the
demo corpus plus one document whose rare word the prompts repeat, with its BM25 side index) and ``plain``
(the demo corpus, built with ``--no-bm25``). ``retrieval.mode`` on /generate and the OpenAI routes and
``mode`` on /retrieve choose dense or hybrid; hybrid puts the rare word's document first where the dense
ranking does not, and its hits are the documented fusion of the dense ranking and BM25 over the last user
turn plus what was generated before the query token. A bad mode, and hybrid on ``plain``, are 422s naming
the field; ``--retrieval-mode hybrid`` refuses to start with ``plain`` (one line, status 2) and with
``default`` serves hybrid by default. A new version published by ``index_builder update`` brings its BM25
side index along: the document it adds is found by its rare word.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_harness import API_KEY, REPO, ServerProcess, free_port, wait_for

from onegen_core.formats.index_store import Document, IndexStore
from onegen_core.retrieval.bm25 import BM25Retriever
from onegen_core.retrieval.fusion import bm25_query_text
from server.demo import DEMO_CORPUS, corpus_text

RARE = "Quillfeather"
RARE_DOC = Document("rare", f"{RARE} pastries are baked in Velmora every winter.", title="Velmora")
LATE = "Zanthoria"  # a word only the update brings
LATE_DOC = Document("late", f"{LATE} is a lighthouse keeper on the northern cape.", title="Cape")
PROMPT = f"Question: who bakes {RARE} pastries?"
RRF_K = 60


def _write_corpus(path: Path, docs: list[Document]) -> Path:
    path.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    return path


def _demo(prefix: str) -> list[Document]:
    return [Document(f"{prefix}{i}", d.text, title=d.title) for i, d in enumerate(DEMO_CORPUS)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(checkpoint, index with BM25, index without): a retrieving tiny model that knows the rare words."""
    from index_builder import BuildConfig, build_index
    from onegen_core.random_checkpoint import build_tiny_checkpoint, make_query_token_likely

    root = tmp_path_factory.mktemp("hybrid")
    docs = [*_demo("m"), RARE_DOC]
    ckpt = build_tiny_checkpoint(root / "ckpt", arch="llama",
                                 extra_text=corpus_text([*docs, LATE_DOC]) + " " + PROMPT, max_positions=2048)
    make_query_token_likely(ckpt, rank=0)
    for name, bm25 in (("main", True), ("plain", False)):
        build_index(BuildConfig(checkpoint=ckpt, corpus=[_write_corpus(root / f"{name}.jsonl", docs)],
                                out=root / name, device="cpu", dtype="float32", progress=False, bm25=bm25))
    return ckpt, root / "main", root / "plain"


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    ckpt, main, plain = assets
    with ServerProcess(["--checkpoint", str(ckpt), "--index", str(main), "--index", f"plain={plain}",
                        "--index-poll-s", "0.1", "--max-num-seqs", "8"],
                       tmp_path_factory.mktemp("logs") / "hybrid.log", api_key=API_KEY) as srv:
        yield srv


def _rrf(dense: list[str], lexical: list[str]) -> list[tuple[str, float]]:
    """The documented fusion, by hand: sum of 1 / (60 + rank), ties to the better rank, then to dense."""
    score: dict[str, float] = {}
    best: dict[str, tuple[int, int]] = {}
    for which, ranking in enumerate((dense, lexical)):
        for rank, doc in enumerate(ranking, start=1):
            score[doc] = score.get(doc, 0.0) + 1.0 / (RRF_K + rank)
            best[doc] = min(best.get(doc, (rank, which)), (rank, which))
    return [(d, score[d]) for d in sorted(score, key=lambda d: (-round(score[d], 12), best[d]))]


def _bm25_ranking(index_dir: Path, text: str) -> list[str]:
    store = IndexStore.open(index_dir)
    try:
        return [h.doc_id for h in BM25Retriever.open(store).search([text], 20)[0]]
    finally:
        store.close()


def _generate(c: httpx.Client, mode: str | None, *, k: int, index: str | None = None) -> dict:
    retrieval: dict = {"k": k, "max_retrievals": 1}
    if mode is not None:
        retrieval["mode"] = mode
    if index is not None:
        retrieval["index"] = index
    r = c.post("/generate", json={"prompt": PROMPT, "max_tokens": 24, "retrieval": retrieval})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["retrievals"], "the fixture model retrieves on this prompt"
    return body


# ---------------------------------------------------------------------------- hybrid retrieval
def test_a_hybrid_generation_inserts_what_only_bm25_ranks_first(server, assets):
    _, main, _ = assets
    with server.client() as c:
        dense = _generate(c, None, k=20)  # the server's default mode: dense
        hybrid = _generate(c, "hybrid", k=3)
    d, h = dense["retrievals"][0], hybrid["retrievals"][0]
    assert d["mode"] == "dense" and h["mode"] == "hybrid"
    assert d["hits"][0]["doc_id"] != "rare" and h["hits"][0]["doc_id"] == "rare"
    # the same greedy text up to the query token, so the same query vector: fuse its dense ranking by hand
    before = hybrid["text"][: h["output_text_offset"]]
    assert dense["text"][: d["output_text_offset"]] == before
    expected = _rrf([x["doc_id"] for x in d["hits"]], _bm25_ranking(main, bm25_query_text(PROMPT, before)))[:3]
    assert [(x["doc_id"], round(x["score"], 9)) for x in h["hits"]] == [(doc, round(s, 9)) for doc, s in expected]


def test_the_openai_routes_take_the_mode_in_extra_body(server):
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                            "retrieval": {"mode": "hybrid", "max_retrievals": 1}})
        assert r.status_code == 200, r.text
        [first] = r.json()["choices"][0]["retrievals"]
        assert first["mode"] == "hybrid" and first["hits"][0]["doc_id"] == "rare"
        chat = {}
        for mode in ("dense", "hybrid"):  # BM25 searches the last user turn (and what was generated before [RQ])
            r = c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Earlier question"}, {"role": "assistant", "content": "Yes."},
                             {"role": "user", "content": PROMPT}],
                "max_tokens": 24, "temperature": 0, "retrieval": {"mode": mode, "max_retrievals": 1, "k": 3}})
            assert r.status_code == 200, r.text
            [chat[mode]] = r.json()["choices"][0]["retrievals"]
        assert chat["hybrid"]["mode"] == "hybrid" and chat["dense"]["mode"] == "dense"
        assert "rare" in [h["doc_id"] for h in chat["hybrid"]["hits"]]
        assert "rare" not in [h["doc_id"] for h in chat["dense"]["hits"]]


def test_retrieve_in_hybrid_mode_fuses_with_the_query_string(server, assets):
    _, main, _ = assets
    with server.client() as c:
        dense = c.post("/retrieve", json={"queries": [PROMPT], "k": 20, "mode": "dense"})
        hybrid = c.post("/retrieve", json={"queries": [PROMPT], "k": 4, "mode": "hybrid", "return_text": True})
        default = c.post("/retrieve", json={"queries": [PROMPT], "k": 20})
    assert dense.status_code == hybrid.status_code == default.status_code == 200, (dense.text, hybrid.text)
    dense_ids = [x["doc_id"] for x in dense.json()["results"][0]["hits"]]
    assert dense_ids == [x["doc_id"] for x in default.json()["results"][0]["hits"]]  # the default mode: dense
    assert dense_ids[0] != "rare"
    hits = hybrid.json()["results"][0]["hits"]
    expected = _rrf(dense_ids, _bm25_ranking(main, PROMPT))[:4]
    assert [(x["doc_id"], round(x["score"], 9)) for x in hits] == [(d, round(s, 9)) for d, s in expected]
    assert hits[0]["doc_id"] == "rare" and hits[0]["text"] == RARE_DOC.text


def test_info_says_which_index_can_serve_hybrid(server):
    with server.client() as c:
        info = c.get("/info").json()
    assert info["retrieval_defaults"]["mode"] == "dense"
    assert {i["name"]: i["bm25"] for i in info["indexes"]} == {"default": True, "plain": False}


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", {"prompt": "x", "retrieval": {"mode": "sparse"}}, "retrieval.mode"),
    ("/retrieve", {"queries": "x", "mode": "bm25"}, "mode"),
    ("/v1/completions", {"prompt": "x", "retrieval": {"mode": "Hybrid"}}, "retrieval.mode"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "retrieval": {"mode": 1}},
     "retrieval.mode"),
])
def test_a_bad_mode_is_a_422_naming_the_field(server, path, body, param):
    with server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: "), err


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", {"prompt": "x", "retrieval": {"mode": "hybrid", "index": "plain"}}, "retrieval.mode"),
    ("/retrieve", {"queries": "x", "mode": "hybrid", "index": "plain"}, "mode"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "retrieval": {"mode": "hybrid", "index": "plain"}}, "retrieval.mode"),
])
def test_hybrid_on_an_index_without_bm25_is_a_422_saying_what_to_run(server, assets, path, body, param):
    _, _, plain = assets
    with server.client() as c:
        r = c.post(path, json=body)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "hybrid_unavailable"
        assert err["message"].startswith(f"{param}: index 'plain' ({plain}) has no BM25 side index")
        assert f"python -m index_builder update --index {plain}" in err["message"]
        assert "--no-bm25" in err["message"]
        ok = c.post("/generate", json={"prompt": "x", "max_tokens": 2,
                                       "retrieval": {"mode": "hybrid", "index": "plain", "enabled": False}})
        assert ok.status_code == 200, ok.text  # nothing to search: nothing to refuse


# ---------------------------------------------------------------------------- the default mode
def _run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ONEGEN_")}
    full.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=120)


def test_a_hybrid_default_refuses_to_start_on_an_index_without_bm25(assets):
    ckpt, main, plain = assets
    r = _run_server("--checkpoint", str(ckpt), "--index", str(main), "--index", f"plain={plain}",
                    env={"ONEGEN_RETRIEVAL_MODE": "hybrid"})
    assert r.returncode == 2, (r.stdout, r.stderr)
    [line] = r.stderr.splitlines()
    assert line.startswith(f"onegen server: --retrieval-mode hybrid: index 'plain' ({plain}) has no BM25 side index")
    assert line.endswith("; or serve with --retrieval-mode dense")


def test_a_hybrid_default_serves_hybrid(assets, tmp_path):
    ckpt, main, _ = assets
    srv = ServerProcess(["--checkpoint", str(ckpt), "--index", str(main), "--retrieval-mode", "hybrid",
                         "--index-poll-s", "0"], tmp_path / "default-hybrid.log", api_key=API_KEY)
    try:
        srv.wait_ready()
        with srv.client() as c:
            assert c.get("/info").json()["retrieval_defaults"]["mode"] == "hybrid"
            body = _generate(c, None, k=1)
            assert body["retrievals"][0]["mode"] == "hybrid" and body["retrievals"][0]["hits"][0]["doc_id"] == "rare"
            dense = _generate(c, "dense", k=1)
            assert dense["retrievals"][0]["mode"] == "dense" and dense["retrievals"][0]["hits"][0]["doc_id"] != "rare"
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- reloads
def test_a_reload_swaps_the_bm25_side_index_with_the_vectors(server, assets, tmp_path):
    """Last in this module: it publishes version 2 of ``default`` (the plain directory becomes version 1)."""
    from index_builder.update import UpdateConfig, update_index

    ckpt, main, _ = assets
    with server.client() as c:
        before = c.post("/retrieve", json={"queries": [LATE], "k": 3, "mode": "hybrid"}).json()
        assert all(h["doc_id"] != "late" for h in before["results"][0]["hits"])
        update_index(UpdateConfig(index=main, checkpoint=ckpt, corpus=[_write_corpus(tmp_path / "c.jsonl", [LATE_DOC])],
                                  device="cpu", progress=False))
        assert wait_for(lambda: c.get("/info").json()["indexes"][0]["version"] == 2, timeout=15, interval=0.1)
        info = c.get("/info").json()["indexes"][0]
        assert info["bm25"] and info["size"] == len(DEMO_CORPUS) + 2
        after = c.post("/retrieve", json={"queries": [LATE], "k": 3, "mode": "hybrid"})
        assert after.status_code == 200, after.text
        assert after.json()["results"][0]["hits"][0]["doc_id"] == "late"
