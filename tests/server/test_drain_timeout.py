"""SIGTERM with requests that outlast ``--drain-timeout-s``: each ends with its documented error, nothing crashes.

A stream must end with an SSE ``error`` event (500, ``server_shutdown``) and then ``data: [DONE]``; a
plain request gets a JSON 500 ``server_shutdown`` with its X-Request-Id, not a 503: a 503 means "refused
before any work" and nginx runs such a request again on another replica, which would do this one's work
twice (issue #22); the log has no traceback (uvicorn's own cancellation used to cut streams mid-body,
answer plain requests with a bare text/plain 500 and log "Exception in ASGI application").
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from server_harness import ServerProcess, metric, scrape, sse_events, wait_for

from server.metrics import Metrics
from server.settings import ServerSettings
from server.state import DRAIN_FINISH_S, ServerState

# Requests that cannot finish on their own while the test looks at them (8000 tokens, EOS ignored).
LONG = {"prompt": "Paris is", "max_tokens": 8000, "ignore_eos": True}
DRAIN_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def long_context_checkpoint(tiny_checkpoint_factory):
    """The tiny 8k-context model of test_operations (same key: built once per session)."""
    return tiny_checkpoint_factory("llama", key="server-long-context", hidden=128, layers=4, max_positions=8192)


def _drain_past_the_timeout(checkpoint: Path, tmp_path: Path, env: dict[str, str] | None = None,
                            on_signal: Callable[[], None] = lambda: None) -> None:
    """A stream and a plain request in flight, SIGTERM, then ``on_signal``; both must end with their 500s."""
    srv = ServerProcess(["--checkpoint", str(checkpoint), "--drain-timeout-s", str(DRAIN_TIMEOUT_S),
                         "--max-tokens-limit", "8000", "--log-format", "json"], tmp_path / "drain.log", env=env)
    plain: list[httpx.Response | BaseException] = []

    def post_plain() -> None:
        try:
            plain.append(httpx.post(srv.url + "/generate", json=LONG, timeout=120))
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            plain.append(e)

    try:
        srv.wait_ready()
        thread = threading.Thread(target=post_plain, daemon=True)
        with srv.client() as c:
            thread.start()
            assert wait_for(lambda: metric(scrape(c), "onegen_num_requests_running") == 1, timeout=30)
            with c.stream("POST", "/generate", json={**LONG, "stream": True}) as r:
                assert r.status_code == 200
                events = sse_events(r.iter_lines())
                first = next(events)
                assert isinstance(first, dict) and first["type"] == "token", first
                assert metric(scrape(c), "onegen_num_requests_running") == 2
                srv.proc.send_signal(signal.SIGTERM)
                on_signal()
                rest = list(events)  # runs past the drain timeout, then ends cleanly
        thread.join(60)

        assert rest[-1] == "[DONE]", rest[-3:]
        error = rest[-2]
        assert error["type"] == "error", error
        assert error["error"]["code"] == 500 and error["error"]["type"] == "server_shutdown"
        assert f"drain timeout of {DRAIN_TIMEOUT_S} s expired" in error["error"]["message"]
        assert all(e["type"] == "token" for e in rest[:-2])

        [resp] = plain
        assert isinstance(resp, httpx.Response), resp
        assert resp.status_code == 500, resp.text
        assert resp.headers["content-type"].startswith("application/json") and resp.headers.get("x-request-id")
        body = resp.json()["error"]
        assert body["type"] == "server_shutdown" and "drain timeout" in body["message"]

        assert srv.proc.wait(60) == -signal.SIGTERM
        log = srv.log_text()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]
        assert "timeout graceful shutdown exceeded" not in log
        [expired] = srv.wait_for_log(lambda x: "drain timeout expired" in x.get("msg", ""))
        assert expired["in_flight"] == 2
        assert "engine stopped" in log
    finally:
        srv.stop()


def test_drain_timeout_ends_streams_and_plain_requests_with_their_errors(long_context_checkpoint, tmp_path):
    _drain_past_the_timeout(long_context_checkpoint, tmp_path)


# Loaded into the server process (PYTHONPATH): the first engine step once the flag file exists lasts SLOW_STEP_S.
_SLOW_STEP = """
import os, time
from onegen_core.engine import Engine
_step = Engine.step
def step(self):
    flag = os.environ["ONEGEN_TEST_SLOW_STEP_FLAG"]
    if os.path.exists(flag):
        os.remove(flag)
        time.sleep(float(os.environ["ONEGEN_TEST_SLOW_STEP_S"]))
    return _step(self)
Engine.step = step
"""


def test_drain_waits_for_an_engine_step_longer_than_the_finish_grace(long_context_checkpoint, tmp_path):
    """The drain timeout expires during one engine step that outlasts it by more than DRAIN_FINISH_S:
    the abort takes effect after that step, and the requests still end with their 500s (with a fixed
    grace, uvicorn cancelled them first: a cut stream and a bare 500)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW_STEP)
    flag = tmp_path / "slow-step"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "ONEGEN_TEST_SLOW_STEP_FLAG": str(flag), "ONEGEN_TEST_SLOW_STEP_S": str(DRAIN_FINISH_S + 4)}
    _drain_past_the_timeout(long_context_checkpoint, tmp_path, env=env, on_signal=flag.touch)
    assert not flag.exists()  # the slow step ran


class _Worker:
    """What ``shutdown_overdue`` reads of the engine worker."""

    def __init__(self, *, progressing: bool, aborted_s_ago: float | None = None):
        self.progressing = progressing
        self.state = "ready"
        self.aborted_all_at = None if aborted_s_ago is None else time.monotonic() - aborted_s_ago

    def making_progress(self) -> bool:
        return self.progressing


def test_shutdown_waits_on_the_engine_not_on_a_clock(tmp_path):
    def overdue(worker: _Worker, waiting_s: float) -> str | None:
        settings = ServerSettings(checkpoint=tmp_path, drain_timeout_s=DRAIN_TIMEOUT_S)
        return ServerState(settings, worker, Metrics("test"), "m").shutdown_overdue(waiting_s)

    # a step under way, however long: the shutdown waits for the abort it ends with
    assert overdue(_Worker(progressing=True), waiting_s=1000) is None
    # the abort ran: the responses have DRAIN_FINISH_S to go out
    assert overdue(_Worker(progressing=True, aborted_s_ago=DRAIN_FINISH_S - 1), waiting_s=1000) is None
    late = overdue(_Worker(progressing=True, aborted_s_ago=DRAIN_FINISH_S + 1), waiting_s=1000)
    assert late is not None and "after the engine aborted" in late
    # a stalled (or failed) engine never runs the abort: the clock bounds the wait
    assert overdue(_Worker(progressing=False), waiting_s=DRAIN_TIMEOUT_S + DRAIN_FINISH_S - 1) is None
    stalled = overdue(_Worker(progressing=False), waiting_s=DRAIN_TIMEOUT_S + DRAIN_FINISH_S + 1)
    assert stalled is not None and "no progress" in stalled
