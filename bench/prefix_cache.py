"""Prefix caching through a real server (issue #21): the cache on against the cache off, in one run.

    python bench/prefix_cache.py                 # the default model (`python -m server` prepares it): the report
    python bench/prefix_cache.py --quick         # 2 repeats instead of 3 (results/quick/)
    python bench/prefix_cache.py --checkpoint CKPT --index IDX      # another model (results/quick/)

Two ``python -m server`` processes on 127.0.0.1, alike but for ``--no-enable-prefix-caching`` on one
(without ``--checkpoint`` both serve the default model, the first preparing it; with one, they start
at once). Both stay up and only one is measured at a time; the repeats alternate which goes first, so
what other processes do to the CPU falls on both alike. The same requests go to both:

* **system prompt** — ``--concurrency`` (16) streamed ``/generate`` chat requests sent at once, each a
  system message of ``--system-tokens`` (1,000) tokens, the same for all, and a distinct short
  question (``bench/quality_sets/knowledge.jsonl``); greedy, EOS ignored, ``--max-tokens`` (32) each.
  *cold*: a system prompt no request sent before (each repeat has its own): the first request computes
  it, the others share it. *warm*: the same system prompt again with other questions, as in a
  deployment that sends it with every request. Per burst: each request's time to first token (send
  to the first ``token`` event, ``[RQ]`` included: the prefill is what the cache saves), their mean,
  and the throughput (generated tokens over the burst's wall time).
* **conversation** — ``--turns`` (8) turns of one chat through streamed ``/v1/chat/completions``, each
  resending the whole conversation with the answers as they came back (``docs/prefix-caching.md``
  says why that is what the next turn should see): a system message of ``--conv-system-tokens`` (200),
  knowledge questions, and every third turn a follow-up about the conversation; greedy, EOS kept, at
  most ``--conv-max-tokens`` (64) per answer; each repeat is a new conversation. Time to first token:
  send to the first chunk that carries a token (``logprobs`` on, so ``[RQ]`` has a chunk too) or a
  retrieval.

The system prompts are seeded word lists sized to the model's tokenizer with two calibration requests
(retrieval off) to the server without the cache. Reported: min / median / max over ``--repeats`` of
each burst's mean TTFT and throughput and of each turn's TTFT, the ratios of the medians (off / on),
the issue's targets (cold burst TTFT >= 3x and throughput >= 1.5x, last turn's TTFT >= 3x), whether
both servers gave the same text, and what the cache served: ``usage.cached_tokens`` of ``/generate``
and ``usage.prompt_tokens_details.cached_tokens`` of the OpenAI route when the server reports them
(else n/a), with, per turn, the floor the conversation decision implies (every full block of the
previous turn's prompt, ``--block-size`` given to both servers), and the changes of the ``/metrics``
samples whose names hold ``prefix_cache`` or ``cached``. Output: the tables on stdout and
``OUT.md`` / ``OUT.json`` / ``OUT.png``; ``OUT`` is ``bench/results/prefix_cache`` for the report (the
default model, every default size, not ``--quick``), else ``bench/results/quick/prefix_cache``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "server"))  # ServerProcess: the test suite's launcher of `python -m server`

from common import (  # noqa: E402
    QUICK_RESULTS,
    RESULTS,
    add_served_model_args,
    cpu_name,
    log,
    plain_args,
    read_set,
    write_report,
)
from server_harness import ServerProcess  # noqa: E402

CACHES = ("off", "on")
WORDS = ("history city river valley people king war empire science music language island mountain century church "
         "school bridge market harbour railway station museum library university garden festival novel poet painter "
         "composer theatre castle village forest lake border treaty army navy election parliament minister republic "
         "colony trade coal iron steel cotton wool grain wine bread north south east west old new great small first "
         "last long short early late famous local built founded named moved wrote painted ruled fought signed "
         "opened closed grew became remained").split()
FOLLOW_UPS = ("Thank you. Can you say that again in one short sentence?",
              "Which of your answers so far was about a person?",
              "Put your last two answers together in one sentence.")
CALIBRATION_WORDS = (20, 60)  # few enough for a tiny test model's context
DEFAULTS = {"repeats": 3, "concurrency": 16, "system_tokens": 1000, "max_tokens": 32, "turns": 8,
            "conv_system_tokens": 200, "conv_max_tokens": 64, "block_size": 16}


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Reply:
    """One streamed answer as the client saw it; token counts from the server's usage (None: not reported)."""

    ttft_s: float
    latency_s: float
    text: str
    completion_tokens: int
    prompt_tokens: int | None
    cached_tokens: int | None
    retrievals: int


