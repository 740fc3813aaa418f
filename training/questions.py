"""Questions a person would ask of a passage, made from its text by rules (no model), with their answers.

Used by ``python -m training prepare`` (``training.prepare``); every answer is a sentence of the passage, so
the data is reproducible and grounded:

* ``definition`` — the article's first sentence answers "What is X?" / "Who was X?", only when that sentence
  opens with the article's name as its subject (a Wikipedia title does; a news headline, a support article's
  or a paper's title does not, and "What is <headline>?" is no question a person asks);
* ``fact`` — sentences matched by a few English patterns become natural questions whose answer is that
  sentence: "X is/was a Y." -> "What is X?", "X was born in ..." -> "When/where was X born?", "In 1860, ..." ->
  "What happened in 1860 ...?", "X founded/wrote/invented ... Y." -> "What did X found/write/invent?",
  "The capital of X is Y." -> "What is the capital of X?";
* ``section`` — a section's first passage answers a question about the section heading (corpora with sections);
* ``cloze`` — inverse cloze, for passages no other kind covers: a sentence becomes a question by turning one
  key term into a wh-word (every passage gets a query). Its answer (``CLOZE_ANSWERS``) is the whole sentence
  (default) or the hidden term in a short sentence ("In 1648.", "The Dutch."); ``none`` writes the sentence
  but marks it not learned (``training.mix``): the question trains retrieval only. The first two were trained
  into the default model and measured (docs/training.md): whole sentences begin with the question's own words
  and the model learned to repeat the question; short terms taught it to answer with a name, often the
  question's own topic, and to retrieve more on prompts that need no corpus.

Each question keeps ``evidence``, the passage sentence that states its answer (the refusal examples check that
a hard negative does not contain it).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from onegen_core.wikipedia import split_sentences

QUESTION_KINDS = ("definition", "fact", "section", "cloze")
CLOZE_ANSWERS = ("sentence", "term", "none")
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
    evidence: str  # the passage sentence stating the answer (the answer itself, but for a cloze term answer)


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


# A whole year or name: not part of a longer number ("17,215"), a hyphenated word ("Co-princes"), an
# abbreviation ("St. Vincent") or a name with an initial ("Adam F. Kolb"), whose cut-off answers mislead.
# With whole-sentence answers the term only shapes the question: the first rule (any capitalised run or 3-4 digits)
# stays, so the data of the adapter trained with it is written again byte for byte.
_CLOZE_TERM_SENTENCE = re.compile(r"\b(\d{3,4}|[A-Z][a-z]+(?: [A-Z][a-z]+)*)\b")
_CLOZE_TERM = re.compile(r"(?<![\w,.'-])(\d{3,4}|[A-Z][a-z]+(?: [A-Z][a-z]+)*)(?![\w'-]|,\d|\.\w|\. [A-Z]| [A-Z]\.)")


def cloze_question(sentence: str, article: str, rng: random.Random, answer: str = "sentence") -> tuple[str, str] | None:
    """Inverse cloze as a question and its answer: one key term (a year or a name, not the first word) becomes
    a wh-word; the answer is ``sentence`` itself (``answer`` "sentence" or "none": the same question) or, with
    ``answer="term"``, that term in a short sentence.

    "In 1648 the island passed to the Dutch." -> ("In what year the island passed to the Dutch?", "In 1648.")
    reads oddly but keeps the sentence's words a person would search with, minus the answer itself; the
    article is named when the sentence does not mention it (a pronoun subject says nothing alone).
    """
    words = sentence.split()
    if not 8 <= len(words) <= 45:
        return None
    rule = _CLOZE_TERM if answer == "term" else _CLOZE_TERM_SENTENCE
    terms = [m for m in rule.finditer(sentence) if m.start() > 0 and (not article or m.group(1) not in article)]
    if not terms:
        return None
    m = rng.choice(terms)
    term = m.group(1)
    before = sentence[: m.start()]
    if answer != "term":
        wh = "what year" if term.isdigit() else "what"
    else:
        wh = "what" if not term.isdigit() else "what year" if _is_year(term, before) else "how many"
    q = (before + wh + sentence[m.end():]).rstrip(" .;:") + "?"
    if article and not any(w.lower() in sentence.lower() for w in article.split() if len(w) > 3):
        q = f"About {article}: {q}"
    return q, (_term_answer(term, before) if answer == "term" else sentence)


def _previous_word(before: str) -> str:
    return before.rstrip().rsplit(" ", 1)[-1].lower() if before.strip() else ""


def _is_year(number: str, before: str) -> bool:
    """A number reads as a year after "in", "since", "by"... and between 1000 and 2099 ("168 hours" is a count)."""
    prev = _previous_word(before).strip("(")
    return 1000 <= int(number) <= 2099 and (prev in ("", "in", "since", "until", "by", "from", "of", "after", "before")
                                            or re.fullmatch(r"\d{1,2},", prev) is not None)  # "February 28, 2016"


def _term_answer(term: str, before: str) -> str:
    """The hidden term as a short sentence: a year after "in" reads "In 1648.", a name keeps its article."""
    prev = _previous_word(before)
    if term.isdigit():
        return f"In {term}." if prev == "in" or (not prev and _is_year(term, before)) else f"{term}."
    if prev in ("the", "a", "an"):
        return f"{prev.capitalize()} {term}."
    return f"{term}."


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


def questions_for_article(recs: list[Record], rng: random.Random, *, max_per_passage: int,
                          cloze_answer: str = "sentence") -> list[Question]:
    """Questions whose answer is in one passage of an article, at most ``max_per_passage`` per passage
    (``cloze_answer``: one of ``CLOZE_ANSWERS``)."""
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
            mine.append(Question("definition", f"{wh} {r.article}?", first, r.id, first))
        if r.section and r.section not in seen_sections and sentences:
            seen_sections.add(r.section)
            tpl = rng.choice(SECTION_TEMPLATES)
            q = tpl.format(article=r.article, section=r.section, section_l=r.section.lower())
            mine.append(Question("section", q, sentences[0], r.id, sentences[0]))
        facts = [(q, s) for s in sentences for q, _ in fact_questions(s, r.article)]
        rng.shuffle(facts)
        seen_q = {q.question for q in mine}
        for q, s in facts:
            if q not in seen_q:
                mine.append(Question("fact", q, s, r.id, s))
                seen_q.add(q)
        if not mine:  # every passage gets a question: inverse cloze where no other kind applies
            candidates = sentences[:]
            rng.shuffle(candidates)
            for s in candidates:
                made = cloze_question(s, r.article if named else "", rng, cloze_answer)
                if made:
                    mine.append(Question("cloze", made[0], made[1], r.id, s))
                    break
        # Keep the natural kinds first, then fill up to the cap.
        order = {"definition": 0, "fact": 1, "section": 2, "cloze": 3}
        mine.sort(key=lambda q: order[q.kind])
        out.extend(mine[:max_per_passage])
    return out
