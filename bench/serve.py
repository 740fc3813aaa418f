"""HTTP serving benchmark: a load generator on loopback at concurrency 1 / 8 / 32, one table.

    python bench/serve.py                       # starts `python -m server` on the demo checkpoint
    python bench/serve.py --url http://127.0.0.1:8000 --api-key KEY   # an already running server
    python bench/serve.py --checkpoint CKPT --index IDX --max-tokens 128

Each level keeps ``concurrency`` streamed ``/generate`` requests in flight until
``--requests`` have completed. Per request: latency (send to ``[DONE]``) and time to
first token (send to the first token event), measured by the client; the level's
generation throughput is all generated tokens over the level's wall time. Greedy, EOS
ignored, so every request generates exactly ``--max-tokens`` tokens; retrieval stays on
(the demo model retrieves while it generates). Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Question: who wrote the book?",
    "Where does Zorblat live?",
    "Paris is the capital of",
    "Mirelle was born in Odrin and",
    "The quick brown fox",
    "A retrieval augmented model reads passages and",
    "Rome is the capital of Italy. Madrid",
    "Numbers 0 1 2 3",
]


@dataclass
class Sample:
    latency: float
    ttft: float
    tokens: int
    retrievals: int


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Sample:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    ttft = None
    tokens = retrievals = 0
    async with client.stream("POST", "/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"/generate answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["type"] == "token":
                if ttft is None:
                    ttft = time.perf_counter() - t0
                tokens += len(event["token_ids"])
            elif event["type"] == "retrieval":
                retrievals += 1
            elif event["type"] == "error":
                raise RuntimeError(event["error"]["message"])
    return Sample(time.perf_counter() - t0, ttft if ttft is not None else float("nan"), tokens, retrievals)


async def run_level(url: str, headers: dict[str, str], concurrency: int, n_requests: int, max_tokens: int,
                    timeout: float) -> tuple[list[Sample], float]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n_requests):
            queue.put_nowait(i)
        samples: list[Sample] = []

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                samples.append(await one_request(client, PROMPTS[i % len(PROMPTS)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout)
        return samples, time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, index: Path | None, max_num_seqs: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--max-num-seqs", str(max_num_seqs), "--log-level", "warning", *extra]
    if index is not None:
        cmd += ["--index", str(index)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready within 300 s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="benchmark this running server instead of starting one (loopback only)")
    p.add_argument("--api-key", default=os.environ.get("ONEGEN_API_KEY"), help="Bearer key of --url's server")
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: the demo, prepared if missing)")
    p.add_argument("--index", type=Path, help="index to serve with --checkpoint")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels (default: 1 8 32)")
    p.add_argument("--requests", type=int, default=32, help="completed requests per level (default: 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring (default: 2)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per level (default: 900)")
    args = p.parse_args()

    proc = None
    if args.url:
        host = httpx.URL(args.url).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--url must be a loopback address (127.0.0.1 / localhost / ::1)")
        url = args.url.rstrip("/")
    else:
        checkpoint, index = args.checkpoint, args.index
        if checkpoint is None:
            from server.demo import prepare_demo

            checkpoint, index = prepare_demo(REPO / ".cache" / "onegen-demo")
        proc, url = start_server(checkpoint, index, max(args.concurrency), [])
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        info = httpx.get(url + "/info", headers=headers, timeout=30).json()
        if args.warmup:
            asyncio.run(run_level(url, headers, 1, args.warmup, args.max_tokens, args.timeout))
        rows = []
        for c in args.concurrency:
            samples, wall = asyncio.run(run_level(url, headers, c, args.requests, args.max_tokens, args.timeout))
            lat = [s.latency for s in samples]
            ttft = [s.ttft for s in samples]
            tokens = sum(s.tokens for s in samples)
            rows.append((c, len(samples), percentile(lat, 50), percentile(lat, 99), percentile(ttft, 50),
                         percentile(ttft, 99), tokens / wall, len(samples) / wall,
                         sum(s.retrievals for s in samples) / len(samples)))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"\nmodel {info.get('model')} ({info.get('architecture')}, {info.get('dtype')} on {info.get('device')}), "
          f"{args.max_tokens} tokens per request, greedy, EOS ignored, streamed /generate on loopback")
    header = ("concurrency", "requests", "p50 latency s", "p99 latency s", "p50 TTFT s", "p99 TTFT s",
              "gen tokens/s", "requests/s", "retrievals/req")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.1f} | {r[7]:.2f} "
              f"| {r[8]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
