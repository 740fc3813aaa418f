"""Two real replicas behind a real nginx on loopback (issue #22: what must be shown).

Two ``python -m server`` processes serve one tiny retrieving model and one index directory (the shared
volume), behind Debian's nginx running the shipped ``deploy/nginx/onegen.conf`` (``nginx_harness``: only
the addresses differ). Every answer names its replica (``X-Served-By``). Shown, in order:

* a replica still loading refuses before any work (503 + Retry-After) and nginx sends the request to the
  other one: the client gets its answer;
* load is spread over both replicas, and requests of one ``X-Session-Id`` stay on one replica, whose
  prefix cache serves their shared prompt;
* ``index_builder update`` on the shared index directory under load reaches both replicas (``/info``
  shows the new version on each), and no request fails;
* SIGTERM to one replica under load: every request gets a complete answer or a clean error, none is
  lost, new requests go to the other replica; a non-streamed generation still running at the drain
  timeout ends with a 500 ``server_shutdown`` that nginx does not run again, a stream with its SSE
  error event.

Skipped, saying why, where nginx is not installed (``.ci/run`` installs Debian's).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from nginx_harness import NginxProcess, nginx_binary
from server_harness import RETRIEVING_PROMPT, ServerProcess, metric, scrape, wait_for

from server.demo import DEMO_CORPUS, corpus_text

pytestmark = pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (Debian: apt-get install "
                                "nginx; .ci/run installs it as root)")

POLL_S = 0.2
DRAIN_S = 1  # --drain-timeout-s of both replicas
SHORT = {"prompt": RETRIEVING_PROMPT, "max_tokens": 12, "retrieval": {"k": 1, "max_retrievals": 2}}
# Runs far past the drain timeout on any CPU (about 1000 tokens/s for this model on an idle core).
LONG = {"prompt": "Paris is", "max_tokens": 7900, "ignore_eos": True, "retrieval": {"enabled": False}}

# Loaded into replica A (PYTHONPATH): its engine starts loading only once the gate file exists, so the test
# can send it requests while it is still loading.
_LOAD_GATE = """
import os, time
from onegen_core.engine import Engine
_load = Engine.from_checkpoint.__func__
def _gated(cls, *args, **kwargs):
    while not os.path.exists(os.environ["ONEGEN_TEST_LOAD_GATE"]):
        time.sleep(0.05)
    return _load(cls, *args, **kwargs)
