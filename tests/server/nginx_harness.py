"""A real nginx on 127.0.0.1 in front of ``python -m server`` replicas, running the shipped configuration.

``NginxProcess`` runs Debian's nginx (``/usr/sbin/nginx``) as a non-daemon child with a scratch prefix, so
it needs no root and leaves nothing behind. Its site is ``deploy/nginx/onegen.conf`` itself, with one
substitution: the ``listen`` address and port. Its upstream file is the shipped
``deploy/nginx/onegen-upstream.conf`` with the compose service's address replaced by each replica's
loopback address (the ``max_fails`` / ``fail_timeout`` of its server line kept). What is tested is thus
what is deployed; only addresses and paths differ. The main file around them is nginx's minimal one,
plus an access log that names the replicas each request was sent to (``$upstream_addr``: every one tried)
and what each answered (``$upstream_status``), so a test can see nginx's retries.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from server_harness import REPO, free_port

SITE = REPO / "deploy" / "nginx" / "onegen.conf"
UPSTREAM = REPO / "deploy" / "nginx" / "onegen-upstream.conf"
SHIPPED_LISTEN = "listen 8000;"
SHIPPED_REPLICA = "server:8000"
ACCESS_FIELDS = ("status", "upstream_addr", "upstream_status", "request_id", "session", "request")

MAIN_CONF = """daemon off;
worker_processes 1;
pid nginx.pid;
error_log error.log info;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path client_body;
    proxy_temp_path proxy;
    fastcgi_temp_path fastcgi;
    uwsgi_temp_path uwsgi;
    scgi_temp_path scgi;
    log_format replicas '$status\\t$upstream_addr\\t$upstream_status\\t$onegen_request_id\\t$http_x_session_id\\t$request';
    access_log {access_log} replicas;
    include onegen.conf;
}}
"""


def nginx_binary() -> str | None:
    """Debian's nginx (``apt-get install nginx``; /usr/sbin is not on every user's PATH), or None."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None


def site_config(port: int) -> str:
    """``deploy/nginx/onegen.conf`` listening on 127.0.0.1:``port`` instead of :8000; nothing else changed."""
    text = SITE.read_text()
    if text.count(SHIPPED_LISTEN) != 1:
        raise AssertionError(f"{SITE}: expected one '{SHIPPED_LISTEN}' line to substitute")
    return text.replace(SHIPPED_LISTEN, f"listen 127.0.0.1:{port};")


def upstream_config(replicas: list[str]) -> str:
    """The shipped upstream file's server line, once per replica address (``127.0.0.1:PORT``)."""
    lines = [ln for ln in UPSTREAM.read_text().splitlines() if ln.strip().startswith("server ")]
    if len(lines) != 1 or SHIPPED_REPLICA not in lines[0]:
        raise AssertionError(f"{UPSTREAM}: expected one 'server {SHIPPED_REPLICA} ...' line to substitute")
    return "".join(lines[0].replace(SHIPPED_REPLICA, r) + "\n" for r in replicas)


class NginxProcess:
    """nginx with ``deploy/nginx/onegen.conf`` in front of ``replicas`` (``host:port``); ``url`` once started."""

    def __init__(self, replicas: list[str], workdir: Path, binary: str | None = None):
        binary = binary or nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx; .ci/run installs it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = Path(workdir)
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.access_log = self.prefix / "access.log"
        (self.prefix / "onegen.conf").write_text(site_config(self.port))
        (self.prefix / "onegen-upstream.conf").write_text(upstream_config(replicas))
        conf = self.prefix / "nginx.conf"
        conf.write_text(MAIN_CONF.format(access_log=self.access_log))
        self._stderr = open(self.prefix / "stderr.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "-p", f"{self.prefix}/", "-c", str(conf), "-e", "stderr"],
                                     stdout=self._stderr, stderr=subprocess.STDOUT)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nginx not listening after {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            p = self.prefix / name
            if p.exists():
                parts.append(p.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def access_records(self) -> list[dict[str, str]]:
        """The access log so far: one dict per request (``ACCESS_FIELDS``); ``upstream_addr`` and
        ``upstream_status`` list every replica tried, comma-separated, in order."""
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) == len(ACCESS_FIELDS):
                out.append(dict(zip(ACCESS_FIELDS, parts, strict=True)))
        return out

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown: the test's clients are done
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()
        return self.proc.returncode
