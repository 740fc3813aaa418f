"""What one request of ``bench/hostile.py`` came to, and the table rows built from them (pure; no I/O).

``Outcome`` is what the client saw of one request: the status, headers and body (or the parsed SSE
``data:`` payloads), the arrival time of each token event, and the transport error if there was one.
``classify`` puts it in exactly one category (definitions in ``bench/hostile.py``'s docstring):

    ok       2xx with a complete body (SSE: a final event, then ``data: [DONE]``)
    clean    a documented JSON error (4xx, 503, or the 500 of type ``server_shutdown`` that ends a request the
             drain timeout aborted) with an X-Request-Id; for SSE an ``error`` event (4xx, 503 or that
             500) then ``[DONE]`` on a response with an X-Request-Id
    5xx      any other 5xx (a 500, a bare 503, an SSE error event with a 5xx code other than these)
    hung     no complete answer within the bench's bound
    lost     a stream cut without an error event or ``[DONE]``, a connection reset, a body cut short
    refused  the connection was refused (no server listening); ``lost`` except where a scenario
             expects it (after SIGTERM the server stops listening)
    other    an answer that is none of the above (a 4xx without the error shape or request id, a
             2xx whose body is not what the route documents, an SSE ``[DONE]`` with no final event)

A ``Row`` is one line of the table: its outcomes, which of them the scenario allows, and the
inter-token gaps its streams had.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

CATEGORIES = ("ok", "clean", "5xx", "hung", "lost", "refused", "other")
DONE = "[DONE]"
SHUTDOWN = "server_shutdown"  # the error type of a request the server aborted at its drain timeout (a 500)


@dataclass
class Outcome:
    """One request as the client saw it. Times are ``time.perf_counter()`` seconds."""

    label: str
    kind: str = "json"  # json | sse (native /generate events) | oai_sse (OpenAI chunks) | raw (any 2xx body)
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    events: list[Any] = field(default_factory=list)  # SSE data payloads: dicts, "[DONE]", or {"_unparsed": line}
    transport_error: str | None = None  # timeout | refused | reset
    error_text: str = ""
    t_send: float = 0.0
    t_end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of each token event
    retrieval_times: list[float] = field(default_factory=list)  # arrival of each retrieval event (native SSE)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.t_send if self.token_times else None

    def json_body(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None


def is_error_payload(payload: Any, status: int | None = None) -> bool:
    """The documented error shape: ``{"error": {"message": str, "type": str, "code": status}}``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return False
    err = payload["error"]
    if not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return False
    code = err.get("code")
    return isinstance(code, int) and (status is None or code == status)


def is_clean_5xx(payload: Any, status: int | None) -> bool:
    """A documented 5xx: a 503 (refused before any work: loading, draining), or the 500 ``server_shutdown`` of a
    request that ran and was aborted at the drain timeout (not a 503: a proxy would run it again)."""
    if status == 503:
        return is_error_payload(payload, 503)
    return status == 500 and is_error_payload(payload, 500) and payload["error"]["type"] == SHUTDOWN


def _last_event(events: Sequence[Any]) -> Any:
    """The payload just before ``[DONE]`` (None if there is none)."""
    return events[-2] if len(events) >= 2 else None


def _is_final(ev: Any) -> bool:
    """A native /generate SSE ``final`` event."""
    return isinstance(ev, dict) and ev.get("type") == "final"


def _oai_finished(events: Sequence[Any]) -> bool:
    """An OpenAI stream finished: some chunk has a choice with a finish_reason (a usage-only chunk may follow)."""
    for ev in events:
        if isinstance(ev, dict) and "error" not in ev:
            for ch in ev.get("choices") or []:
                if isinstance(ch, dict) and ch.get("finish_reason"):
                    return True
    return False


def _stream_error(events: Sequence[Any], kind: str) -> dict | None:
    """The error event of a stream that ended with ``[DONE]``: native SSE, the event just before it;
    OpenAI, any chunk that is an error object (a usage chunk may follow it)."""
    if kind == "sse":
        ev = _last_event(events)
        return ev if isinstance(ev, dict) and ev.get("type") == "error" and "error" in ev else None
    return next((ev for ev in events if isinstance(ev, dict) and "error" in ev), None)


