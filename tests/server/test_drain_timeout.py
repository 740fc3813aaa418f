"""SIGTERM with requests that outlast ``--drain-timeout-s``: each ends with its documented error, nothing crashes.

A stream must end with an SSE ``error`` event (503) and then ``data: [DONE]``; a plain request
gets a JSON 503 with its X-Request-Id; the log has no traceback (uvicorn's own cancellation
used to cut streams mid-body, answer plain requests with a bare text/plain 500 and log
"Exception in ASGI application").
"""

from __future__ import annotations

import signal
import threading

import httpx
import pytest
from server_harness import ServerProcess, metric, scrape, sse_events, wait_for

# Requests that cannot finish on their own while the test looks at them (8000 tokens, EOS ignored).
LONG = {"prompt": "Paris is", "max_tokens": 8000, "ignore_eos": True}
DRAIN_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def long_context_checkpoint(tiny_checkpoint_factory):
    """The tiny 8k-context model of test_operations (same key: built once per session)."""
    return tiny_checkpoint_factory("llama", key="server-long-context", hidden=128, layers=4, max_positions=8192)


def test_drain_timeout_ends_streams_and_plain_requests_with_their_errors(long_context_checkpoint, tmp_path):
    srv = ServerProcess(["--checkpoint", str(long_context_checkpoint), "--drain-timeout-s", str(DRAIN_TIMEOUT_S),
                         "--max-tokens-limit", "8000", "--log-format", "json"], tmp_path / "drain.log")
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
                rest = list(events)  # runs past the drain timeout, then ends cleanly
        thread.join(60)

        assert rest[-1] == "[DONE]", rest[-3:]
        error = rest[-2]
        assert error["type"] == "error", error
        assert error["error"]["code"] == 503 and error["error"]["type"] == "service_unavailable"
        assert f"drain timeout of {DRAIN_TIMEOUT_S} s expired" in error["error"]["message"]
        assert all(e["type"] == "token" for e in rest[:-2])

        [resp] = plain
        assert isinstance(resp, httpx.Response), resp
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"].startswith("application/json") and resp.headers.get("x-request-id")
        body = resp.json()["error"]
        assert body["type"] == "service_unavailable" and "drain timeout" in body["message"]

        assert srv.proc.wait(60) == -signal.SIGTERM
        log = srv.log_text()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]
        assert "timeout graceful shutdown exceeded" not in log
        [expired] = srv.wait_for_log(lambda x: "drain timeout expired" in x.get("msg", ""))
        assert expired["in_flight"] == 2
        assert "engine stopped" in log
    finally:
        srv.stop()
