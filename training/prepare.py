"""``python -m training prepare``: a corpus of passages to OneGen training data.

Input: a corpus JSONL of passages (``{id, title, text, metadata?}``; ``metadata.article``
and ``metadata.section`` when the passages come from ``onegen_core.wikipedia``, else the
title stands for the article). Output, in ``--out``:

* ``corpus.jsonl`` — every passage (the index is built over this: it holds all articles);
* ``db.jsonl`` — the passages of the training articles only (``{id, title, text}``, which
  the training loader reads as a corpus): training never sees a held-out article, not even
  as a random negative;
* ``train.jsonl`` / ``eval.jsonl`` — OneGen conversations (Contract 3) for the training
  articles and the held-out articles: the user asks, the assistant emits the query token,
  the passage follows in the passage delimiters (exactly what the engine inserts), then the
  answer; ``positive`` names the passage, ``negative`` hard negatives (other passages of the
  same article, then BM25 neighbours of the question);
* ``split.json`` — which articles are held out, counts per question kind, the settings.

The split is by **article**: a seeded ``--heldout`` fraction of articles (default 20%) is
used only for evaluation.

Questions are made from the passage text by rules (``training.questions``: definitions, English fact
patterns, section questions, inverse cloze), so the data is reproducible and every answer is a sentence of
its passage. With the default ``--recipe mixed``, ``train.jsonl`` also holds refusals, general questions,
no-retrieval chat and passage reading (``training.mix``; docs/training.md).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onegen_core.wikipedia import write_jsonl

from .data import _read_jsonl
from .mix import MixConfig, build_mix, retrieval_rows
from .questions import (  # the question rules, re-exported for callers that import them from here
    CLOZE_ANSWERS,
    PAST,
    QUESTION_KINDS,
    SECTION_TEMPLATES,
    Question,
    Record,
    cloze_question,
    fact_questions,
    questions_for_article,
)

__all__ = ["PAST", "QUESTION_KINDS", "RECIPES", "SECTION_TEMPLATES", "BM25Index", "PrepareConfig", "Question",
           "Record", "cloze_question", "fact_questions", "prepare", "questions_for_article", "read_passages",
           "split_articles"]

RECIPES = ("mixed", "retrieval")


# --------------------------------------------------------------------------- reading
def read_passages(path: str | os.PathLike) -> list[Record]:
    """Corpus JSONL passages; errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"corpus {path} does not exist")
    out: list[Record] = []
    seen: dict[str, int] = {}
    for lineno, obj, err in _read_jsonl(path):
        if err:
            raise ValueError(err)
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str | int) or \
                not isinstance(obj.get("text"), str):
            raise ValueError(f"{where}: expected an object with string 'id' and 'text'")
        pid = str(obj["id"])
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r} (first at line {seen[pid]})")
        seen[pid] = lineno
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        title = str(obj.get("title") or "")
        article = str(meta.get("article") or title.split(":", 1)[0] or pid)
        section = str(meta.get("section") or (title.split(":", 1)[1].strip() if ":" in title else ""))
        out.append(Record(pid, title, obj["text"], article, section, lineno))
    if not out:
        raise ValueError(f"{path}: no passages")
    return out


# --------------------------------------------------------------------------- negatives
class BM25Index:
    """BM25 over passages (``bm25s``): hard negatives here, a baseline in ``bench/quality.py``."""

    def __init__(self, texts: list[str]):
        try:
            import bm25s
        except ImportError as e:
            raise ValueError("BM25 needs bm25s: pip install bm25s (in the 'default-model' extra)") from e
        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        self.size = len(texts)

    def search(self, queries: list[str], k: int) -> list[list[int]]:
        k = min(k, self.size)
        tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=False)
        docs, _ = self.retriever.retrieve(tokens, k=k, show_progress=False)
        return [[int(d) for d in row] for row in docs]


