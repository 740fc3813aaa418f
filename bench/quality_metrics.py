"""Pure metric functions for ``bench/quality.py``: retrieval ranks, SQuAD-style answer scores, sampling, and the
scores of the hand-written sets (retrieval decision, answer contains gold, "not found" answers).

No model, no I/O: everything here runs on lists and small numpy arrays, so it is tested on tiny inputs
(``tests/bench/test_quality_metrics.py``).
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


# --------------------------------------------------------------------------- answers
def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop the articles a/an/the, squeeze whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 on normalised words (both empty: 1; one empty: 0)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return 2 * precision * recall / (precision + recall)


def strip_generated(text: str, *, passage_open: str = "<paragraph>", passage_close: str = "</paragraph>",
                    markers: Iterable[str] = ()) -> str:
    """What the model wrote, without any inserted passage (open … close) or leftover marker strings."""
    if passage_open and passage_close:
        text = re.sub(re.escape(passage_open) + r".*?" + re.escape(passage_close), " ", text, flags=re.S)
        # an unclosed passage (the output ended inside it): drop from its opening on
        if passage_open in text:
            text = text[: text.index(passage_open)]
    for m in markers:
        if m:
            text = text.replace(m, " ")
    return " ".join(text.split())


# --------------------------------------------------------------------------- retrieval
def top_unique(scores: np.ndarray, unit_ids: Sequence[str], k: int) -> list[str]:
    """The ``k`` best distinct ids for one row of scores over units (several units may share an id: chunks).

    Ties keep the lower unit index first (a stable order), so results are deterministic.
    """
    n = len(unit_ids)
    if n == 0 or k <= 0:
        return []
    scores = np.asarray(scores, dtype=np.float64)
    m = min(n, max(4 * k, k + 8))
    while True:
        if m >= n:
            order = np.argsort(-scores, kind="stable")
        else:
            part = np.argpartition(-scores, m - 1)[:m]
            order = part[np.lexsort((part, -scores[part]))]
        out: list[str] = []
        seen: set[str] = set()
        for u in order:
            pid = unit_ids[int(u)]
            if pid not in seen:
                seen.add(pid)
                out.append(pid)
                if len(out) == k:
                    return out
        if m >= n:
            return out
        m = min(n, m * 4)


def rank_all(query_vecs: np.ndarray, unit_vecs: np.ndarray, unit_ids: Sequence[str], k: int,
             *, batch: int = 256) -> list[list[str]]:
    """Inner-product ranking of every query against every unit: the top-``k`` distinct ids per query."""
    out: list[list[str]] = []
    q = np.asarray(query_vecs, dtype=np.float32)
    u = np.asarray(unit_vecs, dtype=np.float32)
    for i in range(0, len(q), batch):
        s = q[i:i + batch] @ u.T
        out.extend(top_unique(row, unit_ids, k) for row in s)
    return out


def first_hit_rank(ranked: Sequence[str], positives: Iterable[str]) -> int | None:
    """1-based rank of the first positive in ``ranked``, or None."""
    pos = set(positives)
    for i, pid in enumerate(ranked):
        if pid in pos:
            return i + 1
    return None


def recall_at_k(ranked: Sequence[str], positives: Iterable[str], k: int) -> float:
    r = first_hit_rank(ranked[:k], positives)
    return float(r is not None)


def mrr_at_k(ranked: Sequence[str], positives: Iterable[str], k: int) -> float:
    r = first_hit_rank(ranked[:k], positives)
    return 1.0 / r if r is not None else 0.0


def retrieval_summary(rankings: Sequence[Sequence[str]], positives: Sequence[Iterable[str]],
                      kinds: Sequence[str] | None = None) -> dict:
    """recall@1, recall@5, MRR@10 over all questions, and the same per question kind."""
    def block(idx: list[int]) -> dict:
        if not idx:
            return {"n": 0, "recall@1": 0.0, "recall@5": 0.0, "mrr@10": 0.0}
        pos = [set(positives[i]) for i in idx]
        return {
            "n": len(idx),
            "recall@1": sum(recall_at_k(rankings[i], p, 1) for i, p in zip(idx, pos, strict=True)) / len(idx),
            "recall@5": sum(recall_at_k(rankings[i], p, 5) for i, p in zip(idx, pos, strict=True)) / len(idx),
            "mrr@10": sum(mrr_at_k(rankings[i], p, 10) for i, p in zip(idx, pos, strict=True)) / len(idx),
        }

    if len(rankings) != len(positives):
        raise ValueError(f"{len(rankings)} rankings but {len(positives)} positive sets")
    out = block(list(range(len(rankings))))
    if kinds is not None:
        by_kind: dict[str, list[int]] = defaultdict(list)
        for i, kind in enumerate(kinds):
            by_kind[kind].append(i)
        out["per_kind"] = {kind: block(idx) for kind, idx in sorted(by_kind.items())}
    return out


def answer_summary(predictions: Sequence[str], references: Sequence[str]) -> dict:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {"n": 0, "em": 0.0, "f1": 0.0}
    return {
        "n": n,
        "em": sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n,
        "f1": sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / n,
    }


# --------------------------------------------------------------------------- sampling
def seeded_order(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n): the first ``limit`` of it are a reproducible sample."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def relative_change(new: float, old: float) -> float:
    """(new - old) / old, in percent."""
    if old == 0:
        return float("inf") if new else 0.0
    return 100.0 * (new - old) / old


# --------------------------------------------------------------------------- the hand-written sets (bench/quality_sets)
_DASHES = re.compile(r"[\u2010-\u2015\u2212-]")
# What a model writes when it did not find the answer: the mixed recipe's refusal (training.mix.REFUSAL,
# "The retrieved passage does not answer this.") and the usual ways to say so. The one rule for both the
# "outside the corpus" table (a refusal counts as a good answer there) and wrong refusals (a bad one).
NOT_FOUND_MARKERS = ("does not answer", "doesn't answer", "did not find", "didn't find", "could not find",
                     "couldn't find", "cannot find", "can't find", "no information", "does not contain",
                     "doesn't contain", "does not mention", "doesn't mention", "not mentioned", "i don't know",
                     "i do not know")


def normalize_loose(s: str) -> str:
    """``normalize_answer`` after folding diacritics to ASCII and dashes to spaces ("Émile", "Mon–Khmer")."""
    s = unicodedata.normalize("NFKD", s)
    s = "".join(ch for ch in s if not unicodedata.combining(ch))
    return normalize_answer(_DASHES.sub(" ", s))


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    """Whether any of ``answers`` (the gold and its aliases) occurs in the prediction as whole words, both
    normalised (``normalize_loose``: case, punctuation, articles, diacritics; "15,000" matches "15000")."""
    pred = f" {normalize_loose(prediction)} "
    return any((a := normalize_loose(ans)) and f" {a} " in pred for ans in answers)


def best_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token F1 of the prediction against the best of ``answers``."""
    return max((token_f1(normalize_loose(prediction), normalize_loose(a)) for a in answers), default=0.0)