def _cached_of(usage: dict[str, Any] | None) -> int | None:
    """``usage.cached_tokens`` (/generate) or ``usage.prompt_tokens_details.cached_tokens`` (OpenAI), if reported."""
    if not usage:
        return None
    if isinstance(usage.get("cached_tokens"), int):
        return usage["cached_tokens"]
    details = usage.get("prompt_tokens_details") or {}
    return details.get("cached_tokens") if isinstance(details.get("cached_tokens"), int) else None


async def _events(client: httpx.AsyncClient, path: str, body: dict[str, Any]):
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path} answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def generate(client: httpx.AsyncClient, body: dict[str, Any]) -> Reply:
    """A streamed ``/generate``: TTFT at the first ``token`` event; usage from the ``final`` event."""
    t0 = time.perf_counter()
    ttft = None
    final: dict[str, Any] = {}
    async for ev in _events(client, "/generate", {**body, "stream": True}):
        if ev.get("type") == "token" and ttft is None:
            ttft = time.perf_counter() - t0
        elif ev.get("type") == "final":
            final = ev
        elif ev.get("type") == "error":
            raise RuntimeError(ev["error"]["message"])
    usage = final.get("usage") or {}
    return Reply(ttft if ttft is not None else float("nan"), time.perf_counter() - t0, final.get("text", ""),
                 usage.get("completion_tokens", 0), usage.get("prompt_tokens"), _cached_of(usage),
                 len(final.get("retrievals") or []))


async def chat(client: httpx.AsyncClient, body: dict[str, Any]) -> Reply:
    """A streamed ``/v1/chat/completions`` with ``logprobs`` (a chunk per token) and the usage chunk at the end."""
    t0 = time.perf_counter()
    ttft = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    retrievals = 0
    body = {**body, "stream": True, "logprobs": True, "stream_options": {"include_usage": True}}
    async for ev in _events(client, "/v1/chat/completions", body):
        if "error" in ev:
            raise RuntimeError(ev["error"].get("message"))
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices") or []:
            delta = ch.get("delta") or {}
            if ch.get("retrieval"):
                retrievals += 1
            if ch.get("retrieval") or ch.get("logprobs") or delta.get("content"):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
            text.append(delta.get("content") or "")
    return Reply(ttft if ttft is not None else float("nan"), time.perf_counter() - t0, "".join(text),
                 usage.get("completion_tokens", 0), usage.get("prompt_tokens"), _cached_of(usage), retrievals)


# ---------------------------------------------------------------------------------------------- prompts
def system_prompt(seed: str, words: int) -> str:
    """Seeded notes of ``words`` words, opened by a tag of their own, so no two seeds share a KV block."""
    rng = random.Random(seed)
    tag = f"{rng.getrandbits(32):08x}"
    body = [rng.choice(WORDS) for _ in range(words)]
    sentences = [" ".join(body[i:i + 12]).capitalize() + "." for i in range(0, len(body), 12)]
    return f"{tag}: you are a helpful assistant. Keep these notes in mind: " + " ".join(sentences)


def calibrate(url: str, timeout: float) -> float:
    """Tokens per word of ``system_prompt`` for this server's tokenizer (two requests, retrieval off)."""
    counts = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for words in CALIBRATION_WORDS:
            body = {"messages": [{"role": "system", "content": system_prompt("calibrate", words)},
                                 {"role": "user", "content": "Hello."}],
                    "max_tokens": 1, "retrieval": {"enabled": False}}
            r = client.post("/generate", json=body)
            r.raise_for_status()
            counts.append(r.json()["usage"]["prompt_tokens"])
    return max((counts[1] - counts[0]) / (CALIBRATION_WORDS[1] - CALIBRATION_WORDS[0]), 0.1)


def questions() -> list[str]:
    return [row["question"] for row in read_set("knowledge")]