def classify(o: Outcome) -> tuple[str, str]:
    """(category, reason) of one outcome; the category is one of ``CATEGORIES``."""
    if o.transport_error == "timeout":
        return "hung", "no complete answer within the bound"
    if o.transport_error == "refused":
        return "refused", "connection refused"
    if o.status is None:
        return "lost", f"no response ({o.transport_error or 'unknown'}: {o.error_text[:120]})"
    has_id = bool(o.headers.get("x-request-id"))
    streaming = o.kind in ("sse", "oai_sse") and o.headers.get("content-type", "").startswith("text/event-stream")
    if o.status >= 500:
        if o.transport_error is None and has_id and not streaming and is_clean_5xx(o.json_body(), o.status):
            return "clean", f"JSON {o.status}"
        return "5xx", f"HTTP {o.status}"
    if o.transport_error is not None:
        return "lost", f"HTTP {o.status}, then {o.transport_error}: {o.error_text[:120]}"
    if 400 <= o.status < 500:
        if has_id and is_error_payload(o.json_body(), o.status):
            return "clean", f"JSON {o.status}"
        return "other", f"HTTP {o.status} without the error shape or X-Request-Id"
    if not 200 <= o.status < 300:
        return "other", f"HTTP {o.status}"
    if o.kind in ("sse", "oai_sse"):
        if not streaming:
            return "other", f"2xx {o.headers.get('content-type', '?')} where an event stream was asked for"
        if not o.events or o.events[-1] != DONE:
            return "lost", f"stream cut after {len(o.events)} events without [DONE]"
        last = _last_event(o.events)
        err = _stream_error(o.events, o.kind)
        if err is not None:
            payload = {"error": err["error"]}
            code = err["error"].get("code") if isinstance(err["error"], dict) else None
            if isinstance(code, int) and code >= 500 and not is_clean_5xx(payload, code):
                return "5xx", f"SSE error event {code}"
            if has_id and is_error_payload(payload) and isinstance(code, int) and code >= 400:
                return "clean", f"SSE error event {code} + [DONE]"
            return "other", "SSE error event without the error shape or X-Request-Id"
        if (_is_final(last) if o.kind == "sse" else _oai_finished(o.events)):
            return "ok", "final event + [DONE]"
        return "other", "[DONE] without a final event"
    if o.kind == "json":
        body = o.json_body()
        if isinstance(body, dict) and "error" not in body:
            return "ok", "2xx JSON"
        return "other", "2xx whose body is not a JSON object"
    return "ok", f"2xx ({len(o.body)} bytes)"


def effective_status(o: Outcome) -> int | None:
    """The status a client should act on: an SSE error event's code, else the HTTP status."""
    if o.kind in ("sse", "oai_sse") and o.events and o.events[-1] == DONE:
        err = _stream_error(o.events, o.kind)
        if err is not None and isinstance(err.get("error"), dict):
            return err["error"].get("code")
    return o.status


def token_gaps(token_times: Sequence[float]) -> list[float]:
    """Seconds between consecutive token events of one stream (the time to the first token excluded)."""
    return [b - a for a, b in zip(token_times, token_times[1:], strict=False)]