def hard_negatives(questions: list[Question], recs: list[Record], pool: list[int], *, per_question: int,
                   rng: random.Random, bm25: BM25Index | None = None) -> list[list[str]]:
    """Per question: up to half other passages of the same article, the rest BM25 neighbours (within ``pool``)."""
    by_article: dict[str, list[str]] = defaultdict(list)
    for i in pool:
        by_article[recs[i].article].append(recs[i].id)
    article_of = {r.id: r.article for r in recs}
    bm25 = bm25 or pool_bm25(recs, pool)
    hits = bm25.search([q.question for q in questions], per_question + 2)
    out = []
    for q, row in zip(questions, hits, strict=True):
        same = [p for p in by_article[article_of[q.passage]] if p != q.passage]
        negs = rng.sample(same, min(len(same), per_question // 2))
        for d in row:
            pid = recs[pool[d]].id
            if len(negs) >= per_question:
                break
            if pid != q.passage and pid not in negs:
                negs.append(pid)
        out.append(negs)
    return out


def pool_bm25(recs: list[Record], pool: list[int]) -> BM25Index:
    """BM25 over the passages ``pool`` indexes (title and text, as the index builder renders them)."""
    return BM25Index([f"{recs[i].title}. {recs[i].text}" for i in pool])


# --------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class PrepareConfig:
    heldout: float = 0.2
    seed: int = 0
    max_questions_per_passage: int = 2
    negatives_per_question: int = 4
    max_eval_questions: int | None = None
    query_token: str = "[RQ]"
    passage_open: str = "<paragraph>"
    passage_close: str = "</paragraph>"
    passage_template: str = "{title}\n{text}"
    recipe: str = "mixed"  # "mixed" (training.mix: retrieval + refusal + chat + reading) or "retrieval" only
    cloze_answer: str = "sentence"  # inverse-cloze answers: the sentence, the hidden "term", or "none" (questions.py)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
        if self.cloze_answer not in CLOZE_ANSWERS:
            raise ValueError(f"--cloze-answer must be one of {list(CLOZE_ANSWERS)}, got {self.cloze_answer!r}")
        if not 0.0 < self.heldout < 1.0:
            raise ValueError(f"--heldout must be in (0, 1), got {self.heldout}")
        if self.max_questions_per_passage < 1:
            raise ValueError(f"--max-questions-per-passage must be >= 1, got {self.max_questions_per_passage}")
        if self.negatives_per_question < 0:
            raise ValueError(f"--negatives-per-question must be >= 0, got {self.negatives_per_question}")


def split_articles(articles: list[str], heldout: float, seed: int) -> tuple[set[str], set[str]]:
    """(training articles, held-out articles): a seeded shuffle, at least one article on each side."""
    order = sorted(set(articles))
    if len(order) < 2:
        raise ValueError(f"the corpus has {len(order)} article(s): a split by article needs at least 2")
    random.Random(seed).shuffle(order)
    n_held = min(len(order) - 1, max(1, round(heldout * len(order))))
    return set(order[n_held:]), set(order[:n_held])


def split_rng(seed: int, split: str) -> random.Random:
    """The random source of one split. Each split has its own, so ``eval.jsonl`` depends on the corpus, the seed
    and the question settings alone: the mix's knobs (how many chat, text or general rows ``train.jsonl`` gets)
    draw from the training split's source, and two recipes are measured on the same held-out questions. The
    training split keeps ``Random(seed)``, as before the split sources, so its data is unchanged."""
    return random.Random(seed if split == "train" else f"{seed}/{split}")


def prepare(corpus: str | os.PathLike, out: str | os.PathLike, cfg: PrepareConfig = PrepareConfig(),
            mix: MixConfig | None = None) -> dict:
    """Write corpus.jsonl, db.jsonl, train.jsonl, eval.jsonl and split.json into ``out``; returns the summary.

    With ``cfg.recipe == "mixed"`` (the default) ``train.jsonl`` is the mix of ``training.mix`` and ``mix``
    must name the base checkpoint; its answers are cached in ``out/distilled.jsonl`` (resumable)."""
    mix = mix or MixConfig()
    if cfg.recipe == "mixed":
        mix.check_base()
    recs = read_passages(corpus)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_article: dict[str, list[Record]] = defaultdict(list)
    for r in recs:
        by_article[r.article].append(r)
    train_articles, held_articles = split_articles(list(by_article), cfg.heldout, cfg.seed)
    summary: dict[str, Any] = {"corpus": str(corpus), "passages": len(recs), "articles": len(by_article),
                               "heldout_articles": sorted(held_articles), "settings": cfg.__dict__}
    for split, articles in (("train", train_articles), ("eval", held_articles)):
        rng = split_rng(cfg.seed, split)
        questions: list[Question] = []
        for a in sorted(articles):
            questions += questions_for_article(by_article[a], rng, max_per_passage=cfg.max_questions_per_passage,
                                               cloze_answer=cfg.cloze_answer)
        rng.shuffle(questions)
        if split == "eval" and cfg.max_eval_questions is not None:
            questions = questions[: cfg.max_eval_questions]
        # Negatives come from this split's articles only: training never touches a held-out passage.
        pool = [i for i, r in enumerate(recs) if r.article in articles]
        bm25 = pool_bm25(recs, pool)
        negs = hard_negatives(questions, recs, pool, per_question=cfg.negatives_per_question, rng=rng, bm25=bm25) \
            if cfg.negatives_per_question else [[] for _ in questions]
        rows = retrieval_rows(questions, negs, recs, cfg)
        if split == "train" and cfg.recipe == "mixed":
            rows = build_mix(rows, questions, negs, recs, pool, cfg, mix, out, rng, bm25.search)
            summary["train_tasks"] = dict(Counter(r["task"] for r in rows))
        write_jsonl(rows, out / f"{split}.jsonl")
        summary[f"{split}_questions"] = len(questions)
        summary[f"{split}_kinds"] = dict(Counter(q.kind for q in questions))
    if cfg.recipe == "mixed":
        summary["mix"] = mix.__dict__
    write_jsonl((_corpus_row(r) for r in recs), out / "corpus.jsonl")
    write_jsonl((_corpus_row(r) for r in recs if r.article in train_articles), out / "db.jsonl")
    (out / "split.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _corpus_row(r: Record) -> dict[str, Any]:
    return {"id": r.id, "title": r.title, "text": r.text, "metadata": {"article": r.article, "section": r.section}}
