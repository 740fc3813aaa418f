"""A corpus that changes under load (issue #20): streaming clients against a real server while
``python -m index_builder update`` publishes new versions of its index, and how soon each is visible.

    python bench/index_updates.py               # the default model (`python -m server` prepares it): the report
    python bench/index_updates.py --quick       # 15 s and 3 updates (results/quick/)
    python bench/index_updates.py --checkpoint CKPT --index IDX [--dtype D]   # another model (results/quick/)

One ``python -m server`` on 127.0.0.1 serves a copy of the index in a scratch directory (the original is
never changed) and polls it every ``--index-poll-s`` (0.25 s). ``--clients`` (8) clients each send
streamed ``/generate`` chat requests one after another (knowledge questions from
``bench/quality_sets/knowledge.jsonl``, greedy, EOS ignored, ``--max-tokens`` (64), retrieval as the
model decides) for ``--duration`` (60 s). Meanwhile ``--updates`` (5) updates run, started at even
intervals (update j at j x duration / (updates + 1); one starts only after the one before it is
visible), each with the command a user runs, ``python -m index_builder update --index COPY --checkpoint
CKPT --corpus CHANGES.jsonl [--delete IDS.txt] --keep K``, in a subprocess (its wall time includes the
interpreter's start and the checkpoint's load). Every update adds a document holding a nonsense word of
its own; the even ones also replace an existing single-passage document (its text plus another new word),
the third ones (3, 6, ...) also delete the document the update before added.

**Publish** is the moment ``CURRENT`` names the new version (the copy's ``CURRENT`` is read every 10 ms
while the update runs; ``update`` switches it with an atomic rename). From then on ``/retrieve`` is
probed every ``--probe-interval-s`` (0.05 s) until every change of the update shows: the added document
is returned, the replaced one is returned with its new text, the deleted one is not. Queries: with
``mode: hybrid`` where the index has a BM25 side index and the server accepts ``mode`` (checked at
start), each changed document's nonsense word; else (dense) the document's own text, so that it ranks
first. **Visible after** = the probe that first saw every change, less the publish time.

Requests are counted as in ``bench/hostile.py`` (``hostile_outcomes.classify``): ok = ``final`` event then
``[DONE]``; clean error = a documented JSON error (an SSE ``error`` event, or a 4xx/5xx JSON body) with
an X-Request-Id; lost = anything else (a stream cut without its final event, a reset, a timeout, an
undocumented 5xx). Also reported: generated tokens per second (the ``final`` events' completion tokens
over the load's wall time), ``onegen_index_reloads_total`` from ``/metrics`` (its change over the run, by
result), and the versions ``/info`` showed (read every 0.2 s; ``plain``: a directory without versions, which
the first update turns into version 1 and publishes as 2). Targets (issue #20): no request failed or
lost (clean errors count as failed: nothing here should refuse one), every update visible within
``--target-s`` (2 s) of publishing; each printed PASS or MISS. The exit status is 0 once the run is
done, whatever the targets; 1 if an update fails.

Output: the tables on stdout and ``OUT.md`` / ``OUT.json``; ``OUT`` is ``bench/results/index_updates``
for the report (the default model, every default size, not ``--quick``), else
``bench/results/quick/index_updates``.
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
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "server"))  # the test suite's launcher of `python -m server`

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
from server_harness import ServerProcess  # noqa: E402

DEFAULTS = {"duration": 60.0, "updates": 5, "clients": 8, "max_tokens": 64}
QUICK = {"duration": 15.0, "updates": 3, "max_tokens": 32}
VISIBLE_TIMEOUT_S = 60.0  # a change not visible this long after publishing is reported as never seen
CURRENT_POLL_S = 0.01


# ---------------------------------------------------------------------------------------------- the changes
def nonsense_word(rng: random.Random) -> str:
    """A lower-case word of five syllables: one token to BM25, in no corpus."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(5)) + rng.choice("nrsx")


