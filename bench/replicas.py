"""Replicas behind nginx (issue #22): 1 against 2 replicas, cache-aware routing, an index update and a SIGTERM
under load, and the memory of each replica.

    python bench/replicas.py                 # the default model (`python -m server` prepares it): the report
    python bench/replicas.py --quick         # fewer and shorter requests (results/quick/)
    python bench/replicas.py --checkpoint CKPT --index IDX [--dtype D]   # another model (results/quick/)

The set-up is the one ``deploy/compose/docker-compose.replicas.yml`` runs, on 127.0.0.1 without
containers: ``python -m server`` replicas serving one checkpoint and one index directory (the shared
volume: a copy of ``--index`` in a scratch directory, so the update scenario never changes the
original), behind Debian's nginx running the shipped ``deploy/nginx/onegen.conf``
(``tests/server/nginx_harness.py``: only addresses differ). Each replica gets ``--threads`` threads
(default: the cores divided by the replicas) and, where ``taskset`` exists, cores of its own. Every
answer names its replica (``X-Served-By``). Scenarios, in this order:

* **1 replica**, then **2 replicas** (a fresh set each): ``--requests`` (48) non-streamed ``/generate``
  through nginx from ``--concurrency`` (8) clients, a knowledge question each, ``--max-tokens`` (64) with
  EOS ignored, retrieval as the model decides: requests, ok, clean errors, lost; generated tokens per
  second (all completion tokens over the wall time); latency; the split between replicas; then each
  replica's memory (``bench/index_memory.py``'s ``/proc`` reading: RSS, PSS, anonymous, and the
  ``index.faiss`` mapping, shared between the replicas where ``--index-mmap``, the default, maps it).
* **cache-aware routing** (2 replicas): ``--conversations`` (8) conversations of ``--turns`` (6) turns at
  once, each turn a non-streamed ``/generate`` resending the whole conversation (a system message of
  ``--system-words`` words of its own, knowledge questions, the answers as they came back), first with an
  ``X-Session-Id`` per conversation (nginx hashes it to one replica), then, with other conversations,
  without (nginx's random key: spread like round robin). Hit rate of turns 2 on: the prompt tokens the
  prefix cache served (``usage.cached_tokens``) over all prompt tokens; the same from ``/metrics``
  (``onegen_prefix_cache_hit_tokens`` / (hit + miss), both replicas); how often a conversation changed
  replica.
* **index update under load** (2 replicas): ``--concurrency`` clients send ``/generate`` (plain and
  streamed) and ``/retrieve`` requests while ``python -m index_builder update`` publishes a new version of
  the shared index (``--update-docs`` (8) documents of the docstore again under new ids); until each
  replica's ``/info`` shows it, then 3 s more: requests, ok, clean errors, lost; when each replica
  reached the new version.
* **SIGTERM under load** (2 replicas): the same load; after ``--drain-after-s`` (2 s) replica 1 gets
  SIGTERM (its drain timeout: ``--drain-timeout-s``, 10 s); the load runs until it has exited, then 3 s
  more: requests, ok, clean errors, lost; the requests sent after the signal and which replica served them.

Categories as in ``bench/hostile.py`` (``hostile_outcomes.classify``): ok = a complete answer; clean = a
documented JSON error with an X-Request-Id (4xx, 503, or the 500 ``server_shutdown`` of a request the
drain timeout cut), for a stream its ``error`` event then ``[DONE]``; lost = anything else (a cut stream,
a reset, a timeout, an undocumented 5xx). Output: the tables on stdout and ``OUT.md`` / ``OUT.json``;
``OUT`` is ``bench/results/replicas`` for the report (the default model, default sizes, not ``--quick``),
else ``bench/results/quick/replicas``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "server"))  # the test suite's launchers of `python -m server` and nginx

from common import (  # noqa: E402
    QUICK_RESULTS,
    RESULTS,
    add_served_model_args,
    cpu_name,
    log,
    plain_args,
    read_set,
    served_model,
    write_report,
)
from hostile import call  # noqa: E402
from hostile_outcomes import Outcome, classify  # noqa: E402
from index_memory import process_memory  # noqa: E402
from nginx_harness import NginxProcess, nginx_binary  # noqa: E402
from server_harness import ServerProcess  # noqa: E402

MB = 1024 * 1024
SCENARIOS = ("throughput", "routing", "update", "drain")
DEFAULTS = {"concurrency": 8, "requests": 48, "max_tokens": 64, "conversations": 8, "turns": 6,
            "conv_max_tokens": 48, "system_words": 120, "update_docs": 8, "drain_after_s": 2.0,
            "drain_timeout_s": 10.0}
QUICK = {"requests": 16, "max_tokens": 16, "conversations": 4, "turns": 3, "conv_max_tokens": 16,
         "system_words": 40, "update_docs": 4}
WORDS = ("history city river valley people king war empire science music language island mountain century church "
         "school bridge market harbour railway station museum library university garden festival novel poet").split()


# ---------------------------------------------------------------------------------------------- one request
@dataclass
class Sent:
    """One request of a scenario: what the client saw (``Outcome``), its category, and which replica answered."""

    kind: str
    t0: float  # time.monotonic() at send
    category: str
    why: str
    status: int | None
    served_by: str | None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    latency_s: float = 0.0
    text: str = ""


def _usage(o: Outcome) -> dict[str, Any]:
    if o.kind == "sse":
        final = next((e for e in reversed(o.events) if isinstance(e, dict) and e.get("type") == "final"), {})
        return final.get("usage") or {}
    body = o.json_body()
    return (body.get("usage") or {}) if isinstance(body, dict) else {}


async def send(client: httpx.AsyncClient, kind: str, body: dict[str, Any], headers: dict[str, str] | None = None,
               hung_s: float = 900.0) -> Sent:
    """``kind``: generate (plain), stream (SSE) or retrieve; through whatever ``client`` points at."""
    path = "/retrieve" if kind == "retrieve" else "/generate"
    body = {**body, "stream": True} if kind == "stream" else body
    t0 = time.monotonic()
    o = await call(client, "POST", path, label=kind, kind="sse" if kind == "stream" else "json", json_body=body,
                   headers=headers, hung_s=hung_s)
    category, why = classify(o)
    if category not in ("ok", "clean"):  # hung, refused, an undocumented 5xx, other: the client got no answer
        category, why = "lost", f"{category}: {why}"
    usage = _usage(o)
    text = ""
    if category == "ok" and kind == "generate":
        text = (o.json_body() or {}).get("text", "")
    return Sent(kind, t0, category, why, o.status, o.headers.get("x-served-by"),
                usage.get("completion_tokens", 0) or 0, usage.get("prompt_tokens", 0) or 0, usage.get("cached_tokens"),
                o.t_end - o.t_send, text)


def counts(sent: list[Sent]) -> dict[str, int]:
    return {"requests": len(sent), "ok": sum(s.category == "ok" for s in sent),
            "clean": sum(s.category == "clean" for s in sent), "lost": sum(s.category == "lost" for s in sent)}


# ---------------------------------------------------------------------------------------------- the set-up
@dataclass
class Replicas:
    """``n`` replicas of ``python -m server`` behind nginx; ``names`` as their X-Served-By says."""

    servers: list[ServerProcess]
    nginx: NginxProcess
    threads: int
    names: list[str] = field(default_factory=list)

    def stop(self) -> None:
        self.nginx.stop()
        for s in self.servers:
            s.stop()


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.questions = [row["question"] for row in read_set("knowledge")]
        self.results: dict[str, Any] = {}
        self.checkpoint, self.source_index, self.dtype = served_model(self.args)
        self.index = work / "shared" / "index"  # the shared volume every replica serves
        log(f"copying the index {self.source_index} to {self.index} (the shared volume)")
        shutil.copytree(self.source_index, self.index, symlinks=True)
        self.info: dict[str, Any] = {}

    # ------------------------------------------------------------------ replicas
    def start(self, n: int) -> Replicas:
        a = self.args
        cores = os.cpu_count() or 1
        threads = a.threads or max(1, cores // n)
        flags = ["--checkpoint", str(self.checkpoint), "--index", str(self.index), "--index-poll-s", "0.5",
                 "--drain-timeout-s", str(a.drain_timeout_s), "--max-tokens-limit", str(max(4096, a.max_tokens)),
                 "--max-num-seqs", str(max(16, a.concurrency)), "--log-level", "warning", "--log-format", "json",
                 *(["--dtype", self.dtype] if self.dtype else []), *a.server_arg]
        servers = []
        for i in range(n):
            env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1"}
            launcher = None
            if shutil.which("taskset") and threads * n <= cores:  # cores of its own, as on separate machines
                launcher = ["taskset", "-c", f"{i * threads}-{(i + 1) * threads - 1}", sys.executable, "-m", "server"]
            log_path = Path(a.log_dir) / f"onegen-replicas-{os.getpid()}-{n}-{i}.log"
            log(f"replica {i + 1} of {n}: {threads} threads (log: {log_path})")
            servers.append(ServerProcess(flags, log_path, env=env, launcher=launcher))
        for s in servers:
            s.wait_ready(timeout=a.ready_timeout_s)
        nginx = NginxProcess([f"127.0.0.1:{s.port}" for s in servers], self.work / f"nginx-{n}")
        r = Replicas(servers, nginx, threads)
        for s in servers:
            r.names.append(httpx.get(s.url + "/health/live", timeout=30).headers.get("x-served-by", s.url))
            self.info.setdefault("model", httpx.get(s.url + "/info", timeout=60).json())
        return r

    def client(self, r: Replicas, n: int | None = None) -> httpx.AsyncClient:
        n = n or self.args.concurrency + 4
        return httpx.AsyncClient(base_url=r.nginx.url, timeout=self.args.timeout,
                                 limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))

    def question(self, i: int) -> str:
        return self.questions[i % len(self.questions)]

    def generate_body(self, i: int, max_tokens: int | None = None) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": self.question(i)}],
                "max_tokens": max_tokens or self.args.max_tokens, "temperature": 0, "ignore_eos": True}

    # ------------------------------------------------------------------ 1 vs 2 replicas
    async def throughput(self, r: Replicas, n: int) -> dict[str, Any]:
        a = self.args
        async with self.client(r) as client:
            await asyncio.gather(*(send(client, "generate", self.generate_body(i, 4)) for i in range(2 * n)))  # warm
            queue = list(range(a.requests))
            sent: list[Sent] = []

            async def worker() -> None:
                while queue:
                    i = queue.pop(0)
                    sent.append(await send(client, "generate", self.generate_body(1000 + i)))

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(a.concurrency)))
            wall = time.perf_counter() - t0
        tokens = sum(s.completion_tokens for s in sent if s.category == "ok")
        lat = sorted(s.latency_s for s in sent if s.category == "ok") or [float("nan")]
        row = {"replicas": n, "threads": r.threads, **counts(sent), "wall_s": wall, "tokens": tokens,
               "tokens_per_s": tokens / wall, "latency_p50_s": statistics.median(lat),
               "latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
               "per_replica": {name: sum(s.served_by == name for s in sent) for name in r.names},
               "memory": [process_memory(s.proc.pid) for s in r.servers]}
        log(f"  {n} replica(s): {row['ok']}/{row['requests']} ok, {row['tokens_per_s']:.1f} tokens/s, "
            f"split {list(row['per_replica'].values())}")
        return row

    # ------------------------------------------------------------------ cache-aware routing
    def system_message(self, seed: str) -> str:
        rng = random.Random(seed)
        words = [rng.choice(WORDS) for _ in range(self.args.system_words)]
        return f"{seed}: you are a helpful assistant. Notes: " + " ".join(words) + "."

    async def conversation(self, client: httpx.AsyncClient, mode: str, k: int) -> list[dict[str, Any]]:
        a = self.args
        session = f"bench-{mode}-{k}-{os.getpid()}"
        headers = {"X-Session-Id": session} if mode == "session" else None
        messages = [{"role": "system", "content": self.system_message(session)}]
        turns = []
        for t in range(a.turns):
            messages.append({"role": "user", "content": self.question(k * a.turns + t + (500 if mode == "random"
                                                                                           else 0))})
            body = {"messages": messages, "max_tokens": a.conv_max_tokens, "temperature": 0}
            s = await send(client, "generate", body, headers)
            turns.append({"turn": t + 1, "category": s.category, "served_by": s.served_by,
                          "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens})
            if s.category != "ok":
                break
            messages.append({"role": "assistant", "content": s.text})
        return turns

    async def routing(self, r: Replicas) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {}
        for mode in ("session", "random"):
            before = [cache_counts(s.url) for s in r.servers]
            async with self.client(r, a.conversations + 4) as client:
                convs = await asyncio.gather(*(self.conversation(client, mode, k) for k in range(a.conversations)))
            after = [cache_counts(s.url) for s in r.servers]
            later = [t for c in convs for t in c[1:] if t["category"] == "ok"]
            prompt = sum(t["prompt_tokens"] for t in later)
            cached = sum(t["cached_tokens"] or 0 for t in later)
            hit = sum(x["hit"] - y["hit"] for x, y in zip(after, before, strict=True))
            miss = sum(x["miss"] - y["miss"] for x, y in zip(after, before, strict=True))
            switches = sum(sum(1 for p, q in zip(c, c[1:], strict=False) if p["served_by"] != q["served_by"])
                           for c in convs)
            sent = [t for c in convs for t in c]
            out[mode] = {"conversations": convs, "requests": len(sent), "ok": sum(t["category"] == "ok" for t in sent),
                         "clean": sum(t["category"] == "clean" for t in sent),
                         "lost": sum(t["category"] == "lost" for t in sent),
                         "later_prompt_tokens": prompt, "later_cached_tokens": cached,
                         "hit_rate": cached / prompt if prompt else float("nan"),
                         "metrics_hit_rate": hit / (hit + miss) if hit + miss else float("nan"),
                         "replica_switches": switches, "turn_pairs": sum(max(0, len(c) - 1) for c in convs)}
            log(f"  routing, {mode}: hit rate {out[mode]['hit_rate']:.1%} (metrics {out[mode]['metrics_hit_rate']:.1%}), "
                f"{switches} replica switches")
        return out

    # ------------------------------------------------------------------ load for update and drain
    async def load(self, client: httpx.AsyncClient, sent: list[Sent], stop: asyncio.Event, who: int) -> None:
        kinds = ("generate", "stream", "retrieve")
        i = who
        while not stop.is_set():
            kind = kinds[i % len(kinds)]
            body = ({"queries": [self.question(i)], "k": 3} if kind == "retrieve"
                    else self.generate_body(2000 + i, self.args.max_tokens))
            sent.append(await send(client, kind, body))
            i += self.args.concurrency

    async def update(self, r: Replicas) -> dict[str, Any]:
        a = self.args
        changes = self.work / "changes.jsonl"
        write_changes(self.index, changes, a.update_docs)
        versions0 = [index_version(s.url) for s in r.servers]
        sent: list[Sent] = []
        stop = asyncio.Event()
        reached: dict[str, float] = {}
        async with self.client(r) as client:
            workers = [asyncio.create_task(self.load(client, sent, stop, w)) for w in range(a.concurrency)]
            await asyncio.sleep(2.0)
            t0 = time.monotonic()
            cmd = [sys.executable, "-m", "index_builder", "update", "--index", str(self.index), "--checkpoint",
                   str(self.checkpoint), "--corpus", str(changes), "--no-bm25", "--quiet", "--device", "cpu"]
            log(f"  update: {' '.join(cmd[1:])}")
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            output, _ = await proc.communicate()
            published = time.monotonic()
            if proc.returncode != 0:
                stop.set()
                await asyncio.gather(*workers)
                raise RuntimeError(f"index_builder update failed ({proc.returncode}): {output.decode()[-2000:]}")
            deadline = published + 120
            while len(reached) < len(r.servers) and time.monotonic() < deadline:
                for name, s in zip(r.names, r.servers, strict=True):
                    if name not in reached and await asyncio.to_thread(index_version, s.url) != versions0[0]:
                        reached[name] = time.monotonic() - published
                await asyncio.sleep(0.2)
            await asyncio.sleep(3.0)
            stop.set()
            await asyncio.gather(*workers)
        row = {**counts(sent), "update_s": published - t0, "reached_s": reached,
               "versions": {"before": versions0, "after": [index_version(s.url) for s in r.servers]}}
        log(f"  update: {row['ok']}/{row['requests']} ok, {row['lost']} lost; versions {row['versions']}, "
            f"reached after {reached}")
        return row

    async def drain(self, r: Replicas) -> dict[str, Any]:
        a = self.args
        sent: list[Sent] = []
        stop = asyncio.Event()
        victim, other = r.servers[0], r.names[1]
        async with self.client(r) as client:
            workers = [asyncio.create_task(self.load(client, sent, stop, w)) for w in range(a.concurrency)]
            await asyncio.sleep(a.drain_after_s)
            t_sig = time.monotonic()
            victim.proc.send_signal(signal.SIGTERM)
            log(f"  drain: SIGTERM to replica 1 ({r.names[0]})")
            rc = await asyncio.to_thread(victim.proc.wait, a.drain_timeout_s + 60)
            exited = time.monotonic() - t_sig
            await asyncio.sleep(3.0)
            stop.set()
            await asyncio.gather(*workers)
        late = [s for s in sent if s.t0 > t_sig + 0.5]
        row = {**counts(sent), "exit_code": rc, "exited_after_s": exited,
               "after_signal": {**counts(late), "served_by_the_other": sum(s.served_by == other for s in late)},
               "not_ok": [{"kind": s.kind, "category": s.category, "why": s.why, "served_by": s.served_by}
                          for s in sent if s.category != "ok"][:50]}
        log(f"  drain: {row['ok']}/{row['requests']} ok, {row['clean']} clean, {row['lost']} lost; replica 1 exited "
            f"after {exited:.1f} s ({rc})")
        return row

    # ------------------------------------------------------------------ the run
    async def run_two(self, r: Replicas) -> None:
        a = self.args
        if "throughput" in a.scenarios:
            self.results.setdefault("throughput", []).append(await self.throughput(r, 2))
        if "routing" in a.scenarios:
            self.results["routing"] = await self.routing(r)
        if "update" in a.scenarios:
            self.results["update"] = await self.update(r)
        if "drain" in a.scenarios:
            self.results["drain"] = await self.drain(r)

    def run(self) -> None:
        if "throughput" in self.args.scenarios:
            log("1 replica")
            r = self.start(1)
            try:
                self.results.setdefault("throughput", []).append(asyncio.run(self.throughput(r, 1)))
            finally:
                r.stop()
        log("2 replicas")
        r = self.start(2)
        self.results["replica_names"] = r.names
        try:
            asyncio.run(self.run_two(r))
        finally:
            r.stop()


# ---------------------------------------------------------------------------------------------- helpers
def cache_counts(url: str) -> dict[str, float]:
    """``onegen_prefix_cache_hit_tokens`` and ``_miss_tokens`` of one replica's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"hit": 0.0, "miss": 0.0}
    r = httpx.get(url + "/metrics", timeout=30)
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == "onegen_prefix_cache_hit_tokens":
                out["hit"] += s.value
            elif s.name == "onegen_prefix_cache_miss_tokens":
                out["miss"] += s.value
    return out


