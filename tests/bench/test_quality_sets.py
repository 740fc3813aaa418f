"""bench/quality_sets: the hand-written evaluation sets have their sizes and kinds, ask about held-out articles
only, and share no prompt with the training data (``training.chat_prompts``, ``training.prepare``'s rules), so
``bench/quality.py`` measures what the model learned rather than recall of its templates (issue #18).

Runs from the committed files alone; the checks that need the default corpus (passage ids, answers in the
passages, every question the rules can make) run when ``.cache/onegen-default`` holds it and skip otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import common  # noqa: E402
import quality_metrics as qm  # noqa: E402

from training.chat_prompts import CHAT_KINDS, GENERAL_MORE, chat_prompts, general_questions  # noqa: E402
from training.prepare import PAST, SECTION_TEMPLATES, cloze_question, fact_questions, split_articles  # noqa: E402

KNOWLEDGE = common.read_set("knowledge")
NO_CORPUS = common.read_set("no_corpus")
GENERAL = common.read_set("general")
ARTICLES = common.corpus_articles()
HELDOUT = common.heldout_articles()
ARTICLE_NAMES = [re.sub(r"\s*\([^)]*\)$", "", a) for a in ARTICLES if len(a) > 1]  # "Abstract (law)" -> "Abstract"


def _corpus_path() -> Path | None:
    for p in (common.DEFAULT_ROOT / "wiki" / "corpus.jsonl", common.DEFAULT_ROOT / "passages.jsonl",
              common.DEFAULT_ROOT / "wiki" / "passages.jsonl"):
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="module")
def corpus() -> dict[str, dict]:
    path = _corpus_path()
    if path is None:
        pytest.skip("the default corpus is not prepared (.cache/onegen-default/passages.jsonl): "
                    "the committed-data checks above still ran")
    with path.open(encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f)}


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _user_turns(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def _eval_prompts() -> list[str]:
    return ([r["question"] for r in KNOWLEDGE] + [r["question"] for r in GENERAL]
            + [t for r in NO_CORPUS for t in _user_turns(r["messages"])])


# --------------------------------------------------------------------------- sizes, kinds, schema
def test_sizes_and_kinds():
    assert len(KNOWLEDGE) >= 150 and len(NO_CORPUS) >= 100 and len(GENERAL) >= 50
    kinds = Counter(r["kind"] for r in NO_CORPUS)
    assert set(kinds) == set(CHAT_KINDS), kinds
    assert min(kinds.values()) >= 10, kinds
    for name, rows in (("knowledge", KNOWLEDGE), ("no_corpus", NO_CORPUS), ("general", GENERAL)):
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), f"{name}: duplicate ids"
    questions = [_norm(q) for q in _eval_prompts()]
    assert len(questions) == len(set(questions)), [q for q, n in Counter(questions).items() if n > 1]


def test_rows_are_well_formed():
    for r in KNOWLEDGE + GENERAL:
        assert r["question"].strip() and r["answer"].strip(), r
        assert len(r["answer"].split()) <= 7, f"{r['id']}: the gold answer should be a few words: {r['answer']!r}"
        assert isinstance(r["aliases"], list), r
    for r in KNOWLEDGE:
        assert r["passages"] and all(isinstance(p, str) for p in r["passages"]), r
        assert qm.contains_answer(r["sentence"], [r["answer"]]), f"{r['id']}: its sentence does not state the answer"
    for r in GENERAL:
        assert r["fact_terms"], r
    for r in NO_CORPUS:
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "user" and roles[::2] == ["user"] * len(roles[::2]), r
        assert (len(roles) >= 3) == (r["kind"] == "conversation"), f"{r['id']}: only conversations are multi-turn"


# --------------------------------------------------------------------------- held-out articles
def test_knowledge_questions_are_about_heldout_articles_only():
    assert ARTICLES == sorted(set(ARTICLES)), "articles.txt must be sorted and unique"
    train, held = split_articles(ARTICLES, 0.2, 0)
    assert held == HELDOUT and not train & held and train | held == set(ARTICLES)
    outside = sorted({r["article"] for r in KNOWLEDGE} - held)
    assert not outside, f"knowledge questions about training articles: {outside}"
    per_article = Counter(r["article"] for r in KNOWLEDGE)
    assert set(per_article) == held, f"held-out articles without a question: {sorted(held - set(per_article))}"


def test_general_questions_name_no_corpus_article():
    for r in GENERAL:
        hit = [a for a in ARTICLE_NAMES if re.search(rf"\b{re.escape(a)}\b", r["question"])]
        assert not hit, f"{r['id']} is about a corpus article: {hit}"


def test_training_general_questions_ask_nothing_the_eval_general_set_asks():
    """The training pool's fillers and answers (``GENERAL_MORE``) are neither named in an evaluation general question
    nor its answer, and name no corpus article: the set measures the general questions the model did not see."""
    asked = [" ".join([r["question"], r["answer"], *r["aliases"]]) for r in GENERAL]
    for template, pairs in GENERAL_MORE:
        for filler, answer in pairs:
            question = template.format(x=filler)
            names_asked = [r["question"] for r in GENERAL] if answer[:1].isupper() else []  # a name, not "four"
            for word, texts in ((filler.removeprefix("the "), asked), (answer, names_asked)):
                hit = [e for e in texts if re.search(rf"\b{re.escape(word)}\b", e, re.IGNORECASE)]
                assert not hit, f"training question {question!r} shares {word!r} with the eval set: {hit[0]!r}"
            hit = [a for a in ARTICLE_NAMES if re.search(rf"\b{re.escape(a)}\b", question)]
            assert not hit, f"training question {question!r} is about a corpus article: {hit}"


def test_passages_exist_in_their_heldout_article_and_state_the_answer(corpus):
    """Every passage id exists in the row's article; one passage states the gold and quotes the row's sentence."""
    assert {r["metadata"]["article"] for r in corpus.values()} == set(ARTICLES), "articles.txt is out of date"
    for r in KNOWLEDGE:
        for pid in r["passages"]:
            assert pid in corpus, f"{r['id']}: no passage {pid}"
            assert corpus[pid]["metadata"]["article"] == r["article"], f"{r['id']}: {pid} is in another article"
        assert any(qm.contains_answer(corpus[p]["text"], [r["answer"]]) for p in r["passages"]), \
            f"{r['id']}: {r['answer']!r} is not in {r['passages']}"
        assert any(r["sentence"] in corpus[p]["text"] for p in r["passages"]), f"{r['id']}: its sentence is not quoted"


def test_general_answers_are_not_stated_in_the_corpus(corpus):
    from onegen_core.wikipedia import split_sentences

    sentences = [s.lower() for p in corpus.values() for s in split_sentences(p["text"])]
    for r in GENERAL:
        words = [re.compile(rf"\b{re.escape(a.lower())}\b") for a in [r["answer"], *r["aliases"]]]
        terms = [t.lower() for t in r["fact_terms"]]
        stated = [s for s in sentences if all(t in s for t in terms) and any(w.search(s) for w in words)]
        assert not stated, f"{r['id']}: the corpus states it: {stated[0][:160]!r}"


# --------------------------------------------------------------------------- no overlap with training
def test_no_eval_prompt_overlaps_the_training_chat_and_general_prompts():
    train = {_norm(t) for c in chat_prompts(5000) for t in _user_turns(c.as_messages())}
    train |= {_norm(g) for g in general_questions(10_000)}
    assert len(train) > 1000  # the generator still makes its prompts
    for p in map(_norm, _eval_prompts()):
        hits = [t for t in train if t in p or p in t]
        assert not hits, f"eval prompt {p!r} overlaps training prompts {hits[:3]}"


_VERBS = "|".join(PAST.values())
_NAME = r"[A-Z][\w'.-]*(?: (?:of |the |and |de |von |van )?[A-Z][\w'.-]*){0,5}"
RULE_SHAPES = (  # the questions training.prepare's rules write, as patterns (its docstring lists them)
    r"^What does the article on .+ say about .+\?$", r"^Tell me about .+ in .+\.$",
    r"^What is known about the .+ of .+\?$", r"^What happened in \d{3,4} in the history of .+\?$",
    rf"^(When|Where) was {_NAME} born\?$", r"^What (is|was|are|were) the [a-z][a-z ]{2,30} of [A-Z][\w' -]{1,40}\?$",
    rf"^What (is|was|are|were) {_NAME}\?$", rf"^What did {_NAME} ({_VERBS})\?$", r"^About .+: .+\?$",
)


def test_knowledge_questions_do_not_have_the_shape_of_a_training_rule():
    for r in KNOWLEDGE:
        q = r["question"]
        assert q not in (f"What is {r['article']}?", f"Who was {r['article']}?"), r["id"]
        shapes = [s for s in RULE_SHAPES if re.match(s, q)]
        assert not shapes, f"{r['id']} {q!r} has the shape of a training.prepare rule: {shapes}"


class _Nth:
    """A stand-in for ``random.Random`` whose ``choice`` takes the i-th item: every choice a rule can make."""

    def __init__(self, i: int):
        self.i = i

    def choice(self, seq):
        return seq[self.i % len(seq)]


def _rule_questions(recs: list[dict]) -> set[str]:
    """Every question training.prepare's rules can write for one article, whatever its seed."""
    from onegen_core.wikipedia import split_sentences

    article = recs[0]["metadata"]["article"]
    out = {f"What is {article}?", f"Who was {article}?"}
    for r in recs:
        section = r["metadata"].get("section") or ""
        if section:
            out |= {t.format(article=article, section=section, section_l=section.lower()) for t in SECTION_TEMPLATES}
        for s in split_sentences(r["text"]):
            out |= {q for q, _ in fact_questions(s, article)}
            for name in (article, ""):
                out |= {made[0] for i in range(40) for how in ("sentence", "term")
                        if (made := cloze_question(s, name, _Nth(i), how))}
    return out


def test_no_knowledge_question_is_one_the_training_rules_write(corpus):
    by_article: dict[str, list[dict]] = {}
    for r in corpus.values():
        by_article.setdefault(r["metadata"]["article"], []).append(r)
    for article in sorted({r["article"] for r in KNOWLEDGE}):
        rules = {_norm(q) for q in _rule_questions(by_article[article])}
        assert len(rules) > 5
        same = [r["id"] for r in KNOWLEDGE if r["article"] == article and _norm(r["question"]) in rules]
        assert not same, f"{article}: {same} are questions training.prepare writes"
