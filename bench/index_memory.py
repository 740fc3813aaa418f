"""What a second replica on the same host adds in memory for the index, with and without ``--index-mmap``.

    python bench/index_memory.py                          # a tiny model, a synthetic 50,000 x 576 Flat index
    python bench/index_memory.py --vectors 200000 --factory HNSW32
    python bench/index_memory.py --checkpoint CKPT --index IDX   # a real model and index (read, never changed)

Three set-ups, each two ``python -m server`` processes on 127.0.0.1, one after the other: no index (the
model and the runtime alone), the same index read into memory (``--no-index-mmap``), and memory-mapped
(``--index-mmap``, the default). Once both answer, each gets one ``/retrieve`` (a Flat search reads every
vector, so the whole index is resident), then ``/proc/PID/smaps_rollup`` and ``/proc/PID/smaps`` of
each process are read: RSS, PSS (a shared page counted 1/n in each of the n processes that map it), the
anonymous (private) memory, and the Rss / Pss of the mapping of ``index.faiss``.

Replica 1 is measured alone, then with replica 2. What the second replica adds for the index = the PSS
the pair holds minus replica 1's alone, less the same difference of the no-index set-up (model, runtime
and KV cache are alike in all three): memory-mapped, the page cache holds one copy that both map, so
close to nothing; read, a copy of its own. Output: a table on stdout and ``OUT.md`` / ``OUT.json``
(``--out``; default ``bench/results/quick/index_memory``, git-ignored).

The synthetic index: ``--vectors`` random unit vectors of the tiny model's hidden size (``--dim``), with a
docstore of short texts, written with ``write_index_dir`` and the model's fingerprint so the server
accepts it; ``--factory`` any FAISS factory string the index builder writes (Flat, HNSW32, IVF...,PQ...).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "server"))  # ServerProcess: the test suite's launcher of `python -m server`

from common import QUICK_RESULTS, cpu_name, log, plain_args, write_report  # noqa: E402
from server_harness import ServerProcess  # noqa: E402

SETUPS = ("no index", "read (--no-index-mmap)", "mapped (--index-mmap)")
MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------- /proc
def process_memory(pid: int, mapped_name: str = "index.faiss") -> dict[str, int]:
    """Bytes: ``rss``, ``pss``, ``anonymous`` (smaps_rollup) and ``index_rss`` / ``index_pss`` (the mappings of a
    file named ``mapped_name``, from smaps) of process ``pid``."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Anonymous"):
            out[key.lower()] = int(rest.split()[0]) * 1024
    out["index_rss"] = out["index_pss"] = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.split()[-1].endswith("/" + mapped_name) or line.rstrip().endswith(f"/{mapped_name} (deleted)")
        elif inside and line.startswith(("Rss:", "Pss:")):
            key = "index_rss" if line.startswith("Rss:") else "index_pss"
            out[key] += int(line.split()[1]) * 1024
    return out