# ---------------------------------------------------------------------------------------------- workloads
def metric_samples(url: str) -> dict[str, tuple[str, float]]:
    """``/metrics`` samples whose names hold ``prefix_cache`` or ``cached``: {name{labels}: (type, value)}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics", timeout=30)
    if r.status_code != 200:
        return {}
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if ("prefix_cache" in s.name or "cached" in s.name) and not s.name.endswith("_created"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[s.name + (f"{{{labels}}}" if labels else "")] = (family.type, s.value)
    return out


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.servers: dict[str, ServerProcess] = {}
        self.flags: dict[str, list[str]] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.bursts: list[dict[str, Any]] = []
        self.conversations: list[dict[str, Any]] = []
        self.metrics: dict[str, dict[str, dict[str, dict[str, Any]]]] = {c: {} for c in CACHES}  # cache, workload
        self.questions = questions()
        self.tokens_per_word = 1.0

    # ------------------------------------------------------------------ servers
    def start(self) -> None:
        a = self.args
        common = ["--block-size", str(a.block_size), "--max-num-seqs", str(max(64, a.concurrency)),
                  "--log-level", "warning", "--log-format", "text", *a.server_arg]
        if a.checkpoint:
            common += ["--checkpoint", str(a.checkpoint)] + (["--index", str(a.index)] if a.index else [])
        if a.dtype:
            common += ["--dtype", a.dtype]
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        for cache in CACHES:
            self.flags[cache] = [*common, "--enable-prefix-caching" if cache == "on" else "--no-enable-prefix-caching"]
            log_path = Path(a.log_dir) / f"onegen-prefix-cache-{os.getpid()}-{cache}.log"
            log(f"starting python -m server {' '.join(self.flags[cache])} (log: {log_path})")
            self.servers[cache] = ServerProcess(self.flags[cache], log_path, env=env)
            if not a.checkpoint:  # the first prepares the default model; the second must find it ready
                self.servers[cache].wait_ready(timeout=a.ready_timeout_s)
        for cache, srv in self.servers.items():
            srv.wait_ready(timeout=a.ready_timeout_s)
            self.info[cache] = httpx.get(srv.url + "/info", timeout=60).json()
        log(f"both ready: {self.info['on'].get('model')} {self.info['on'].get('dtype')} on {self.info['on'].get('device')}")

    def stop(self) -> None:
        for srv in self.servers.values():
            srv.stop()

    def client(self, cache: str) -> httpx.AsyncClient:
        n = self.args.concurrency + 4
        return httpx.AsyncClient(base_url=self.servers[cache].url, timeout=self.args.timeout,
                                 limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))

    def warm_up(self) -> None:
        """Sizes the system prompts (calibration on the server without the cache), and sends both servers the
        calibration requests, so that neither is measured on its first requests."""
        self.tokens_per_word = calibrate(self.servers["off"].url, self.args.timeout)
        calibrate(self.servers["on"].url, self.args.timeout)
        log(f"calibrated: {self.tokens_per_word:.2f} tokens per word of system prompt")

    def words_for(self, tokens: int) -> int:
        return max(1, round(tokens / self.tokens_per_word))

    async def _metrics_before(self, cache: str) -> dict[str, tuple[str, float]]:
        return await asyncio.to_thread(metric_samples, self.servers[cache].url)

    async def _metrics_after(self, cache: str, workload: str, before: dict[str, tuple[str, float]]) -> None:
        """Add the change of the server's /metrics samples since ``before`` to ``self.metrics``, and keep the value
        after (a gauge such as the cached blocks means the latter; an engine count exported as a gauge, the former)."""
        after = await asyncio.to_thread(metric_samples, self.servers[cache].url)
        acc = self.metrics[cache].setdefault(workload, {})
        for name, (kind, value) in after.items():
            row = acc.setdefault(name, {"type": kind, "change": 0.0, "after": 0.0})
            row["change"] += value - before.get(name, (kind, 0.0))[1]
            row["after"] = value

    # ------------------------------------------------------------------ system prompt
    async def burst(self, cache: str, repeat: int, phase: str, system: str, qs: list[str]) -> None:
        a = self.args
        bodies = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                   "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True} for q in qs]
        before = await self._metrics_before(cache)
        async with self.client(cache) as client:
            t0 = time.perf_counter()
            replies = await asyncio.gather(*(generate(client, b) for b in bodies))
            wall = time.perf_counter() - t0
        await self._metrics_after(cache, "system prompt", before)
        row = {"repeat": repeat, "phase": phase, "cache": cache, "wall_s": wall,
               "mean_ttft_s": statistics.fmean(r.ttft_s for r in replies), "max_ttft_s": max(r.ttft_s for r in replies),
               "tokens_per_s": sum(r.completion_tokens for r in replies) / wall,
               "replies": [asdict(r) for r in replies]}
        self.bursts.append(row)
        log(f"  system prompt, {phase}, cache {cache}: mean TTFT {row['mean_ttft_s']:.3f} s, "
            f"{row['tokens_per_s']:.1f} tokens/s, cached {_total(r.cached_tokens for r in replies)} tokens")

    # ------------------------------------------------------------------ conversation
    async def conversation(self, cache: str, repeat: int, system: str, turns: list[str]) -> None:
        a = self.args
        messages = [{"role": "system", "content": system}]
        out = []
        async with self.client(cache) as client:
            for i, user in enumerate(turns):
                messages.append({"role": "user", "content": user})
                body = {"messages": messages, "max_tokens": a.conv_max_tokens, "temperature": 0}
                before = await self._metrics_before(cache)
                reply = await chat(client, body)
                await self._metrics_after(cache, "conversation", before)
                messages.append({"role": "assistant", "content": reply.text})
                out.append({"turn": i + 1, **asdict(reply)})
        self.conversations.append({"repeat": repeat, "cache": cache, "turns": out})
        last = out[-1]
        log(f"  conversation, cache {cache}: last turn TTFT {last['ttft_s']:.3f} s, prompt {last['prompt_tokens']} "
            f"tokens, cached {last['cached_tokens']}")

    def conversation_turns(self, repeat: int) -> list[str]:
        """Knowledge questions after those of the bursts, each repeat its own, and every third turn a follow-up."""
        a = self.args
        n_knowledge = sum(1 for i in range(a.turns) if (i + 1) % 3)
        qs = iter(self._take(2 * a.repeats * a.concurrency + repeat * n_knowledge, n_knowledge))
        return [next(qs) if (i + 1) % 3 else FOLLOW_UPS[(i // 3) % len(FOLLOW_UPS)] for i in range(a.turns)]

    def _take(self, start: int, n: int) -> list[str]:
        return [self.questions[(start + i) % len(self.questions)] for i in range(n)]

    # ------------------------------------------------------------------ the run
    async def run(self) -> None:
        a = self.args
        for repeat in range(a.repeats):
            order = CACHES if repeat % 2 == 0 else CACHES[::-1]
            log(f"repeat {repeat + 1} of {a.repeats} ({' first, then '.join(order)})")
            system = system_prompt(f"burst-{repeat}", self.words_for(a.system_tokens))
            cold = self._take(2 * repeat * a.concurrency, a.concurrency)
            warm = self._take((2 * repeat + 1) * a.concurrency, a.concurrency)
            for cache in order:
                await self.burst(cache, repeat, "cold", system, cold)
                await self.burst(cache, repeat, "warm", system, warm)
            conv_system = system_prompt(f"conversation-{repeat}", self.words_for(a.conv_system_tokens))
            turns = self.conversation_turns(repeat)
            for cache in order:
                await self.conversation(cache, repeat, conv_system, turns)


def _total(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# ---------------------------------------------------------------------------------------------- summary
def summarize(bench: Bench) -> dict[str, Any]:
    a = bench.args
    out: dict[str, Any] = {"system_prompt": {}, "conversation": {"turns": []}, "targets": []}
    for phase in ("cold", "warm"):
        rows = {c: [b for b in bench.bursts if b["phase"] == phase and b["cache"] == c] for c in CACHES}
        s: dict[str, Any] = {}
        for c in CACHES:
            replies = [r for b in rows[c] for r in b["replies"]]
            s[c] = {"mean_ttft_s": spread([b["mean_ttft_s"] for b in rows[c]]),
                    "max_ttft_s": spread([b["max_ttft_s"] for b in rows[c]]),
                    "tokens_per_s": spread([b["tokens_per_s"] for b in rows[c]]),
                    "prompt_tokens": _mean_or_none([r["prompt_tokens"] for r in replies]),
                    "cached_tokens": _mean_or_none([r["cached_tokens"] for r in replies]),
                    "retrievals": statistics.fmean(r["retrievals"] for r in replies)}
        s["ttft_ratio"] = s["off"]["mean_ttft_s"]["median"] / s["on"]["mean_ttft_s"]["median"]
        s["throughput_ratio"] = s["on"]["tokens_per_s"]["median"] / s["off"]["tokens_per_s"]["median"]
        pairs = [(x["text"], y["text"]) for bo, bn in zip(rows["off"], rows["on"], strict=True)
                 for x, y in zip(bo["replies"], bn["replies"], strict=True)]
        s["same_text"] = [sum(x == y for x, y in pairs), len(pairs)]
        out["system_prompt"][phase] = s
    convs = {c: [v for v in bench.conversations if v["cache"] == c] for c in CACHES}
    for t in range(a.turns):
        row: dict[str, Any] = {"turn": t + 1}
        for c in CACHES:
            turns = [v["turns"][t] for v in convs[c]]
            row[c] = {"ttft_s": spread([x["ttft_s"] for x in turns]),
                      "prompt_tokens": _mean_or_none([x["prompt_tokens"] for x in turns]),
                      "cached_tokens": _mean_or_none([x["cached_tokens"] for x in turns]),
                      "retrievals": statistics.fmean(x["retrievals"] for x in turns)}
        # the decision's floor: every full block of the previous turn's prompt (docs/prefix-caching.md)
        prev = [v["turns"][t - 1]["prompt_tokens"] for v in convs["on"]] if t else [0]
        row["expected_cached_min"] = (None if any(p is None for p in prev)
                                      else statistics.fmean(p // a.block_size * a.block_size for p in prev))
        row["ttft_ratio"] = row["off"]["ttft_s"]["median"] / row["on"]["ttft_s"]["median"]
        out["conversation"]["turns"].append(row)
    pairs = [(x["text"], y["text"]) for vo, vn in zip(convs["off"], convs["on"], strict=True)
             for x, y in zip(vo["turns"], vn["turns"], strict=True)]
    out["conversation"]["same_text"] = [sum(x == y for x, y in pairs), len(pairs)]
    cold, last = out["system_prompt"]["cold"], out["conversation"]["turns"][-1]
    out["targets"] = [
        {"target": f"{a.concurrency} requests sharing a {a.system_tokens}-token system prompt (cold): mean TTFT "
                   "at least 3x better", "value": cold["ttft_ratio"], "pass": cold["ttft_ratio"] >= 3.0},
        {"target": f"{a.concurrency} requests sharing a {a.system_tokens}-token system prompt (cold): throughput "
                   "at least 1.5x", "value": cold["throughput_ratio"],
         "pass": cold["throughput_ratio"] >= 1.5},
        {"target": f"{a.turns}-turn conversation resent every turn: last turn's TTFT at least 3x better",
         "value": last["ttft_ratio"], "pass": last["ttft_ratio"] >= 3.0},
    ]
    return out


def _mean_or_none(values: list[int | None]) -> float | None:
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def _s(x: dict[str, float], digits: int = 3) -> str:
    return f"{x['median']:.{digits}f} ({x['min']:.{digits}f} / {x['max']:.{digits}f})"


def _n(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def render_markdown(bench: Bench, summary: dict[str, Any], meta: dict[str, Any]) -> str:
    a, info = bench.args, bench.info["on"]
    m = meta["machine"]
    lines = [
        "# Prefix caching through a real server (`bench/prefix_cache.py`)",
        "",
        f"{meta['date']}; {m['cpu']}, {m['cores']} cores; model **{info.get('model')}** (`{info.get('checkpoint')}`), "
        f"{info.get('dtype')} on {info.get('device')}; runtime {meta['runtime_s']:.0f} s; {a.repeats} repeats, "
        "alternating which server is measured first.",
        "",
        f"Servers: `python -m server {' '.join(bench.flags['on'])}` and the same with "
        "`--no-enable-prefix-caching`, on 127.0.0.1, both up for the whole run.",
        "",
        f"Load before: `{meta['load_start']}`; after: `{meta['load_end']}` (other jobs may have shared the CPU).",
        "",
        "Cells: median over the repeats (min / max). TTFT: send to the first token event, measured by the client; "
        "throughput: generated tokens over the burst's wall time; cached: prompt tokens the server says it served "
        "from the prefix cache (n/a: not reported).",
        "",
        f"## {a.concurrency} concurrent requests sharing a {a.system_tokens:,}-token system prompt",
        "",
        f"Streamed `/generate` chat requests (system prompt + a distinct question), greedy, EOS ignored, "
        f"{a.max_tokens} tokens each. Cold: a system prompt not sent before; warm: sent again with other questions.",
        "",
        "| burst | cache | prompt tokens / request | cached / request | mean TTFT s | slowest TTFT s | "
        "generated tokens/s | retrievals / request |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in ("cold", "warm"):
        s = summary["system_prompt"][phase]
        for c in CACHES:
            x = s[c]
            lines.append(f"| {phase} | {c} | {_n(x['prompt_tokens'])} | {_n(x['cached_tokens'])} | "
                         f"{_s(x['mean_ttft_s'])} | {_s(x['max_ttft_s'])} | {_s(x['tokens_per_s'], 1)} | "
                         f"{x['retrievals']:.2f} |")
        lines.append(f"| {phase} | **on vs off** | | | **{s['ttft_ratio']:.2f}x** | | "
                     f"**{s['throughput_ratio']:.2f}x** | same text {s['same_text'][0]}/{s['same_text'][1]} |")
    conv = summary["conversation"]
    lines += [
        "",
        f"## A {a.turns}-turn conversation, resent every turn",
        "",
        f"Streamed `/v1/chat/completions`: a {a.conv_system_tokens}-token system message, knowledge questions and "
        f"every third turn a follow-up; greedy, at most {a.conv_max_tokens} tokens per answer; each turn resends "
        "the conversation with the answers as they came back. *At least*: the cache the conversation decision "
        f"implies (`docs/prefix-caching.md`), every full {a.block_size}-token block of the previous turn's prompt. "
        f"Same text on both servers: {conv['same_text'][0]}/{conv['same_text'][1]} answers.",
        "",
        "| turn | prompt tokens | cached (on) | at least | retrievals (on) | TTFT off s | TTFT on s | off / on |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in conv["turns"]:
        lines.append(f"| {row['turn']} | {_n(row['on']['prompt_tokens'])} | {_n(row['on']['cached_tokens'])} | "
                     f"{_n(row['expected_cached_min'])} | {row['on']['retrievals']:.2f} | {_s(row['off']['ttft_s'])} | "
                     f"{_s(row['on']['ttft_s'])} | {row['ttft_ratio']:.2f}x |")
    lines += ["", "## Targets (issue #21)", ""]
    for t in summary["targets"]:
        lines.append(f"- {'PASS' if t['pass'] else '**MISS**'}: {t['target']}: {t['value']:.2f}x")
    lines += ["", "## Server counters (`/metrics`, names holding `prefix_cache` or `cached`)", ""]
    if not any(bench.metrics[c] for c in CACHES):
        lines.append("None reported by this server.")
    for c in CACHES:
        for workload, samples in bench.metrics[c].items():
            if samples:
                text = ", ".join(f"`{k}` {v['change']:+,.0f} (then {v['after']:,.0f})" for k, v in sorted(samples.items()))
                lines.append(f"- cache {c}, {workload}: {text}")
    lines += ["", "Each: its change over the workload's requests (summed over the repeats), then its value after the "
              f"last one. Every request is in `{Path(a.out).name}.json`."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    phases = ("cold", "warm")
    for k, c in enumerate(CACHES):
        med = [summary["system_prompt"][p][c]["mean_ttft_s"]["median"] for p in phases]
        lo = [m - summary["system_prompt"][p][c]["mean_ttft_s"]["min"] for p, m in zip(phases, med, strict=True)]
        hi = [summary["system_prompt"][p][c]["mean_ttft_s"]["max"] - m for p, m in zip(phases, med, strict=True)]
        left.bar([i + 0.4 * k for i in range(2)], med, 0.4, yerr=[lo, hi], capsize=4, label=f"cache {c}")
    left.set_xticks([0.2, 1.2], [f"{p} system prompt" for p in phases])
    left.set_ylabel("mean time to first token (s)")
    left.set_title("concurrent requests sharing a system prompt", fontsize=9)
    turns = summary["conversation"]["turns"]
    for c in CACHES:
        xs = [t["turn"] for t in turns]
        med = [t[c]["ttft_s"]["median"] for t in turns]
        right.errorbar(xs, med, yerr=[[m - t[c]["ttft_s"]["min"] for m, t in zip(med, turns, strict=True)],
                                      [t[c]["ttft_s"]["max"] - m for m, t in zip(med, turns, strict=True)]],
                       marker="o", capsize=3, label=f"cache {c}")
    right.set_xticks([t["turn"] for t in turns])
    right.set_ylim(bottom=0)
    right.set_xlabel("turn")
    right.set_ylabel("time to first token (s)")
    right.set_title("a conversation resent every turn", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_served_model_args(p, "index to serve with --checkpoint (default: none, no retrieval)")
    p.add_argument("--block-size", type=int, default=DEFAULTS["block_size"],
                   help="server --block-size, both servers (default: 16, the engine's)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for both servers, repeatable (e.g. --server-arg=--max-num-batched-tokens "
                        "--server-arg=1024)")
    p.add_argument("--quick", action="store_true", help="2 repeats instead of 3 (results/quick/)")
    p.add_argument("--repeats", type=int, help="repeats of every workload on both servers (default: 3; --quick 2)")
    p.add_argument("--concurrency", type=int, default=DEFAULTS["concurrency"],
                   help="requests of one system-prompt burst, sent at once (default: 16)")
    p.add_argument("--system-tokens", type=int, default=DEFAULTS["system_tokens"],
                   help="tokens of the shared system prompt (default: 1000)")
    p.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"],
                   help="tokens generated per burst request, EOS ignored (default: 32)")
    p.add_argument("--turns", type=int, default=DEFAULTS["turns"], help="turns of the conversation (default: 8)")
    p.add_argument("--conv-system-tokens", type=int, default=DEFAULTS["conv_system_tokens"],
                   help="tokens of the conversation's system message (default: 200)")
    p.add_argument("--conv-max-tokens", type=int, default=DEFAULTS["conv_max_tokens"],
                   help="most tokens per answer of the conversation (default: 64)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per request (default: 900)")
    p.add_argument("--ready-timeout-s", type=float, default=900.0,
                   help="seconds a server may take to start, the default model's first preparation included")
    p.add_argument("--log-dir", default="/tmp", help="where the servers' logs go (default: /tmp)")
    p.add_argument("--out", help="writes OUT.md, OUT.json and OUT.png (default: bench/results/prefix_cache for the "
                   "report, the default model with the default sizes and server flags, not --quick; else "
                   "bench/results/quick/prefix_cache, git-ignored)")
    args = p.parse_args(argv)
    if args.index and not args.checkpoint:
        p.error("--index needs --checkpoint")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    for name in ("repeats", "concurrency", "system_tokens", "max_tokens", "turns", "conv_system_tokens",
                 "conv_max_tokens", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.out is None:
        report = (not args.checkpoint and not args.dtype and not args.server_arg and not args.quick
                  and args.repeats >= DEFAULTS["repeats"]
                  and all(getattr(args, k) == v for k, v in DEFAULTS.items() if k != "repeats"))
        args.out = str((RESULTS if report else QUICK_RESULTS) / "prefix_cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                            "machine": {"cpu": cpu_name(platform.processor() or "?"), "cores": os.cpu_count(),
                                        "python": platform.python_version()},
                            "load_start": _uptime()}
    bench = Bench(args)
    try:
        bench.start()
        bench.warm_up()
        asyncio.run(bench.run())
    finally:
        bench.stop()
    meta["runtime_s"] = time.perf_counter() - t0
    meta["load_end"] = _uptime()
    summary = summarize(bench)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = bench.info["on"]
    plot(summary, out.with_suffix(".png"), f"prefix caching: {info.get('model')}, {info.get('dtype')} on "
         f"{info.get('device')}; {meta['machine']['cpu']}, {meta['machine']['cores']} cores")
    result = {**meta, "args": plain_args(args),
              "servers": {c: {"flags": bench.flags[c], "info": bench.info[c]} for c in CACHES},
              "tokens_per_word": bench.tokens_per_word, "summary": summary, "metrics": bench.metrics,
              "bursts": bench.bursts, "conversations": bench.conversations}
    write_report(out, render_markdown(bench, summary, meta), result, also=" and .png")
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
