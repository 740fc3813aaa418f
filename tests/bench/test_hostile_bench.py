"""bench/hostile_outcomes.py: how bench/hostile.py classifies a request (ok / clean / 5xx / hung / lost), on synthetic
outcomes, and the p99 and table built from them. No server, no network."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import hostile_outcomes as ho  # noqa: E402

RID = {"x-request-id": "abc123"}
JSON = {"content-type": "application/json"}
SSE = {"content-type": "text/event-stream; charset=utf-8"}


def err(status: int, type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": "why", "type": type_, "param": None, "code": status}}).encode()


def out(status: int | None, body: bytes = b"", headers: dict | None = None, **kw) -> ho.Outcome:
    return ho.Outcome(label="t", status=status, body=body, headers={**JSON, **RID, **(headers or {})}, **kw)


def sse(events: list, headers: dict | None = None, kind: str = "sse", **kw) -> ho.Outcome:
    return ho.Outcome(label="s", kind=kind, status=200, events=events, headers={**SSE, **RID, **(headers or {})}, **kw)


TOKEN = {"type": "token", "text": "a", "token_ids": [1]}
FINAL = {"type": "final", "text": "a", "finish_reason": "length", "usage": {}, "retrievals": []}


def sse_error(code: int, type_: str = "service_unavailable") -> dict:
    return {"type": "error", "error": {"message": "aborted", "type": type_, "code": code}}


@pytest.mark.parametrize(("outcome", "category"), [
    # plain JSON answers
    (out(200, b'{"text": "x"}'), "ok"),
    (out(200, b"not json"), "other"),
    (out(200, err(200)), "other"),  # a 2xx carrying an error object is not a complete answer
    (out(401, err(401, "authentication_error")), "clean"),
    (out(413, err(413)), "clean"),
    (out(422, err(422)), "clean"),
    (out(429, err(429)), "clean"),
    (out(422, err(422), headers={"x-request-id": ""}), "other"),  # no request id
    (out(422, b'{"detail": "bad"}'), "other"),  # FastAPI's own shape, not the documented one
    (out(422, err(400)), "other"),  # code does not match the status
    (out(503, err(503, "service_unavailable")), "clean"),
    (out(503, b"Service Unavailable", headers={"content-type": "text/plain"}), "5xx"),  # a bare 503
    (out(503, err(503), headers={"x-request-id": ""}), "5xx"),
    (out(500, err(500, "internal_error")), "5xx"),  # documented shape, still a 5xx
    (out(500, err(500, "server_shutdown")), "clean"),  # admitted, then aborted at the drain timeout
    (out(500, err(500, "server_shutdown"), headers={"x-request-id": ""}), "5xx"),
    (out(502, b""), "5xx"),
    (out(302, b""), "other"),
    # the transport
    (out(None, transport_error="timeout"), "hung"),
    (out(200, transport_error="timeout", events=[TOKEN]), "hung"),
    (out(None, transport_error="refused"), "refused"),
    (out(None, transport_error="reset"), "lost"),
    (out(None), "lost"),
    (out(200, b'{"te', transport_error="reset"), "lost"),  # body cut short
    (out(500, transport_error="reset"), "5xx"),  # the server failed before it went away
    # native SSE
    (sse([TOKEN, TOKEN, FINAL, "[DONE]"]), "ok"),
    (sse([TOKEN, sse_error(503), "[DONE]"]), "clean"),
    (sse([TOKEN, sse_error(500), "[DONE]"]), "5xx"),
    (sse([TOKEN, sse_error(500, "server_shutdown"), "[DONE]"]), "clean"),
    (sse([TOKEN, sse_error(503), "[DONE]"], headers={"x-request-id": ""}), "other"),
    (sse([TOKEN, TOKEN]), "lost"),  # cut without [DONE]
    (sse([TOKEN, sse_error(503)]), "lost"),  # an error event but no [DONE]
    (sse([]), "lost"),
    (sse([TOKEN, "[DONE]"]), "other"),  # [DONE] without a final event
    (sse([TOKEN, FINAL, "[DONE]"], headers={"content-type": "application/json"}), "other"),
    (sse([TOKEN, FINAL], transport_error="reset"), "lost"),
    # OpenAI SSE: a finish_reason, then maybe a usage chunk; errors are bare error objects
    (sse([{"choices": [{"text": "a", "finish_reason": None}]}, {"choices": [{"text": "", "finish_reason": "length"}]},
          {"choices": [], "usage": {}}, "[DONE]"], kind="oai_sse"), "ok"),
    (sse([{"choices": [{"text": "a", "finish_reason": None}]}, {"error": sse_error(503)["error"]},
          {"choices": [], "usage": {}}, "[DONE]"], kind="oai_sse"), "clean"),
    (sse([{"choices": [{"text": "a", "finish_reason": None}]}, "[DONE]"], kind="oai_sse"), "other"),
    (sse([{"choices": [{"text": "a", "finish_reason": None}]}], kind="oai_sse"), "lost"),
    # raw (HTML docs): any complete 2xx
    (ho.Outcome(label="d", kind="raw", status=200, body=b"<html>", headers=RID), "ok"),
])
def test_classify(outcome, category):
    got, why = ho.classify(outcome)
    assert got == category, (got, why)
    assert got in ho.CATEGORIES and why


def test_effective_status_of_a_stream_is_its_error_code():
    assert ho.effective_status(sse([TOKEN, sse_error(503), "[DONE]"])) == 503
    assert ho.effective_status(sse([TOKEN, FINAL, "[DONE]"])) == 200
    assert ho.effective_status(out(401, err(401))) == 401


def test_percentile_is_nearest_rank():
    assert ho.percentile(range(1, 101), 99) == 99
    assert ho.percentile(range(1, 101), 50) == 50
    assert ho.percentile([5.0, 1.0, 3.0], 99) == 5.0  # fewer than 100 values: the largest
    assert ho.percentile([0.2] * 99 + [9.0], 99) == 0.2  # one outlier in 100 stays out of the p99
    assert ho.percentile([0.2] * 98 + [9.0, 9.0], 99) == 9.0
    assert math.isnan(ho.percentile([], 99))


def test_gaps_exclude_time_to_first_token_and_can_be_restricted():
    o = sse([], t_send=0.0, token_times=[5.0, 5.1, 5.3, 6.3])
    assert o.ttft == 5.0
    assert ho.token_gaps(o.token_times) == pytest.approx([0.1, 0.2, 1.0])
    busy = ho.in_any([(5.2, 5.5)])
    assert ho.gaps_within([o.token_times, [5.25, 5.45]], busy) == pytest.approx([0.2, 0.2])
    assert ho.token_gaps([1.0]) == []


def test_row_counts_unexpected_and_table():
    rows = [
        ho.Row("auth", ho.Expect.of("clean", clean=[401]),
               [out(401, err(401)), out(413, err(413)), out(None, transport_error="reset"), out(200, b"{}")]),
        ho.Row("stream", ho.Expect.of("ok"), [sse([TOKEN, FINAL, "[DONE]"], token_times=[1.0, 1.5, 1.6])],
               gaps=[0.5, 0.1]),
        ho.Row("drain", ho.Expect.of("ok", "clean", "refused", clean=[503]),
               [sse([TOKEN, sse_error(503), "[DONE]"]), out(None, transport_error="refused"), out(503, err(503))]),
    ]
    auth, stream, drain = rows
    assert auth.counts() == {"ok": 1, "clean": 2, "5xx": 0, "hung": 0, "lost": 1, "refused": 0, "other": 0}
    # the 413 is a clean error but not the 401 the scenario needs; the 200 and the reset are not allowed at all
    assert sorted(o.status or 0 for o, _, _ in auth.unexpected()) == [0, 200, 413]
    assert stream.p99_gap() == 0.5 and not stream.unexpected()
    assert auth.p99_gap() is None
    assert not drain.unexpected()
    table = ho.markdown_table(rows).splitlines()
    assert table[0].startswith("| scenario | requests | ok | clean errors | 5xx | hung | lost |")
    assert "p99 inter-token gap" in table[0]
    assert table[2].startswith("| auth | 4 | 1 | 2 | 0 | 0 | 1 | 3 | — |")
    assert table[3].startswith("| stream | 1 | 1 | 0 | 0 | 0 | 0 | 0 | 500 ms |")
    assert "1 refused" in table[4]
    summary = auth.summary()
    assert summary["requests"] == 4 and summary["unexpected"] == 3 and summary["lost"] == 1


def test_parse_http_response():
    o = ho.Outcome(label="r")
    body = err(401, "authentication_error")
    raw = (b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\nx-request-id: r1\r\n"
           b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    ho.parse_http_response(o, raw)
    assert (o.status, o.headers["x-request-id"], o.body) == (401, "r1", body)
    assert ho.classify(o)[0] == "clean"
    cut = ho.Outcome(label="r")
    ho.parse_http_response(cut, raw[:-5])
    assert ho.classify(cut)[0] == "lost"
    junk = ho.Outcome(label="r")
    ho.parse_http_response(junk, b"garbage")
    assert junk.status is None and ho.classify(junk)[0] == "lost"


def test_stream_gaps_can_leave_out_retrievals_and_idle_time():
    o = sse([], token_times=[1.0, 1.1, 3.1, 3.2, 3.3], retrieval_times=[2.0])
    assert ho.stream_gaps(o) == pytest.approx([0.1, 2.0, 0.1, 0.1])
    assert ho.stream_gaps(o, skip_retrievals=True) == pytest.approx([0.1, 0.1, 0.1])  # the 2 s gap held a search
    assert ho.stream_gaps(o, busy=ho.in_any([(3.15, 9.0)]), skip_retrievals=True) == pytest.approx([0.1, 0.1])
