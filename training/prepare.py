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

How the questions are made (all from the passage text, no model involved, so the data is
reproducible and every answer is a sentence of its passage):

* ``definition`` — the article's first sentence answers "What is X?" / "Who was X?";
* ``fact`` — sentences matched by a few English patterns become natural questions whose answer
  is that sentence: "X is/was a Y." → "What is X?", "X was born in …" → "When/where was X
  born?", "In 1860, …" → "What happened in 1860 …?", "X founded/wrote/invented … Y." →
  "What did X found/write/invent?", "The capital of X is Y." → "What is the capital of X?";
* ``section`` — a section's first passage answers a question about the section heading
  ("What does the article on Alaska say about its climate?"), the keyword-like kind;
* ``cloze`` — inverse cloze, for passages no other kind covers: a sentence becomes a question by
  turning one key term into a wh-word ("Due to its links to workers' movements, what became a
  significant organisation?"), answered by the whole sentence.

Why this mix: definitions and pattern questions read like what people ask, section questions
teach the title/heading signal, and cloze queries give every passage a query (the recipe
of inverse-cloze pre-training for dense retrievers). Answers are grounded by construction.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onegen_core.wikipedia import split_sentences, write_jsonl

from .data import _read_jsonl
from .mix import MixConfig, build_mix, retrieval_rows

QUESTION_KINDS = ("definition", "fact", "section", "cloze")
RECIPES = ("mixed", "retrieval")
PRONOUNS = {"it", "this", "he", "she", "they", "there", "these", "those", "that", "his", "her", "its", "their",
            "some", "many", "most", "other", "others", "such", "one", "both", "all", "each", "another", "however"}
PAST = {"founded": "found", "wrote": "write", "invented": "invent", "discovered": "discover",
        "published": "publish", "won": "win", "built": "build", "created": "create", "developed": "develop",
        "introduced": "introduce", "signed": "sign", "established": "establish", "defeated": "defeat",
        "married": "marry", "composed": "compose", "directed": "direct", "designed": "design",
        "proposed": "propose", "received": "receive", "led": "lead", "produced": "produce", "formed": "form"}


@dataclass
class Record:
    id: str
    title: str
    text: str
    article: str
    section: str
    line: int


@dataclass
class Question:
    kind: str
    question: str
    answer: str
    passage: str  # positive passage id


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


# --------------------------------------------------------------------------- questions
def _clean_np(s: str) -> str:
    return re.sub(r"\s*\([^)]*\)", "", s).strip(" ,;:")


def _is_person(article: str, lead: str) -> bool:
    words = article.split()
    return 2 <= len(words) <= 4 and all(w[:1].isupper() for w in words) and bool(
        re.search(r"\b(born|was an? [A-Za-z -]*(politician|writer|author|philosopher|actor|actress|player|"
                  r"singer|king|president|poet|painter|scientist|mathematician|novelist|director|"
                  r"economist|lawyer|general)|he|she)\b", lead))


def fact_questions(sentence: str, article: str) -> Iterator[tuple[str, str]]:
    """(question, fact kind) for the patterns a sentence matches."""
    s = sentence.strip()
    if len(s.split()) < 6 or len(s) > 400 or not s.endswith("."):
        return
    m = re.match(r"^In (\d{3,4}), (.{15,})\.$", s)
    if m:
        yield f"What happened in {m.group(1)} in the history of {article}?", "year"
    m = re.match(r"^([A-Z][\w'.-]*(?: [A-Z][\w'.-]*){0,4}) (?:\([^)]*\) )?was born (?:on |in )?(.+)\.$", s)
    if m and m.group(1).lower() not in PRONOUNS:
        when = re.match(r"^(?:on )?\w* ?\d", m.group(2)) or re.search(r"\b\d{3,4}\b", m.group(2).split(" in ")[0])
        yield (f"When was {m.group(1)} born?" if when else f"Where was {m.group(1)} born?"), "born"
    m = re.match(r"^The ([a-z][a-z ]{2,30}) of ([A-Z][\w' -]{1,40}?) (is|was|are|were) (.+)\.$", s)
    if m:
        yield f"What {m.group(3)} the {m.group(1)} of {m.group(2)}?", "attribute"
    m = re.match(r"^([A-Z][\w'.-]*(?: (?:of |the |and |de |von |van )?[A-Z][\w'.-]*){0,5}) (?:\([^)]*\) )?"
                 r"(is|was|are|were) (an?|the) ([^,;]{8,}?)[.,;]", s)
    if m and m.group(1).split()[0].lower() not in PRONOUNS:
        yield f"What {m.group(2)} {_clean_np(m.group(1))}?", "copula"
    m = re.match(r"^([A-Z][\w'.-]*(?: [A-Z][\w'.-]*){0,4}) (" + "|".join(PAST) + r") (.{6,})\.$", s)
    if m and m.group(1).split()[0].lower() not in PRONOUNS:
        yield f"What did {m.group(1)} {PAST[m.group(2)]}?", "verb"


_CLOZE_TERM = re.compile(r"\b(\d{3,4}|[A-Z][a-z]+(?: [A-Z][a-z]+)*)\b")


def cloze_question(sentence: str, article: str, rng: random.Random) -> str | None:
    """Inverse cloze as a question: one key term (a year or a name, not the first word) becomes a wh-word.

    "In 1648 the island passed to the Dutch." -> "In what year the island passed to the Dutch?" reads
    oddly but keeps the sentence's words a person would search with, minus the answer itself; the
    article is named when the sentence does not mention it (a pronoun subject says nothing alone).
    """
    words = sentence.split()
    if not 8 <= len(words) <= 45:
        return None
    terms = [m for m in _CLOZE_TERM.finditer(sentence) if m.start() > 0 and (not article or m.group(1) not in article)]
    if not terms:
        return None
    m = rng.choice(terms)
    wh = "what year" if m.group(1).isdigit() else "what"
    q = (sentence[: m.start()] + wh + sentence[m.end():]).rstrip(" .;:") + "?"
    if article and not any(w.lower() in sentence.lower() for w in article.split() if len(w) > 3):
        q = f"About {article}: {q}"
    return q


SECTION_TEMPLATES = (
    "What does the article on {article} say about {section}?",
    "Tell me about {section} in {article}.",
    "What is known about the {section_l} of {article}?",
)


def names_its_subject(article: str, lead_sentence: str) -> bool:
    """Whether ``article`` is a name the text is about: short, and the lead sentence opens with it ("Alaska is ...").

    Wikipedia titles are; a news headline, a support article's title or a paper's title usually are not, and
    "What is <headline>?" is no question a person asks (``prepare --corpus`` on news once made 93 of 101 such).
    """
    words = article.split()
    if not 1 <= len(words) <= 6 or any(ch.isdigit() for ch in article):
        return False
    head = re.sub(r"^(The|A|An) ", "", lead_sentence.strip())
    name = re.sub(r"^(The|A|An) ", "", article.strip())
    return head.lower().startswith(name.lower()) and bool(
        re.match(r"\s*(\([^)]*\)\s*)?,?\s*(is|was|are|were|has|had)\b", head[len(name):]))


def questions_for_article(recs: list[Record], rng: random.Random, *, max_per_passage: int) -> list[Question]:
    """Questions whose answer is in one passage of an article, at most ``max_per_passage`` per passage."""
    out: list[Question] = []
    lead = recs[0]
    first = split_sentences(lead.text)[0] if lead.text else ""
    named = names_its_subject(lead.article, first)
    seen_sections: set[str] = set()
    for r in recs:
        mine: list[Question] = []
        sentences = split_sentences(r.text)
        if r is lead and first and named:
            wh = "Who was" if _is_person(r.article, first) else "What is"
            mine.append(Question("definition", f"{wh} {r.article}?", first, r.id))
        if r.section and r.section not in seen_sections and sentences:
            seen_sections.add(r.section)
            tpl = rng.choice(SECTION_TEMPLATES)
            q = tpl.format(article=r.article, section=r.section, section_l=r.section.lower())
            mine.append(Question("section", q, sentences[0], r.id))
        facts = [(q, s) for s in sentences for q, _ in fact_questions(s, r.article)]
        rng.shuffle(facts)
        seen_q = {q.question for q in mine}
        for q, s in facts:
            if q not in seen_q:
                mine.append(Question("fact", q, s, r.id))
                seen_q.add(q)
        if not mine:  # every passage gets a question: inverse cloze where no other kind applies
            candidates = sentences[:]
            rng.shuffle(candidates)
            for s in candidates:
                q = cloze_question(s, r.article if named else "", rng)
                if q:
                    mine.append(Question("cloze", q, s, r.id))
                    break
        # Keep the natural kinds first, then fill up to the cap.
        order = {"definition": 0, "fact": 1, "section": 2, "cloze": 3}
        mine.sort(key=lambda q: order[q.kind])
        out.extend(mine[:max_per_passage])
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

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
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
    rng = random.Random(cfg.seed)
    by_article: dict[str, list[Record]] = defaultdict(list)
    for r in recs:
        by_article[r.article].append(r)
    train_articles, held_articles = split_articles(list(by_article), cfg.heldout, cfg.seed)
    summary: dict[str, Any] = {"corpus": str(corpus), "passages": len(recs), "articles": len(by_article),
                               "heldout_articles": sorted(held_articles), "settings": cfg.__dict__}
    for split, articles in (("train", train_articles), ("eval", held_articles)):
        questions: list[Question] = []
        for a in sorted(articles):
            questions += questions_for_article(by_article[a], rng, max_per_passage=cfg.max_questions_per_passage)
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
