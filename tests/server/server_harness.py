"""A real ``python -m server`` process on 127.0.0.1 for the integration tests, and SSE/metrics parsing.

Every wait is bounded; every process started here is stopped by the fixture that
started it (SIGTERM, then SIGKILL after a timeout). Traffic goes to loopback only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123"
# Limits of the session's shared server: small enough that schemathesis' largest requests stay fast on a CPU.
MAX_TOKENS_LIMIT = 64
MAX_RETRIEVE_BATCH = 8
# The session server closes connections whose request headers are not complete after this long.
HEADER_TIMEOUT_S = 2.0
# Greedy decoding of the demo model retrieves on this prompt (several times): see test_generate_retrieves.
RETRIEVING_PROMPT = "Question: who wrote the book?"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m server ...`` as a child process; ``url`` once ``wait_ready`` returned."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None, api_key: str | None = None,
                 *, launcher: list[str] | None = None, cwd: Path = REPO):
        """``launcher`` replaces ``python -m server`` (e.g. ``["bash", "scripts/serve.sh"]``), run in ``cwd``."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        cmd = [*(launcher or [sys.executable, "-m", "server"]), "--host", "127.0.0.1", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 60.0), **kw)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        """The JSON log lines written so far (a line still being written is skipped)."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def wait_for_log(self, predicate, timeout: float = 15.0) -> list[dict]:
        """Log records matching ``predicate``, polled until there is one (bounded).

        Lines such as the access log's are written after the response has been sent: a client can
        hold the response before the line exists, so tests must wait for it, not read the file at once.
        """
        found: list[dict] = []

        def check() -> bool:
            found[:] = [r for r in self.log_records() if predicate(r)]
            return bool(found)

        assert wait_for(check, timeout=timeout), f"no matching log line after {timeout} s:\n{self.log_text()[-4000:]}"
        return list(found)

    def __enter__(self) -> ServerProcess:
        """``with ServerProcess(...) as srv:`` waits until it is ready and stops it at the end, whatever happens."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def sse_events(lines: Iterable[str]) -> Iterator[dict | str]:
    """Parse ``data:`` lines of an event stream: JSON objects, and the final ``"[DONE]"``."""
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        payload = line[len("data: "):]
        yield payload if payload == "[DONE]" else json.loads(payload)


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed with prometheus_client's parser: {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