Engine.from_checkpoint = classmethod(_gated)
"""


# ---------------------------------------------------------------------------- the replicas and nginx
@dataclass
class Cluster:
    a: ServerProcess
    b: ServerProcess
    nginx: NginxProcess
    gate: Path
    checkpoint: Path
    index: Path
    corpus_dir: Path

    @property
    def names(self) -> dict[str, str]:
        host = socket.gethostname()
        return {"a": f"{host}:{self.a.port}", "b": f"{host}:{self.b.port}"}

    def open_gate(self) -> None:
        self.gate.touch()
        self.a.wait_ready()

    def both_serving(self, timeout: float = 30.0) -> None:
        """Replica A loaded, and nginx sending it requests again (it skips a replica for 5 s after a refusal)."""
        self.open_gate()
        seen: set[str] = set()

        def both() -> bool:
            seen.add(httpx.get(self.nginx.url + "/health/ready", timeout=10).headers.get("x-served-by", "?"))
            return set(self.names.values()) <= seen

        assert wait_for(both, timeout=timeout, interval=0.2), f"nginx sent /health/ready only to {seen}"

    def replica_of(self, session: str) -> str:
        """The replica nginx routes ``session`` to (a GET hashes like a POST)."""
        r = httpx.get(self.nginx.url + "/health/live", headers={"X-Session-Id": session}, timeout=10)
        return r.headers["x-served-by"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from index_builder import BuildConfig, build_index
    from onegen_core.random_checkpoint import build_tiny_checkpoint, make_query_token_likely

    root = tmp_path_factory.mktemp("replicas")
    ckpt = build_tiny_checkpoint(root / "ckpt", arch="llama", extra_text=corpus_text(DEMO_CORPUS), max_positions=8192)
    make_query_token_likely(ckpt, rank=0)
    corpus = _write_corpus(root / "corpus.jsonl", "m", DEMO_CORPUS)
    index = root / "shared" / "index"  # the read-only volume both replicas serve
    build_index(BuildConfig(checkpoint=ckpt, corpus=[corpus], out=index, device="cpu", dtype="float32",
                            progress=False, bm25=False))
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_LOAD_GATE)
    gate = root / "load-gate"
    args = ["--checkpoint", str(ckpt), "--index", str(index), "--index-poll-s", str(POLL_S),
            "--max-tokens-limit", "8000", "--max-num-seqs", "16", "--drain-timeout-s", str(DRAIN_S),
            "--log-format", "json"]
    logs = tmp_path_factory.mktemp("logs")
    b = ServerProcess(args, logs / "b.log")
    a = ServerProcess(args, logs / "a.log", env={
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "ONEGEN_TEST_LOAD_GATE": str(gate)})
    servers: list[Any] = [a, b]
    try:
        b.wait_ready()
        assert wait_for(lambda: _answers(a.url + "/health/live"), timeout=60), a.log_text()[-3000:]
        nginx = NginxProcess([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], root / "nginx")
        servers.append(nginx)
        yield Cluster(a, b, nginx, gate, ckpt, index, root)
    finally:
        gate.touch()
        for s in reversed(servers):
            s.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _write_corpus(path: Path, prefix: str, docs) -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "title": d.title, "text": d.text}) + "\n"
                            for i, d in enumerate(docs)))
    return path


# ---------------------------------------------------------------------------- requests and load
@dataclass
class Reply:
    """One request as the client saw it: ``outcome`` ok (a complete answer), clean (the documented error
    shape with a request id; a stream: its error event, then [DONE]) or lost (anything else)."""

    kind: str
    t0: float
    t1: float
    status: int | None
    served_by: str | None
    outcome: str
    detail: str = ""
    body: Any = None


def _clean_error(payload: Any, status: int | None) -> bool:
    err = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and err.get("code") == status


def call(client: httpx.Client, kind: str, headers: dict[str, str] | None = None,
         body: dict[str, Any] | None = None) -> Reply:
    """One request of ``kind``: generate, stream, retrieve or chat (through whatever ``client`` points at)."""
    t0 = time.monotonic()
    if kind == "retrieve":
        path, body = "/retrieve", body or {"queries": ["who wrote the book?"], "k": 2}
    elif kind == "chat":
        path, body = "/v1/chat/completions", body or {
            "messages": [{"role": "user", "content": RETRIEVING_PROMPT}], "max_tokens": 12}
    else:
        path, body = "/generate", {**(body or SHORT), "stream": kind == "stream"}
    try:
        if kind == "stream":
            with client.stream("POST", path, json=body, headers=headers) as r:
                lines = [ln for ln in r.iter_lines() if ln]
                return _stream_reply(kind, t0, r, lines)
        r = client.post(path, json=body, headers=headers)
    except httpx.HTTPError as e:
        return Reply(kind, t0, time.monotonic(), None, None, "lost", f"{type(e).__name__}: {e}")
    t1, served_by = time.monotonic(), r.headers.get("x-served-by")
    try:
        payload = r.json()
    except ValueError:
        return Reply(kind, t0, t1, r.status_code, served_by, "lost", f"not JSON: {r.text[:200]}")
    if r.status_code == 200 and ("text" in payload or "results" in payload or "choices" in payload):
        return Reply(kind, t0, t1, 200, served_by, "ok", body=payload)
    outcome = "clean" if _clean_error(payload, r.status_code) and r.headers.get("x-request-id") else "lost"
    return Reply(kind, t0, t1, r.status_code, served_by, outcome, json.dumps(payload)[:300], payload)


def _stream_reply(kind: str, t0: float, r: httpx.Response, lines: list[str]) -> Reply:
    t1, served_by = time.monotonic(), r.headers.get("x-served-by")
    if r.status_code != 200:
        payload = json.loads("\n".join(lines)) if lines else None
        outcome = "clean" if _clean_error(payload, r.status_code) else "lost"
        return Reply(kind, t0, t1, r.status_code, served_by, outcome, str(payload)[:300], payload)
    events = [ln[len("data: "):] for ln in lines]
    if not events or events[-1] != "[DONE]":
        return Reply(kind, t0, t1, 200, served_by, "lost", f"stream cut after {len(events)} events")
    last = json.loads(events[-2]) if len(events) > 1 else {}
    if last.get("type") == "final":
        return Reply(kind, t0, t1, 200, served_by, "ok", body=last)
    if last.get("type") == "error" and _clean_error(last, last.get("error", {}).get("code")):
        return Reply(kind, t0, t1, 200, served_by, "clean", json.dumps(last)[:300], last)
    return Reply(kind, t0, t1, 200, served_by, "lost", f"stream ended with {events[-2][:200]}")


@dataclass
class Load:
    """``clients`` threads sending requests through nginx, one after another, until ``stop``; kinds in turn."""

    url: str
    clients: int = 4
    kinds: tuple[str, ...] = ("generate", "stream", "retrieve", "chat")
    replies: list[Reply] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        self._lock = threading.Lock()

    def _run(self, i: int) -> None:
        kinds = itertools.islice(itertools.cycle(self.kinds), i, None)
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self._stop.is_set():
                reply = call(client, next(kinds))
                with self._lock:
                    self.replies.append(reply)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)
        assert not any(t.is_alive() for t in self._threads), "a client is still waiting for its answer"

    def wait_replies(self, n: int, timeout: float = 60.0) -> None:
        assert wait_for(lambda: len(self.replies) >= n, timeout=timeout), f"{len(self.replies)} replies"


def _summary(replies: list[Reply]) -> str:
    return "; ".join(f"{r.kind} {r.status} {r.outcome} via {r.served_by}: {r.detail}"
                     for r in replies if r.outcome != "ok")[:3000]


# ---------------------------------------------------------------------------- the tests
def test_a_loading_replica_refuses_before_any_work_and_nginx_sends_the_request_on(cluster):
    r = httpx.post(cluster.a.url + "/generate", json=SHORT, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["type"] == "service_unavailable" and "loading" in r.json()["error"]["message"]
    replies, sent = [], set()

    def retried_ones() -> list[dict[str, str]]:  # nginx may log a request just after its client has the answer
        return [x for x in cluster.nginx.access_records() if x["request_id"] in sent
                and x["upstream_status"].startswith("503")]

    with httpx.Client(base_url=cluster.nginx.url, timeout=60) as c:
        for i in range(40):  # a new session each: the first that hashes to A finds it loading
            sent.add(f"while-loading-{i}")
            replies.append(call(c, "generate", {"X-Session-Id": f"s{i}", "X-Request-Id": f"while-loading-{i}"}))
            if retried := retried_ones():
                break
    deadline = time.monotonic() + 5
    while not retried and time.monotonic() < deadline:
        time.sleep(0.1)
        retried = retried_ones()
    assert retried, "no request was sent to the loading replica"
    assert all(x.outcome == "ok" and x.served_by == cluster.names["b"] for x in replies), _summary(replies)
    [rec] = retried  # nginx: A refused it (503), B answered it (200), one request for the client
    rid = rec["request_id"]
    assert rec["upstream_status"] == "503, 200" and rec["status"] == "200", rec
    assert rec["upstream_addr"] == f"127.0.0.1:{cluster.a.port}, 127.0.0.1:{cluster.b.port}", rec
    a_lines = cluster.a.wait_for_log(lambda x: x.get("request_id") == rid and x.get("status") == 503)
    assert a_lines and a_lines[0]["path"] == "/generate"
    cluster.gate.touch()  # let A load now, while the next test starts


def test_load_is_spread_over_both_replicas(cluster):
    cluster.both_serving()
    with Load(cluster.nginx.url, clients=4, kinds=("generate", "stream")) as load:
        load.wait_replies(40)
    replies = load.replies
    assert all(r.outcome == "ok" for r in replies), _summary(replies)
    counts = {k: sum(r.served_by == name for r in replies) for k, name in cluster.names.items()}
    assert sum(counts.values()) == len(replies) and min(counts.values()) >= len(replies) * 0.15, counts


def test_one_session_stays_on_one_replica_and_reuses_its_prefix_cache(cluster):
    cluster.both_serving()
    sessions = [f"conversation-{i}" for i in range(12)]
    served: dict[str, list[str | None]] = {s: [] for s in sessions}
    cached: dict[str, list[int]] = {s: [] for s in sessions}

    def converse(session: str) -> None:
        intro = f"Conversation {session}: " + " ".join(d.text for d in DEMO_CORPUS[:3])  # some 16-token blocks
        with httpx.Client(base_url=cluster.nginx.url, timeout=60, headers={"X-Session-Id": session}) as c:
            for turn in range(3):
                body = {"prompt": f"{intro} Turn {turn}.", "max_tokens": 4, "retrieval": {"enabled": False}}
                r = call(c, "generate", body=body)
                assert r.outcome == "ok", r
                served[session].append(r.served_by)
                cached[session].append(r.body["usage"]["cached_tokens"])

    threads = [threading.Thread(target=converse, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(len(set(v)) == 1 and len(v) == 3 for v in served.values()), served
    assert {v[0] for v in served.values()} == set(cluster.names.values()), "the sessions all hashed to one replica"
    assert all(c[1] > 0 and c[2] > 0 for c in cached.values()), cached  # turns 2-3: the intro's blocks
    for s in sessions[:3]:  # the hash, asked again, still names the same replica
        assert cluster.replica_of(s) == served[s][0]


def test_an_index_update_under_load_reaches_both_replicas_with_no_failed_request(cluster):
    from index_builder.update import UpdateConfig, update_index

    cluster.both_serving()
    infos = {k: httpx.get(s.url + "/info", timeout=30).json()["indexes"][0] for k, s in
             (("a", cluster.a), ("b", cluster.b))}
    assert {i["version"] for i in infos.values()} == {None}  # a plain directory, as built
    changes = _write_corpus(cluster.corpus_dir / "changes.jsonl", "n", DEMO_CORPUS[:4])
    deletes = cluster.corpus_dir / "deletes.txt"
    deletes.write_text("".join(f"m{i}\n" for i in range(len(DEMO_CORPUS))))
    with Load(cluster.nginx.url, clients=4) as load:
        load.wait_replies(8)
        result = update_index(UpdateConfig(index=cluster.index, checkpoint=cluster.checkpoint, corpus=[changes],
                                           delete=deletes, device="cpu", bm25=False, progress=False))
        assert result.version == 2

        def version(srv: ServerProcess) -> int | None:
            return httpx.get(srv.url + "/info", timeout=30).json()["indexes"][0]["version"]

        assert wait_for(lambda: version(cluster.a) == 2 and version(cluster.b) == 2, timeout=30, interval=POLL_S)
        n = len(load.replies)
        load.wait_replies(n + 8)  # more requests on the new version
    replies = load.replies
    assert replies and all(r.outcome == "ok" for r in replies), _summary(replies)
    for srv in (cluster.a, cluster.b):  # each replica now searches only the new documents
        r = httpx.post(srv.url + "/retrieve", json={"queries": ["who wrote the book?", "Zorblat"], "k": 4}, timeout=30)
        ids = {h["doc_id"] for q in r.json()["results"] for h in q["hits"]}
        assert ids and all(i.startswith("n") for i in ids), ids


def test_sigterm_to_one_replica_under_load_loses_no_request(cluster):
    cluster.both_serving()
    a, b = cluster.names["a"], cluster.names["b"]
    on_a = next(s for s in (f"pin-{i}" for i in range(200)) if cluster.replica_of(s) == a)
    long_replies: dict[str, Reply] = {}

    def long_request(kind: str) -> None:
        with httpx.Client(base_url=cluster.nginx.url, timeout=120) as c:
            long_replies[kind] = call(c, kind, {"X-Session-Id": on_a, "X-Request-Id": f"long-{kind}"}, LONG)

    longs = [threading.Thread(target=long_request, args=(k,)) for k in ("generate", "stream")]
    for t in longs:
        t.start()
    assert wait_for(lambda: _in_flight(cluster.a) == 2, timeout=30)  # both long ones running on A
    with Load(cluster.nginx.url, clients=4) as load:
        load.wait_replies(8)
        t_sig = time.monotonic()
        cluster.a.proc.send_signal(signal.SIGTERM)
        assert cluster.a.proc.wait(60) in (-signal.SIGTERM, 0)
        n = len(load.replies)
        load.wait_replies(n + 12)  # the replica is gone: these went to the other one
    for t in longs:
        t.join(60)
    replies = load.replies
    assert all(r.outcome in ("ok", "clean") for r in replies), _summary(replies)
    late = [r for r in replies if r.t0 > t_sig + 0.5]
    assert len(late) >= 12 and all(r.outcome == "ok" and r.served_by == b for r in late), _summary(late)
    cut = [r for r in replies if r.outcome == "clean"]  # short ones the drain timeout caught on A, if any
    assert all(r.served_by == a and r.body["error"]["type"] == "server_shutdown" for r in cut), _summary(cut)

    # the long non-streamed generation: admitted on A, cut at its drain timeout, a 500 nginx does not retry
    plain = long_replies["generate"]
    assert plain.outcome == "clean" and plain.status == 500 and plain.served_by == a, plain
    assert plain.body["error"]["type"] == "server_shutdown" and "drain timeout" in plain.body["error"]["message"]
    [rec] = [x for x in cluster.nginx.access_records() if x["request_id"] == "long-generate"]
    assert rec["upstream_addr"] == f"127.0.0.1:{cluster.a.port}" and rec["upstream_status"] == "500", rec
    assert not [x for x in cluster.b.log_records() if x.get("request_id") == "long-generate"]
    stream = long_replies["stream"]  # a started stream: its error event, then [DONE]
    assert stream.outcome == "clean" and stream.body["error"]["code"] == 500, stream

    log = cluster.a.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    with httpx.Client(base_url=cluster.nginx.url, timeout=60) as c:  # A's sessions now live on B
        r = call(c, "generate", {"X-Session-Id": on_a})
    assert r.outcome == "ok" and r.served_by == b


def _in_flight(srv: ServerProcess) -> float:
    with srv.client() as c:
        return metric(scrape(c), "onegen_http_requests_in_flight")
