"""Operations: overload (429), disconnects free their sequence, SIGTERM drains, load failures, readiness.

A second real server with room for only 2 requests in flight serves the overload and
disconnect tests; another one is drained with SIGTERM. Loading and stall detection
are checked in-process (the app factory takes an engine factory) with the real
engine behind a gate that the test opens.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_harness import REPO, ServerProcess, free_port, metric, scrape, sse_events, wait_for

from server import ServerSettings, create_app

# Requests that cannot finish on their own while a test looks at them (8000 tokens, EOS ignored).
LONG = {"prompt": "Paris is", "max_tokens": 8000, "ignore_eos": True}


@pytest.fixture(scope="module")
def long_context_checkpoint(tiny_checkpoint_factory):
    """A tiny model with an 8k context, so that LONG requests run for seconds even on a fast, idle machine."""
    return tiny_checkpoint_factory("llama", key="server-long-context", hidden=128, layers=4, max_positions=8192)


@pytest.fixture(scope="module")
def small_server(long_context_checkpoint, tmp_path_factory):
    with ServerProcess(
        ["--checkpoint", str(long_context_checkpoint), "--max-pending-requests", "2", "--max-num-seqs", "4",
         "--max-tokens-limit", "8000", "--retry-after-s", "3", "--no-metrics-auth"],
        tmp_path_factory.mktemp("logs") / "small.log", api_key="k2",
    ) as srv:
        yield srv


def _first_token(lines) -> None:
    for e in sse_events(lines):
        if isinstance(e, dict) and e["type"] == "token":
            return
    raise AssertionError("stream ended before a token")


def test_overload_429_and_disconnect_frees_the_sequence(small_server):
    with small_server.client() as c:
        metrics = httpx.Client(base_url=small_server.url, timeout=30)  # --no-metrics-auth: no key needed
        before = scrape(metrics)
        streams = [c.stream("POST", "/generate", json={**LONG, "stream": True}) for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        # keep the line iterators referenced: a collected one closes its connection (a disconnect)
        lines = [r.iter_lines() for r in responses]
        try:
            for r, it in zip(responses, lines, strict=True):
                assert r.status_code == 200
                _first_token(it)
            busy = scrape(metrics)
            assert metric(busy, "onegen_num_requests_running") == 2
            assert metric(busy, "onegen_kv_cache_usage_perc") > 0
            assert metric(busy, "onegen_http_requests_in_flight") == 2
            r = c.post("/generate", json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "3" and r.json()["error"]["type"] == "overloaded"
            assert metric(scrape(metrics), "onegen_requests_rejected_total", reason="overloaded") == \
                metric(before, "onegen_requests_rejected_total", reason="overloaded") + 1
        finally:
            for s in streams:  # the clients go away mid-stream
                s.__exit__(None, None, None)

        def freed() -> bool:
            m = scrape(metrics)
            return (metric(m, "onegen_num_requests_running") == 0 and metric(m, "onegen_kv_cache_usage_perc") == 0
                    and metric(m, "onegen_http_requests_in_flight") == 0
                    and metric(m, "onegen_request_success_total", finished_reason="abort")
                    == metric(before, "onegen_request_success_total", finished_reason="abort") + 2)

        assert wait_for(freed, timeout=20), scrape(metrics)
        assert c.post("/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 200

        # a non-streaming client that gives up is aborted too
        aborted = metric(scrape(metrics), "onegen_request_success_total", finished_reason="abort")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(small_server.url + "/generate", json=LONG, headers=small_server.headers,
                       timeout=httpx.Timeout(30, read=0.5))
        assert wait_for(lambda: metric(scrape(metrics), "onegen_request_success_total", finished_reason="abort")
                        == aborted + 1 and metric(scrape(metrics), "onegen_num_requests_running") == 0, timeout=20)
        metrics.close()


def test_sigterm_drains_in_flight_requests(long_context_checkpoint, tmp_path):
    srv = ServerProcess(["--checkpoint", str(long_context_checkpoint), "--drain-timeout-s", "120",
                         "--log-format", "json"], tmp_path / "drain.log")
    try:
        srv.wait_ready()
        with srv.client() as c, c.stream("POST", "/generate", json={**LONG, "max_tokens": 300,
                                                                     "stream": True}) as r:
            lines = r.iter_lines()
            _first_token(lines)
            srv.proc.send_signal(signal.SIGTERM)
            rest = list(sse_events(lines))  # the stream goes on to its end
        assert rest[-1] == "[DONE]"
        final = rest[-2]
        assert final["type"] == "final" and final["finish_reason"] == "length"
        assert final["usage"]["completion_tokens"] == 300
        [signal_line] = srv.wait_for_log(lambda x: "shutdown signal" in x.get("msg", ""))
        assert signal_line["in_flight"] == 1  # the request was still running when the signal came
        # uvicorn re-raises the signal once shut down, so the exit reads as "terminated by SIGTERM" (143)
        assert srv.proc.wait(60) == -signal.SIGTERM
        assert "engine stopped" in srv.log_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.url + "/health/live", timeout=5)
    finally:
        srv.stop()


def _run_server(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "--port", str(free_port()), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_load_failures_exit_with_the_reason(tmp_path, demo_assets, tiny_checkpoint):
    missing = _run_server(["--checkpoint", str(tmp_path / "missing")])
    # a path that does not exist is refused before the port is bound, as a usage error (test_startup_errors)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    _, demo_index = demo_assets
    mismatch = _run_server(["--checkpoint", str(tiny_checkpoint), "--index", str(demo_index)])
    assert mismatch.returncode == 1
    assert "fingerprint" in mismatch.stderr and "rebuild the index" in mismatch.stderr


def test_bad_flags_exit_2_naming_the_flag():
    r = _run_server(["--checkpoint", "x", "--max-num-seqs", "0"])
    assert r.returncode == 2 and "--max-num-seqs" in r.stderr


# ---------------------------------------------------------------------------- in-process: readiness
class _GatedEngine:
    """The real engine, whose steps wait for a gate (a stalled engine loop, on demand)."""

    def __init__(self, engine, gate: threading.Event):
        self._engine = engine
        self._gate = gate

    def step(self):
        assert self._gate.wait(30), "gate never opened"
        return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


async def _with_app(app, fn):
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as ac:
            return await asyncio.wait_for(fn(ac), 120)


def test_ready_503_while_loading_then_200(demo_assets):
    from onegen_core.engine import Engine

    ckpt, index = demo_assets
    gate = threading.Event()

    def factory():
        assert gate.wait(30)
        return Engine.from_checkpoint(ckpt, index)

    app = create_app(ServerSettings(checkpoint=ckpt, index=index), engine_factory=factory)

    async def refused_before_any_work(ac: httpx.AsyncClient, why: str) -> None:
        """Every working route answers 503 + Retry-After, which nginx retries on another replica (issue #22)."""
        for path, body in (("/generate", {"prompt": "x", "max_tokens": 2}), ("/retrieve", {"queries": "x"}),
                           ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})):
            r = await ac.post(path, json=body)
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", (path, r.text)
            assert why in r.json()["error"]["message"] and r.headers["retry-after"] == "1", (path, r.headers)

    async def check(ac: httpx.AsyncClient) -> None:
        r = await ac.get("/health/ready")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert (await ac.get("/health/live")).status_code == 200
        await refused_before_any_work(ac, "loading")
        assert (await ac.get("/info")).json()["state"] == "loading"
        gate.set()
        for _ in range(300):
            if (await ac.get("/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        r = await ac.post("/generate", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        app.state.onegen.draining = True  # what the SIGTERM handler of `python -m server` sets
        r = await ac.get("/health/ready")
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        await refused_before_any_work(ac, "shutting down")

    asyncio.run(_with_app(app, check))


def test_ready_503_when_the_engine_loop_stalls(demo_assets):
    from onegen_core.engine import Engine

    ckpt, index = demo_assets
    gate = threading.Event()
    app = create_app(ServerSettings(checkpoint=ckpt, index=index, stall_timeout_s=0.5),
                     engine_factory=lambda: _GatedEngine(Engine.from_checkpoint(ckpt, index), gate))

    async def check(ac: httpx.AsyncClient) -> None:
        for _ in range(300):
            if (await ac.get("/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        pending = asyncio.ensure_future(ac.post("/generate", json={"prompt": "x", "max_tokens": 3}))
        await asyncio.sleep(1.5)  # the step is stuck behind the gate
        r = await ac.get("/health/ready")
        assert r.status_code == 503 and "no progress" in r.json()["error"]["message"]
        assert (await ac.get("/health/live")).status_code == 200  # stalled is not dead
        gate.set()
        assert (await pending).status_code == 200
        t0 = time.monotonic()
        while (await ac.get("/health/ready")).status_code != 200:
            assert time.monotonic() - t0 < 10
            await asyncio.sleep(0.05)

    asyncio.run(_with_app(app, check))


def test_engine_that_fails_to_load(tmp_path):
    fatal: list[BaseException] = []
    app = create_app(ServerSettings(checkpoint=tmp_path), engine_factory=lambda: (_ for _ in ()).throw(
        ValueError("broken checkpoint: config.json missing")), on_fatal=fatal.append)

    async def check(ac: httpx.AsyncClient) -> None:
        for _ in range(100):
            if app.state.onegen.worker.state == "failed":
                break
            await asyncio.sleep(0.05)
        live = await ac.get("/health/live")
        assert live.status_code == 503 and "config.json missing" in live.json()["error"]["message"]
        assert (await ac.get("/health/ready")).status_code == 503
        await asyncio.sleep(0.05)
        assert fatal and "config.json missing" in str(fatal[0])

    asyncio.run(_with_app(app, check))