# ---------------------------------------------------------------------------------------------- set-up
def synthetic(work: Path, vectors: int, dim: int, factory: str) -> tuple[Path, Path]:
    """A tiny model of hidden size ``dim`` and an index of ``vectors`` random unit vectors built for it."""
    import numpy as np

    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.formats.index_store import Document, write_index_dir
    from onegen_core.random_checkpoint import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(work / "ckpt", arch="llama", hidden=dim, layers=2)
    fingerprint = load_checkpoint(ckpt).fingerprint
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((vectors, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    docs = [Document(id=f"d{i}", text=f"synthetic passage {i}") for i in range(vectors)]
    log(f"writing a {factory} index of {vectors:,} x {dim} float32 vectors ({vectors * dim * 4 / MB:.0f} MB)")
    index = write_index_dir(work / "index", vecs, docs, checkpoint_fingerprint=fingerprint, factory=factory)
    return ckpt, index


def measure(setup: str, ckpt: Path, index: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Replica 1 alone, then with replica 2: each process's memory once it has answered a /retrieve."""
    flags = ["--checkpoint", str(ckpt), "--log-level", "warning", "--log-format", "text",
             "--kv-cache-memory-gb", str(args.kv_cache_gb)]
    if setup != "no index":
        flags += ["--index", str(index), "--index-mmap" if "mapped" in setup else "--no-index-mmap",
                  "--retriever", "faiss", "--index-poll-s", "0"]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    servers: list[ServerProcess] = []

    def start_one() -> None:
        srv = ServerProcess(flags, work / f"server-{SETUPS.index(setup)}-{len(servers)}.log", env=env)
        servers.append(srv)
        srv.wait_ready(timeout=args.ready_timeout_s)
        if setup != "no index":  # a Flat search reads every vector: the whole index is resident afterwards
            r = httpx.post(srv.url + "/retrieve", json={"queries": ["a question", "another"], "k": 5}, timeout=300)
            r.raise_for_status()
        time.sleep(1.0)

    try:
        start_one()
        alone = process_memory(servers[0].proc.pid)
        start_one()
        both = [process_memory(srv.proc.pid) for srv in servers]
    finally:
        for srv in servers:
            srv.stop()
    row = {"setup": setup, "flags": flags, "alone": alone, "replicas": both,
           "alone_pss": alone["pss"], "pss_sum": sum(r["pss"] for r in both)}
    row["second_adds"] = row["pss_sum"] - row["alone_pss"]
    log(f"  {setup}: one replica PSS {alone['pss'] / MB:.0f} MB, two {row['pss_sum'] / MB:.0f} MB (the second adds "
        f"{row['second_adds'] / MB:.0f} MB); index.faiss mapped: RSS {[round(r['index_rss'] / MB) for r in both]} MB, "
        f"PSS {[round(r['index_pss'] / MB) for r in both]} MB")
    return row


def summarize(rows: list[dict[str, Any]], index_bytes: int) -> dict[str, Any]:
    """Per set-up with an index: what the first replica and the second one add for it (the no-index pair's own
    figures subtracted: model, runtime, KV cache)."""
    base = rows[0]
    out: dict[str, Any] = {"index_file_bytes": index_bytes}
    for r in rows[1:]:
        out[r["setup"]] = {"first_replica_index": r["alone_pss"] - base["alone_pss"],
                           "second_replica_index": r["second_adds"] - base["second_adds"],
                           "both_index": r["pss_sum"] - base["pss_sum"]}
    return out


def render(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    a = meta["args"]
    what = (f"a synthetic {a['factory']} index of {a['vectors']:,} x {a['dim']} float32 vectors" if not a["checkpoint"]
            else f"the index {a['index']}")
    lines = [f"# Index memory of two replicas on one host ({meta['date']})", "",
             f"{what} (`index.faiss`: {summary['index_file_bytes'] / MB:.1f} MB), served by `python -m server` "
             f"({'a tiny random model' if not a['checkpoint'] else a['checkpoint']}); {meta['machine']['cpu']}, "
             f"{meta['machine']['cores']} cores. Replica 1 starts and answers a `/retrieve` (a Flat search reads "
             "every vector), is measured alone, then replica 2 the same, and both are measured.", "",
             "| set-up | replica | RSS MB | PSS MB | anonymous MB | index.faiss mapping: RSS MB | PSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for label, x in [("1 alone", r["alone"]), *((f"{i + 1} of 2", y) for i, y in enumerate(r["replicas"]))]:
            lines.append(f"| {r['setup']} | {label} | {x['rss'] / MB:.0f} | {x['pss'] / MB:.0f} | "
                         f"{x['anonymous'] / MB:.0f} | {x['index_rss'] / MB:.0f} | {x['index_pss'] / MB:.0f} |")
    lines += ["", "| set-up | for the index, the first replica adds MB | the second replica adds MB | both MB |",
              "| --- | ---: | ---: | ---: |"]
    for r in rows[1:]:
        s = summary[r["setup"]]
        lines.append(f"| {r['setup']} | {s['first_replica_index'] / MB:.0f} | {s['second_replica_index'] / MB:.0f} | "
                     f"{s['both_index'] / MB:.0f} |")
    lines += ["", "PSS (proportional set size) counts a page shared by n processes 1/n in each, so the sum over "
              "processes is the memory they hold together. Each figure for the index is the set-up's PSS minus the "
              "no-index set-up's (model, runtime and KV cache are the same in all three). Page-cache pages that no "
              "process maps (the read set-up's file, after FAISS read it) are not counted: the kernel frees them "
              "when memory is needed.", "", f"Runtime {meta['runtime_s']:.0f} s; load average at the end: "
              f"{meta['load_end']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a real checkpoint (with --index) instead of the synthetic set-up")
    p.add_argument("--index", type=Path, help="its index directory (only read)")
    p.add_argument("--vectors", type=int, default=50_000, help="synthetic index: vectors (default: 50000)")
    p.add_argument("--dim", type=int, default=576, help="synthetic index: dimension = the tiny model's hidden size "
                   "(default: 576, SmolLM2-135M's)")
    p.add_argument("--factory", default="Flat", help="synthetic index: FAISS factory string (default: Flat)")
    p.add_argument("--kv-cache-gb", type=float, default=0.05,
                   help="server --kv-cache-memory-gb, kept small: the KV cache is not what is measured (default: 0.05)")
    p.add_argument("--ready-timeout-s", type=float, default=600.0, help="seconds a server may take to start")
    p.add_argument("--work-dir", type=Path, help="where the synthetic model, index and logs go (default: a temp dir)")
    p.add_argument("--out", default=str(QUICK_RESULTS / "index_memory"),
                   help="writes OUT.md and OUT.json (default: bench/results/quick/index_memory)")
    a = p.parse_args(argv)
    if (a.checkpoint is None) != (a.index is None):
        p.error("give --checkpoint and --index together")
    if a.vectors < 1 or a.dim < 8:
        p.error("--vectors must be at least 1 and --dim at least 8")
    return a


def main(argv: list[str] | None = None) -> int:
    if not sys.platform.startswith("linux"):
        print("index_memory: reads /proc/PID/smaps (Linux only)", file=sys.stderr)
        return 2
    args = parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onegen-index-memory-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.checkpoint:
            ckpt, index = args.checkpoint, args.index
        else:
            ckpt, index = synthetic(work, args.vectors, args.dim, args.factory)
        from onegen_core.formats.index_store import INDEX_FILE, resolve_version

        index_bytes = (resolve_version(index)[0] / INDEX_FILE).stat().st_size
        rows = []
        for setup in SETUPS:
            log(f"{setup}: two replicas")
            rows.append(measure(setup, ckpt, index, args, work))
    summary = summarize(rows, index_bytes)
    meta = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "runtime_s": time.perf_counter() - t0,
            "machine": {"cpu": cpu_name(platform.processor() or "?"), "cores": os.cpu_count()},
            "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "args": plain_args(args)}
    write_report(args.out, render(rows, summary, meta), {**meta, "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