@dataclass
class Change:
    """One document an update touches, and how a probe recognises that the change is served."""

    kind: str  # add | replace | delete
    doc_id: str
    text: str  # the new text (add, replace) or the deleted document's (delete)
    word: str  # the nonsense word the new text holds (delete: the one the deleted document held, if any)

    def query(self, hybrid: bool) -> str:
        return self.word if hybrid and self.word else self.text

    def seen(self, hits: list[dict[str, Any]]) -> bool:
        mine = [h for h in hits if _is_doc(h.get("doc_id", ""), self.doc_id)]
        if self.kind == "delete":
            return not mine
        return any(self.word in (h.get("text") or "") for h in mine)


def _is_doc(hit_id: str, doc_id: str) -> bool:
    """A hit of document ``doc_id``: itself, or one of its chunks (``id#k``) or units (``id-k``)."""
    return hit_id == doc_id or hit_id.startswith((doc_id + "#", doc_id + "-"))


@dataclass
class Update:
    number: int
    changes: list[Change]
    corpus: Path
    delete: Path | None
    started_s: float | None = None  # seconds since the load began
    wall_s: float | None = None  # the subprocess, start to exit
    published_s: float | None = None  # CURRENT switched (seconds since the load began)
    exited_after_publish_s: float | None = None
    visible_after_s: float | None = None  # from publishing (None: never, within VISIBLE_TIMEOUT_S)
    version: str | None = None  # what CURRENT named
    probes: int = 0
    info_version_when_visible: int | None = None


def single_passage_documents(index: Path, n: int) -> list[tuple[str, str, str | None]]:
    """(document id, text, title) of the first ``n`` documents stored as one passage (a document of several
    chunks or units is replaced whole by ``update``: its replacement would change more than one passage)."""
    from onegen_core.formats.index_store import DOCSTORE, resolve_version

    con = sqlite3.connect(f"file:{resolve_version(index)[0] / DOCSTORE}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT COALESCE(source, doc_id) AS d, MIN(text), MIN(title) FROM documents GROUP BY d "
                           "HAVING COUNT(*) = 1 ORDER BY MIN(vector_id) LIMIT ?", (n,)).fetchall()
    finally:
        con.close()
    return [(d, text, title) for d, text, title in rows]


def plan_updates(index: Path, work: Path, n: int, seed: int) -> list[Update]:
    """``n`` updates: each adds a document; even ones replace one, every third deletes the previous one's."""
    rng = random.Random(seed)
    targets = iter(single_passage_documents(index, n))
    updates: list[Update] = []
    for j in range(1, n + 1):
        word = nonsense_word(rng)
        changes = [Change("add", f"bench-update-{seed}-{j}", f"The {word} is a small bronze instrument first made "
                          f"in the hill towns; update {j} of the index bench added this passage.", word)]
        records = [{"id": changes[0].doc_id, "title": f"The {word}", "text": changes[0].text}]
        if j % 2 == 0:
            target = next(targets, None)
            if target is not None:
                doc_id, text, title = target
                new_word = nonsense_word(rng)
                new_text = f"{text} Correction of update {j}: also called {new_word}."
                changes.append(Change("replace", doc_id, new_text, new_word))
                records.append({"id": doc_id, "title": title, "text": new_text})
        delete = None
        if j % 3 == 0 and updates:
            gone = updates[-1].changes[0]
            changes.append(Change("delete", gone.doc_id, gone.text, gone.word))
            delete = work / f"delete-{j}.txt"
            delete.write_text(gone.doc_id + "\n")
        corpus = work / f"changes-{j}.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
        updates.append(Update(j, changes, corpus, delete))
    return updates


# ---------------------------------------------------------------------------------------------- the bench
@dataclass
class Sent:
    t0: float
    category: str
    why: str
    completion_tokens: int = 0


@dataclass
class Run:
    sent: list[Sent] = field(default_factory=list)
    versions: list[tuple[float, int | None]] = field(default_factory=list)  # (seconds since the load began, /info)
    load_s: float = 0.0


def _completion_tokens(o: Outcome) -> int:
    final = next((e for e in reversed(o.events) if isinstance(e, dict) and e.get("type") == "final"), {})
    return int((final.get("usage") or {}).get("completion_tokens") or 0)


def read_current(index: Path) -> str | None:
    try:
        return (index / "CURRENT").read_text().strip() or None
    except OSError:
        return None