def stream_gaps(o: Outcome, *, busy: Callable[[float], bool] | None = None, skip_retrievals: bool = False
                ) -> list[float]:
    """The stream's inter-token gaps; only those whose later token arrived while ``busy(t)`` held, and
    without those in which a retrieval event arrived (search + passage insert) if ``skip_retrievals``."""
    out = []
    for a, b in zip(o.token_times, o.token_times[1:], strict=False):
        if busy is not None and not busy(b):
            continue
        if skip_retrievals and any(a < t <= b for t in o.retrieval_times):
            continue
        out.append(b - a)
    return out


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100 (the smallest value with at least q% of values at or below it)."""
    s = sorted(values)
    if not s:
        return math.nan
    k = max(1, math.ceil(q / 100 * len(s)))
    return s[min(k, len(s)) - 1]


@dataclass(frozen=True)
class Expect:
    """What a scenario allows: categories, and (optionally) the effective statuses allowed for each."""

    categories: frozenset[str]
    statuses: dict[str, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, *categories: str, **statuses: Iterable[int]) -> Expect:
        return cls(frozenset(categories), {k: frozenset(v) for k, v in statuses.items()})

    def allows(self, o: Outcome, category: str) -> bool:
        if category not in self.categories:
            return False
        allowed = self.statuses.get(category)
        return allowed is None or effective_status(o) in allowed


@dataclass
class Row:
    scenario: str
    expect: Expect
    outcomes: list[Outcome] = field(default_factory=list)
    gaps: list[float] | None = None  # inter-token gaps behind the p99 column (None: no streams in this row)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for o in self.outcomes:
            out[classify(o)[0]] += 1
        return out

    def unexpected(self) -> list[tuple[Outcome, str, str]]:
        bad = []
        for o in self.outcomes:
            cat, why = classify(o)
            if not self.expect.allows(o, cat):
                bad.append((o, cat, why))
        return bad

    def p99_gap(self) -> float | None:
        return percentile(self.gaps, 99) if self.gaps else None

    def summary(self) -> dict[str, Any]:
        c = self.counts()
        return {
            "scenario": self.scenario, "requests": len(self.outcomes), **c,
            "unexpected": len(self.unexpected()),
            "p99_gap_s": self.p99_gap(), "gaps": len(self.gaps) if self.gaps is not None else None,
            "max_gap_s": max(self.gaps) if self.gaps else None,
            "notes": self.notes, **self.extra,
        }


def fmt_seconds(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


TABLE_HEADER = ("scenario", "requests", "ok", "clean errors", "5xx", "hung", "lost", "unexpected",
                "p99 inter-token gap", "notes")


def markdown_table(rows: Sequence[Row]) -> str:
    """The one table: scenario, requests, ok, clean errors, 5xx, hung, lost (refused and other in the notes)."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |",
             "| " + " | ".join(["---"] + ["---:"] * 8 + ["---"]) + " |"]
    for r in rows:
        c = r.counts()
        notes = list(r.notes)
        if c["refused"]:
            notes.insert(0, f"{c['refused']} refused")
        if c["other"]:
            notes.insert(0, f"{c['other']} other")
        cells = [r.scenario, str(len(r.outcomes)), str(c["ok"]), str(c["clean"]), str(c["5xx"]), str(c["hung"]),
                 str(c["lost"]), str(len(r.unexpected())), fmt_seconds(r.p99_gap()), "; ".join(notes)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def gaps_within(token_times_by_stream: Iterable[Sequence[float]],
                busy: Callable[[float], bool]) -> list[float]:
    """Gaps whose later token arrived while ``busy(t)`` held (e.g. while a /retrieve was in flight)."""
    out = []
    for times in token_times_by_stream:
        for a, b in zip(times, times[1:], strict=False):
            if busy(b):
                out.append(b - a)
    return out


def in_any(intervals: Sequence[tuple[float, float]]) -> Callable[[float], bool]:
    """A predicate: t lies inside one of the closed intervals."""
    iv = sorted(intervals)

    def busy(t: float) -> bool:
        return any(a <= t <= b for a, b in iv)

    return busy


def parse_http_response(o: Outcome, raw: bytes) -> None:
    """Fill ``o`` from the raw bytes of one HTTP/1.1 response read to EOF (``Connection: close``)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        o.status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        o.transport_error, o.error_text = "reset", f"not an HTTP response: {raw[:80]!r}"
        return
    o.headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = o.headers.get("content-length")
    if length is not None and length.isdigit():
        if len(body) < int(length):
            o.transport_error, o.error_text = "reset", f"body cut at {len(body)} of {length} bytes"
        body = body[:int(length)]
    o.body = body