def says_not_found(text: str) -> bool:
    """Whether the text says that the answer was not found (any of ``NOT_FOUND_MARKERS``, case-insensitive)."""
    t = " ".join(text.lower().replace("\u2019", "'").split())
    return any(m in t for m in NOT_FOUND_MARKERS)


def share(flags: Sequence[bool]) -> float | None:
    """The fraction of true flags; None for no flags (a row with nothing to measure)."""
    return sum(map(bool, flags)) / len(flags) if flags else None


def decision_summary(retrieved: Sequence[bool], kinds: Sequence[str] | None = None) -> dict:
    """Share of prompts on which the model emitted its query token (``rate``), overall and per kind."""
    out: dict = {"n": len(retrieved), "rate": share(retrieved)}
    if kinds is not None:
        by_kind: dict[str, list[bool]] = defaultdict(list)
        for flag, kind in zip(retrieved, kinds, strict=True):
            by_kind[kind].append(flag)
        out["per_kind"] = {k: {"n": len(v), "rate": share(v)} for k, v in sorted(by_kind.items())}
    return out


def knowledge_summary(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                      sentences: Sequence[str | None] | None = None) -> dict:
    """Answers to the knowledge questions: ``contains`` (the gold or an alias is in the answer), ``non_empty``
    (the model wrote something), token ``f1_gold`` against the best of the short answers, and ``f1`` against
    the best of them and the passage sentence that states the answer (``sentences``): a right answer scores
    high in either style, a short name or the sentence (what the recipe trains)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    n = len(predictions)
    sents = list(sentences) if sentences is not None else [None] * n
    f1_gold = [best_f1(p, a) for p, a in zip(predictions, answers, strict=True)]
    f1 = [max(g, best_f1(p, [s]) if s else 0.0) for p, g, s in zip(predictions, f1_gold, sents, strict=True)]
    return {"n": n,
            "contains": share([contains_answer(p, a) for p, a in zip(predictions, answers, strict=True)]),
            "f1": sum(f1) / n if n else None, "f1_gold": sum(f1_gold) / n if n else None,
            "non_empty": share([bool(p.strip()) for p in predictions])}


def general_summary(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """Answers to questions the corpus does not answer: ``correct`` (gold or alias present), ``not_found``
    (``says_not_found``) and ``good`` (either: the target)."""
    correct = [contains_answer(p, a) for p, a in zip(predictions, answers, strict=True)]
    not_found = [says_not_found(p) for p in predictions]
    return {"n": len(predictions), "correct": share(correct), "not_found": share(not_found),
            "good": share([c or f for c, f in zip(correct, not_found, strict=True)])}


def wrong_refusals(predictions: Sequence[str], gold_retrieved: Sequence[bool]) -> dict:
    """Among the answers whose gold passage was retrieved, the share that still says it was not found; and, for
    comparison, the share among those with another passage retrieved (``other_*``), where saying so is right: a
    model that reads the passage refuses more often there, one that refuses at random as often in both."""
    said = [says_not_found(p) for p, g in zip(predictions, gold_retrieved, strict=True) if g]
    other = [says_not_found(p) for p, g in zip(predictions, gold_retrieved, strict=True) if not g]
    return {"n": len(said), "refused": sum(said), "rate": share(said),
            "other_n": len(other), "other_refused": sum(other), "other_rate": share(other)}


def echoes_question(prediction: str, question: str, chars: int = 30) -> bool:
    """Whether the answer begins by repeating its question (the first ``chars`` letters and digits of both,
    lowercased): the habit whole-sentence inverse-cloze answers taught the default model (docs/training.md)."""
    def head(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())[:chars]

    q = head(question)
    return bool(q) and head(prediction).startswith(q)


# --------------------------------------------------------------------------- the sets' tables, from the generations
@dataclass
class SetOutput:
    """One generation for a row of a hand-written set, as the tables read it."""

    text: str  # what the model wrote: inserted passages and marker tokens stripped
    retrieved: bool = False  # it emitted its query token (at least one retrieval)
    hits: list[str] = field(default_factory=list)  # passage ids it retrieved (the top hit of each retrieval)
    prompt_ids: list[int] = field(default_factory=list)  # the rendered prompt
    token_ids: list[int] = field(default_factory=list)  # the generated tokens


def gold_answers(row: dict[str, Any]) -> list[str]:
    return [row["answer"], *row.get("aliases", [])]


def gold_retrieved(out: SetOutput, row: dict[str, Any]) -> bool:
    return bool(set(out.hits) & set(row["passages"]))


DECISION_ROWS = {"knowledge": "knowledge", "knowledge_raw": "knowledge", "general": "general",
                 "no_corpus": "no_corpus"}  # run key -> its set
KNOWLEDGE_ROWS = ("knowledge", "knowledge_hybrid", "knowledge_raw", "reading", "base_knowledge", "base_reading")
ONE_PASS_SET_ROWS = ("knowledge", "knowledge_hybrid", "knowledge_raw")  # the model retrieves: gold retrieved?


def set_tables(sets: dict[str, list[dict[str, Any]]], outs: dict[str, list[SetOutput]]) -> dict[str, Any]:
    """The decision, answers and outside-the-corpus tables from the runs in ``outs`` (run key -> one output
    per row of its set, in order); runs that are absent leave their rows out."""
    decision = {k: decision_summary([o.retrieved for o in outs[k]],
                                    [r["kind"] for r in sets[s]] if s == "no_corpus" else None)
                for k, s in DECISION_ROWS.items() if k in outs}
    golds = [gold_answers(r) for r in sets.get("knowledge", [])]
    sentences = [r.get("sentence") for r in sets.get("knowledge", [])]
    answers = {}
    for k in KNOWLEDGE_ROWS:
        if k in outs:
            answers[k] = knowledge_summary([o.text for o in outs[k]], golds, sentences)
            if k in ONE_PASS_SET_ROWS:
                answers[k]["gold_retrieved"] = share([gold_retrieved(o, r) for o, r in
                                                      zip(outs[k], sets["knowledge"], strict=True)])
    outside = {k: general_summary([o.text for o in outs[k]], [gold_answers(r) for r in sets["general"]])
               for k in ("general", "general_hybrid", "base_general") if k in outs}
    for run, key in (("knowledge", "wrong_refusals"), ("knowledge_hybrid", "wrong_refusals_hybrid")):
        if run in outs:
            outside[key] = wrong_refusals(
                [o.text for o in outs[run]],
                [gold_retrieved(o, r) for o, r in zip(outs[run], sets["knowledge"], strict=True)])
    return {"decision": decision, "answers": answers, "outside": outside}


FAILURE_KINDS = {  # key: (what failed, run, set)
    "retrieved_no_corpus": ("retrieved on a no-corpus prompt", "no_corpus", "no_corpus"),
    "no_retrieval_knowledge": ("did not retrieve on a knowledge question", "knowledge", "knowledge"),
    "wrong_answer": ("wrong answer to a knowledge question (gold not in the answer)", "knowledge", "knowledge"),
    "wrong_refusal": ("said the passage does not answer, with the gold passage retrieved", "knowledge", "knowledge"),
    "echo": ("repeated the question instead of answering it", "knowledge", "knowledge"),
    "bad_general": ("general question: neither the answer nor a 'not found'", "general", "general"),
    "reading_miss": ("gold passage in the prompt, gold not in the answer", "reading", "knowledge"),
}


def is_failure(kind: str, out: SetOutput, row: dict[str, Any]) -> bool:
    if kind == "retrieved_no_corpus":
        return out.retrieved
    if kind == "no_retrieval_knowledge":
        return not out.retrieved
    if kind == "wrong_refusal":
        return gold_retrieved(out, row) and says_not_found(out.text)
    if kind == "echo":
        return echoes_question(out.text, row["question"])
    if kind == "bad_general":
        return not (contains_answer(out.text, gold_answers(row)) or says_not_found(out.text))
    return not contains_answer(out.text, gold_answers(row))  # wrong_answer, reading_miss


def failure_examples(sets: dict[str, list[dict[str, Any]]], outs: dict[str, list[SetOutput]],
                     limit: int = 20) -> dict[str, dict[str, Any]]:
    """Per kind of failure (``FAILURE_KINDS``): how many of how many, and the first ``limit`` examples."""
    found: dict[str, dict[str, Any]] = {}
    for kind, (title, run, set_name) in FAILURE_KINDS.items():
        if run not in outs:
            continue
        bad = [(r, o) for r, o in zip(sets[set_name], outs[run], strict=True) if is_failure(kind, o, r)]
        found[kind] = {"title": title, "count": len(bad), "of": len(outs[run]),
                       "examples": [failure_row(r, o) for r, o in bad[:limit]]}
    return found


def failure_row(row: dict[str, Any], out: SetOutput) -> dict[str, Any]:
    prompt = row.get("question") or row["messages"][-1]["content"]
    ex = {"id": row["id"], "prompt": prompt, "output": out.text, "retrieved": out.hits or out.retrieved}
    if "kind" in row:
        ex["kind"] = row["kind"]
    if "answer" in row:
        ex["gold"] = gold_answers(row)
    if "passages" in row:
        ex["gold_passages"] = row["passages"]
    return ex