def reload_counts(url: str) -> dict[str, float]:
    """``onegen_index_reloads_total`` of the default index, by result."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == "onegen_index_reloads_total" and s.labels.get("index", "default") == "default":
                out[s.labels.get("result", "?")] = out.get(s.labels.get("result", "?"), 0.0) + s.value
    return out


def default_index_info(url: str) -> dict[str, Any]:
    info = httpx.get(url + "/info", timeout=30).json()
    return next((i for i in info.get("indexes") or [] if i.get("name") == "default"), info.get("index") or {})


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.questions = [row["question"] for row in read_set("knowledge")]
        self.checkpoint, self.source_index, self.dtype = served_model(self.args)
        self.index = work / "index"
        log(f"copying the index {self.source_index} to {self.index} (the original is never changed)")
        shutil.copytree(self.source_index, self.index, symlinks=True)
        self.updates = plan_updates(self.index, work, args.updates, seed=args.seed)
        self.info: dict[str, Any] = {}
        self.hybrid = False
        self.run_ = Run()
        self.reloads: dict[str, dict[str, float]] = {}

    def start_server(self) -> ServerProcess:
        a = self.args
        flags = ["--checkpoint", str(self.checkpoint), "--index", str(self.index), "--index-poll-s", str(a.index_poll_s),
                 "--max-tokens-limit", str(max(4096, a.max_tokens)), "--max-num-seqs", str(max(16, a.clients)),
                 "--log-level", "warning", "--log-format", "json", *(["--dtype", self.dtype] if self.dtype else []),
                 *a.server_arg]
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if a.threads:
            env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        log_path = Path(a.log_dir) / f"onegen-index-updates-{os.getpid()}.log"
        log(f"server on a copy of the index, polled every {a.index_poll_s:g} s (log: {log_path})")
        srv = ServerProcess(flags, log_path, env=env)
        srv.wait_ready(timeout=a.ready_timeout_s)
        return srv

    def check_hybrid(self, url: str) -> bool:
        """Whether the served index has a BM25 side index and ``/retrieve`` accepts ``mode: hybrid``."""
        if not default_index_info(url).get("bm25"):
            return False
        r = httpx.post(url + "/retrieve", json={"queries": "probe", "k": 1, "mode": "hybrid"}, timeout=60)
        return r.status_code == 200

    # ------------------------------------------------------------------ load
    def generate_body(self, i: int) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": self.questions[i % len(self.questions)]}],
                "max_tokens": self.args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}

    async def client_loop(self, client: httpx.AsyncClient, who: int, stop: asyncio.Event, t_load: float) -> None:
        i = who
        while not stop.is_set():
            t0 = time.monotonic() - t_load
            o = await call(client, "POST", "/generate", label="stream", kind="sse", json_body=self.generate_body(i),
                           hung_s=self.args.timeout)
            category, why = classify(o)
            if category not in ("ok", "clean"):
                category, why = "lost", f"{category}: {why}"
            self.run_.sent.append(Sent(t0, category, why, _completion_tokens(o) if category == "ok" else 0))
            i += self.args.clients

    async def watch_versions(self, url: str, stop: asyncio.Event, t_load: float) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while not stop.is_set():
                try:
                    info = (await client.get("/info")).json()
                    idx = next((x for x in info.get("indexes") or [] if x.get("name") == "default"), info.get("index"))
                    v = (idx or {}).get("version")
                    if not self.run_.versions or self.run_.versions[-1][1] != v:
                        self.run_.versions.append((time.monotonic() - t_load, v))
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ one update
    async def publish(self, u: Update, t_load: float) -> None:
        a = self.args
        cmd = [sys.executable, "-m", "index_builder", "update", "--index", str(self.index), "--checkpoint",
               str(self.checkpoint), "--corpus", str(u.corpus), *(["--delete", str(u.delete)] if u.delete else []),
               "--keep", str(a.keep), "--quiet"]
        before = read_current(self.index)
        t0 = time.monotonic()
        u.started_s = t0 - t_load
        log(f"  update {u.number}: {', '.join(f'{c.kind} {c.doc_id}' for c in u.changes)}")
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, cwd=REPO)
        output = asyncio.create_task(proc.communicate())
        published = None
        while published is None and not output.done():
            now = read_current(self.index)
            if now is not None and now != before:
                published, u.version = time.monotonic(), now
                break
            await asyncio.sleep(CURRENT_POLL_S)
        probe = asyncio.create_task(self.probe(u, published)) if published is not None else None
        out, _ = await output
        exited = time.monotonic()
        u.wall_s = exited - t0
        if proc.returncode != 0:
            if probe is not None:
                probe.cancel()
            raise RuntimeError(f"update {u.number} failed ({proc.returncode}): {out.decode()[-3000:]}")
        if published is None:  # switched between two reads and the exit: the exit is the latest it can have been
            now = read_current(self.index)
            if now is None or now == before:
                raise RuntimeError(f"update {u.number} exited 0 but CURRENT still names {before}")
            published, u.version = exited, now
            probe = asyncio.create_task(self.probe(u, published))
        u.published_s = published - t_load
        u.exited_after_publish_s = exited - published
        await probe
        log(f"  update {u.number}: version {u.version}, {u.wall_s:.1f} s; visible "
            + (f"{u.visible_after_s:.2f} s after publishing" if u.visible_after_s is not None else "NEVER"))

    async def probe(self, u: Update, published: float) -> None:
        """``/retrieve`` every ``--probe-interval-s`` until every change of ``u`` shows (or VISIBLE_TIMEOUT_S)."""
        a = self.args
        queries = list(dict.fromkeys(c.query(self.hybrid) for c in u.changes))
        body: dict[str, Any] = {"queries": queries, "k": a.probe_k, "return_text": True}
        if self.hybrid:
            body["mode"] = "hybrid"
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            while time.monotonic() - published < VISIBLE_TIMEOUT_S:
                u.probes += 1
                try:
                    r = await client.post("/retrieve", json=body)
                    if r.status_code == 200:
                        hits = {res["query"]: res["hits"] for res in r.json()["results"]}
                        if all(c.seen(hits.get(c.query(self.hybrid), [])) for c in u.changes):
                            u.visible_after_s = time.monotonic() - published
                            info = (await client.get("/info")).json()
                            u.info_version_when_visible = next(
                                (x for x in info.get("indexes") or [] if x.get("name") == "default"),
                                info.get("index") or {}).get("version")
                            return
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                await asyncio.sleep(a.probe_interval_s)

    # ------------------------------------------------------------------ the run
    async def scenario(self) -> None:
        a = self.args
        stop, stop_watch = asyncio.Event(), asyncio.Event()
        n = a.clients + 2
        async with httpx.AsyncClient(base_url=self.url, timeout=a.timeout,
                                     limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)) as client:
            warm = dict(self.generate_body(0), max_tokens=4)
            await call(client, "POST", "/generate", label="warm", kind="sse", json_body=warm, hung_s=a.timeout)
            t_load = time.monotonic()
            watcher = asyncio.create_task(self.watch_versions(self.url, stop_watch, t_load))
            clients = [asyncio.create_task(self.client_loop(client, w, stop, t_load)) for w in range(a.clients)]
            try:
                for u in self.updates:
                    due = t_load + u.number * a.duration / (a.updates + 1)
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    await self.publish(u, t_load)
                await asyncio.sleep(max(0.0, t_load + a.duration - time.monotonic()))
            finally:
                stop.set()
                await asyncio.gather(*clients)  # every request in flight runs to its end and is counted
                self.run_.load_s = time.monotonic() - t_load
                stop_watch.set()
                await watcher

    def run(self) -> None:
        srv = self.start_server()
        self.url = srv.url
        try:
            self.info = httpx.get(srv.url + "/info", timeout=60).json()
            self.hybrid = self.check_hybrid(srv.url)
            log(f"probes: {'hybrid (the nonsense word)' if self.hybrid else 'dense (the document text)'}; "
                f"{self.args.clients} clients for {self.args.duration:g} s, {self.args.updates} updates")
            self.reloads["before"] = reload_counts(srv.url)
            asyncio.run(self.scenario())
            self.reloads["after"] = reload_counts(srv.url)
            self.final_info = default_index_info(srv.url)
        finally:
            srv.stop()


# ---------------------------------------------------------------------------------------------- report
def summarize(bench: Bench) -> dict[str, Any]:
    a, sent = bench.args, bench.run_.sent
    ok = [s for s in sent if s.category == "ok"]
    tokens = sum(s.completion_tokens for s in ok)
    before, after = bench.reloads.get("before", {}), bench.reloads.get("after", {})
    reloads = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(set(before) | set(after))}
    visible = [u.visible_after_s for u in bench.updates]
    return {"requests": len(sent), "ok": len(ok), "clean": sum(s.category == "clean" for s in sent),
            "lost": sum(s.category == "lost" for s in sent), "tokens": tokens, "load_s": bench.run_.load_s,
            "tokens_per_s": tokens / bench.run_.load_s if bench.run_.load_s else 0.0,
            "reloads": reloads, "versions_seen": [v for _, v in bench.run_.versions],
            "final_version": bench.final_info.get("version"), "final_size": bench.final_info.get("size"),
            "visible_max_s": max((v for v in visible if v is not None), default=None),
            "pass_requests": len(ok) == len(sent) and len(sent) > 0,
            "pass_visible": all(v is not None and v <= a.target_s for v in visible),
            "not_ok": [asdict(s) for s in sent if s.category != "ok"][:50]}


def _s(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def render(bench: Bench, summary: dict[str, Any], meta: dict[str, Any]) -> str:
    a, s = bench.args, summary
    info = bench.info
    idx = info.get("index") or {}
    mode = "hybrid, the nonsense word" if bench.hybrid else "dense, the document's text"
    verdict = {True: "PASS", False: "MISS"}
    lines = [f"# Index updates under load ({meta['date']})", "",
             f"{info.get('model')} ({info.get('dtype')} on {info.get('device')}), index {idx.get('type')} of "
             f"{idx.get('size')} passages (BM25 side index: {'yes' if idx.get('bm25') else 'no'}); "
             f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores. Load average before: {meta['load_start']}; "
             f"after: {meta['load_end']}.", "",
             f"{a.clients} clients stream `/generate` ({a.max_tokens} tokens, EOS ignored) for {a.duration:g} s while "
             f"`python -m index_builder update` publishes {a.updates} versions of a copy of the index; the server polls "
             f"`CURRENT` every {a.index_poll_s:g} s; `/retrieve` probed every {a.probe_interval_s * 1000:.0f} ms "
             f"({mode}, k={a.probe_k}) from publishing until every change shows.", "",
             "| clients | load s | requests | ok | clean errors | lost | tokens/s | reloads (/metrics) | versions seen |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
             f"| {a.clients} | {s['load_s']:.1f} | {s['requests']} | {s['ok']} | {s['clean']} | {s['lost']} | "
             f"{s['tokens_per_s']:.1f} | {', '.join(f'{k} {v:g}' for k, v in s['reloads'].items()) or 'none'} | "
             f"{' -> '.join('plain' if v is None else str(v) for v in s['versions_seen'])} |", "",
             "| update | changes | started at s | update wall s | published at s | exit after publish s "
             "| visible after publish s | probes | version |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for u in bench.updates:
        changes = ", ".join(f"{c.kind} `{c.doc_id}`" for c in u.changes)
        lines.append(f"| {u.number} | {changes} | {_s(u.started_s, 1)} | {_s(u.wall_s)} | {_s(u.published_s, 1)} | "
                     f"{_s(u.exited_after_publish_s)} | {_s(u.visible_after_s)} | {u.probes} | "
                     f"{u.version} (/info: {u.info_version_when_visible}) |")
    lines += ["", f"- **{verdict[s['pass_requests']]}** no request failed or lost: {s['ok']} of {s['requests']} ok, "
              f"{s['clean']} clean errors, {s['lost']} lost.",
              f"- **{verdict[s['pass_visible']]}** every update visible to `/retrieve` within {a.target_s:g} s of "
              f"publishing: at most {_s(s['visible_max_s'])} s.",
              "", f"Final version {s['final_version']} ({s['final_size']} passages). Runtime {meta['runtime_s']:.0f} s. "
              f"Every update and request count is in `{Path(a.out).name}.json`."]
    if s["not_ok"]:
        lines += ["", "Not ok: " + "; ".join(f"{x['category']} ({x['why']})" for x in s["not_ok"][:10])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_served_model_args(p, "its index (copied to a scratch directory: never changed); needed with --checkpoint")
    p.add_argument("--quick", action="store_true", help="a shorter run: " + ", ".join(
        f"--{k.replace('_', '-')} {v:g}" for k, v in QUICK.items()) + " (results/quick/)")
    p.add_argument("--duration", type=float, help=f"seconds of load (default: {DEFAULTS['duration']:g}); it goes on "
                   "until the last update is visible")
    p.add_argument("--updates", type=int, help=f"index updates during the load (default: {DEFAULTS['updates']})")
    p.add_argument("--clients", type=int, help=f"streaming clients at once (default: {DEFAULTS['clients']})")
    p.add_argument("--max-tokens", type=int, help=f"tokens per request, EOS ignored (default: {DEFAULTS['max_tokens']})")
    p.add_argument("--index-poll-s", type=float, default=0.25, help="the server's --index-poll-s (default: 0.25)")
    p.add_argument("--probe-interval-s", type=float, default=0.05,
                   help="seconds between /retrieve probes after a publish (default: 0.05)")
    p.add_argument("--probe-k", type=int, default=10, help="k of the probes (default: 10)")
    p.add_argument("--target-s", type=float, default=2.0, help="seconds from publishing within which each update "
                   "must be visible (default: 2, issue #20)")
    p.add_argument("--keep", type=int, default=3, help="update's --keep: versions kept (default: 3, update's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the nonsense words (default: 0)")
    p.add_argument("--threads", type=int, help="the server's OMP/MKL threads (default: the server's own)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more server argument, repeatable (e.g. --server-arg=--max-num-seqs --server-arg=32)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request (default: 600)")
    p.add_argument("--ready-timeout-s", type=float, default=900.0, help="seconds the server may take to start")
    p.add_argument("--log-dir", default="/tmp", help="where the server's log goes (default: /tmp)")
    p.add_argument("--out", help="writes OUT.md and OUT.json (default: bench/results/index_updates for the report: "
                   "the default model, default sizes, not --quick; else bench/results/quick/index_updates)")
    a = p.parse_args(argv)
    if a.checkpoint and not a.index:
        p.error("--checkpoint needs --index")
    if a.index and not a.checkpoint:
        p.error("--index needs --checkpoint (the index must have been built with it)")
    given = {k for k in DEFAULTS if getattr(a, k) is not None}
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK.get(k, v) if a.quick else v)
    for k in ("updates", "clients", "max_tokens", "probe_k", "keep"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    for k in ("duration", "index_poll_s", "probe_interval_s", "target_s"):
        if getattr(a, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive")
    if a.out is None:
        report = (not a.checkpoint and not a.dtype and not a.server_arg and not a.quick and not a.threads
                  and all(getattr(a, k) == DEFAULTS[k] for k in given))
        a.out = str((RESULTS if report else QUICK_RESULTS) / "index_updates")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                            "machine": {"cpu": cpu_name(platform.processor() or "?"), "cores": os.cpu_count(),
                                        "python": platform.python_version()},
                            "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="onegen-index-updates-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            bench.run()
        except RuntimeError as e:
            print(f"index_updates: {e}", file=sys.stderr)
            return 1
    meta["runtime_s"] = time.perf_counter() - t0
    meta["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = summarize(bench)
    result = {**meta, "args": plain_args(args),
              "checkpoint": str(bench.checkpoint), "index": str(bench.source_index), "info": bench.info,
              "probe_mode": "hybrid" if bench.hybrid else "dense", "summary": summary,
              "updates": [{**asdict(u), "corpus": u.corpus.name, "delete": u.delete.name if u.delete else None}
                          for u in bench.updates],
              "versions": bench.run_.versions}
    write_report(args.out, render(bench, summary, meta), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