def index_version(url: str) -> int | None:
    info = httpx.get(url + "/info", timeout=30).json()
    return (info.get("index") or {}).get("version")


def write_changes(index: Path, out: Path, n: int) -> None:
    """``n`` documents of ``index``'s docstore again under new ids (what update encodes and adds)."""
    from onegen_core.formats.index_store import DOCSTORE, DocStore, resolve_version

    store = DocStore(resolve_version(index)[0] / DOCSTORE)
    try:
        docs = [d for d in store.get(list(range(n))) if d is not None]
    finally:
        store.close()
    out.write_text("".join(json.dumps({"id": f"bench-update-{i}-{d.id}", "title": d.title, "text": d.text}) + "\n"
                           for i, d in enumerate(docs)))


# ---------------------------------------------------------------------------------------------- report
def _mb(x: float) -> str:
    return f"{x / MB:,.1f}"


def render(bench: Bench, meta: dict[str, Any]) -> str:
    a, res = bench.args, bench.results
    info = bench.info.get("model", {})
    lines = [f"# Replicas behind nginx ({meta['date']})", "",
             f"{info.get('model')} ({info.get('dtype')} on {info.get('device')}), index "
             f"{(info.get('index') or {}).get('type')} of {(info.get('index') or {}).get('size')} passages; "
             f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores; nginx {meta['nginx']} with "
             "`deploy/nginx/onegen.conf`. Load average before: " + meta["load_start"] + "; after: " + meta["load_end"]
             + ".", ""]
    totals = {"requests": 0, "ok": 0, "clean": 0, "lost": 0}
    if res.get("throughput"):
        lines += ["## 1 against 2 replicas", "",
                  f"{a.requests} non-streamed `/generate` through nginx from {a.concurrency} clients, {a.max_tokens} "
                  "tokens each (EOS ignored).", "",
                  "| replicas | threads each | requests | ok | clean errors | lost | tokens/s | latency p50 s | p95 s "
                  "| requests per replica |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for t in res["throughput"]:
            lines.append(f"| {t['replicas']} | {t['threads']} | {t['requests']} | {t['ok']} | {t['clean']} | "
                         f"{t['lost']} | {t['tokens_per_s']:.1f} | {t['latency_p50_s']:.2f} | {t['latency_p95_s']:.2f} | "
                         f"{' / '.join(str(v) for v in t['per_replica'].values())} |")
            for k in totals:
                totals[k] += t[k]
        lines += ["", "### Resident memory per replica", "",
                  "| replicas | replica | RSS MB | PSS MB | anonymous MB | index.faiss mapped: RSS MB | PSS MB |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for t in res["throughput"]:
            for i, m in enumerate(t["memory"]):
                lines.append(f"| {t['replicas']} | {i + 1} | {_mb(m['rss'])} | {_mb(m['pss'])} | {_mb(m['anonymous'])} "
                             f"| {_mb(m['index_rss'])} | {_mb(m['index_pss'])} |")
        lines += ["", "PSS counts a page shared by n processes 1/n in each: with `--index-mmap` (the default) the "
                  "replicas map one copy of `index.faiss` from the page cache, so each one's index PSS is half its "
                  "RSS. `bench/index_memory.py` measures with and without the mapping."]
    if res.get("routing"):
        lines += ["", "## Cache-aware routing", "",
                  f"{a.conversations} conversations of {a.turns} turns at once, each turn resending the whole "
                  f"conversation (a {a.system_words}-word system message of its own), at most {a.conv_max_tokens} "
                  "tokens per answer. Turns 2 on:", "",
                  "| routing | requests | ok | clean | lost | prompt tokens | served by the prefix cache | hit rate "
                  "| /metrics hit rate | replica changes |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                  "| ---: | ---: |"]
        for mode, label in (("session", "X-Session-Id (hashed)"), ("random", "no header (random, like round robin)")):
            m = res["routing"][mode]
            lines.append(f"| {label} | {m['requests']} | {m['ok']} | {m['clean']} | {m['lost']} | "
                         f"{m['later_prompt_tokens']:,} | {m['later_cached_tokens']:,} | {m['hit_rate']:.1%} | "
                         f"{m['metrics_hit_rate']:.1%} | {m['replica_switches']} of {m['turn_pairs']} |")
            for k in totals:
                totals[k] += m[k]
        lines += ["", "/metrics hit rate: the change of `onegen_prefix_cache_hit_tokens` over that of hit + miss "
                  "tokens on both replicas, every turn (the first ones too) included."]
    if res.get("update"):
        u = res["update"]
        lines += ["", "## Index update under load", "",
                  f"`python -m index_builder update` adds {a.update_docs} documents to the shared index while "
                  f"{a.concurrency} clients send `/generate` (plain and streamed) and `/retrieve`.", "",
                  "| requests | ok | clean errors | lost | update took s | version before -> after | each replica "
                  "served it after s |", "| ---: | ---: | ---: | ---: | ---: | --- | --- |",
                  f"| {u['requests']} | {u['ok']} | {u['clean']} | {u['lost']} | {u['update_s']:.1f} | "
                  f"{u['versions']['before']} -> {u['versions']['after']} | "
                  f"{', '.join(f'{v:.1f}' for v in u['reached_s'].values())} |"]
        for k in totals:
            totals[k] += u[k]
    if res.get("drain"):
        d = res["drain"]
        late = d["after_signal"]
        lines += ["", "## SIGTERM to one replica under load", "",
                  f"The same load; replica 1 gets SIGTERM after {a.drain_after_s:g} s (drain timeout "
                  f"{a.drain_timeout_s:g} s) and the load goes on until 3 s after it exited.", "",
                  "| requests | ok | clean errors | lost | replica 1 exited after s (status) | sent after the signal "
                  "| of them served by replica 2 |", "| ---: | ---: | ---: | ---: | --- | ---: | ---: |",
                  f"| {d['requests']} | {d['ok']} | {d['clean']} | {d['lost']} | {d['exited_after_s']:.1f} "
                  f"({d['exit_code']}) | {late['requests']} | {late['served_by_the_other']} |"]
        for k in totals:
            totals[k] += d[k]
        if d["not_ok"]:
            lines += ["", "Not ok: " + "; ".join(f"{x['kind']} {x['category']} ({x['why']}) via {x['served_by']}"
                                                 for x in d["not_ok"][:10])]
    lines += ["", f"**All scenarios: {totals['requests']} requests, {totals['ok']} ok, {totals['clean']} clean errors, "
              f"{totals['lost']} lost.** Runtime {meta['runtime_s']:.0f} s. Every request is in "
              f"`{Path(a.out).name}.json`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_served_model_args(p, "its index (copied to a scratch directory: never changed); needed with --checkpoint")
    p.add_argument("--threads", type=int, help="torch threads per replica (default: the cores divided by the "
                   "replicas, each on cores of its own where taskset exists)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for every replica, repeatable (e.g. --server-arg=--max-num-seqs "
                   "--server-arg=32)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer and shorter requests: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (results/quick/)")
    p.add_argument("--concurrency", type=int, help=f"clients at once (default: {DEFAULTS['concurrency']})")
    p.add_argument("--requests", type=int, help=f"requests of the 1 vs 2 replicas runs (default: {DEFAULTS['requests']})")
    p.add_argument("--max-tokens", type=int, help=f"tokens per request, EOS ignored (default: {DEFAULTS['max_tokens']})")
    p.add_argument("--conversations", type=int, help=f"conversations at once (default: {DEFAULTS['conversations']})")
    p.add_argument("--turns", type=int, help=f"turns per conversation (default: {DEFAULTS['turns']})")
    p.add_argument("--conv-max-tokens", type=int,
                   help=f"most tokens per answer in a conversation (default: {DEFAULTS['conv_max_tokens']})")
    p.add_argument("--system-words", type=int,
                   help=f"words of a conversation's system message (default: {DEFAULTS['system_words']})")
    p.add_argument("--update-docs", type=int, help=f"documents the index update adds (default: {DEFAULTS['update_docs']})")
    p.add_argument("--drain-after-s", type=float,
                   help=f"seconds of load before the SIGTERM (default: {DEFAULTS['drain_after_s']:g})")
    p.add_argument("--drain-timeout-s", type=float,
                   help=f"the replicas' --drain-timeout-s (default: {DEFAULTS['drain_timeout_s']:g})")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per request (default: 900)")
    p.add_argument("--ready-timeout-s", type=float, default=900.0, help="seconds a replica may take to start")
    p.add_argument("--log-dir", default="/tmp", help="where the replicas' logs go (default: /tmp)")
    p.add_argument("--out", help="writes OUT.md and OUT.json (default: bench/results/replicas for the report: the "
                   "default model, default sizes, every scenario, not --quick; else bench/results/quick/replicas)")
    a = p.parse_args(argv)
    if a.checkpoint and not a.index:
        p.error("--checkpoint needs --index (the replicas share an index)")
    if a.index and not a.checkpoint:
        p.error("--index needs --checkpoint")
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    unknown = sorted(set(a.scenarios) - set(SCENARIOS))
    if unknown or not a.scenarios:
        p.error(f"--scenarios: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SCENARIOS)}")
    given = {k for k in DEFAULTS if getattr(a, k) is not None}
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK.get(k, v) if a.quick else v)
    for k in ("concurrency", "requests", "max_tokens", "conversations", "turns", "conv_max_tokens", "update_docs"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    if a.out is None:
        report = (not a.checkpoint and not a.dtype and not a.server_arg and not a.quick and not a.threads
                  and a.scenarios == list(SCENARIOS) and all(getattr(a, k) == DEFAULTS[k] for k in given))
        a.out = str((RESULTS if report else QUICK_RESULTS) / "replicas")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nginx = nginx_binary()
    if nginx is None:
        print("replicas: nginx is not installed (Debian: apt-get install nginx)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    meta: dict[str, Any] = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "nginx": version,
                            "machine": {"cpu": cpu_name(platform.processor() or "?"), "cores": os.cpu_count(),
                                        "python": platform.python_version()},
                            "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="onegen-replicas-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.run()
    meta["runtime_s"] = time.perf_counter() - t0
    meta["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result = {**meta, "args": plain_args(args),
              "checkpoint": str(bench.checkpoint), "index": str(bench.source_index), "info": bench.info,
              "results": bench.results}
    write_report(args.out, render(bench, meta), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
