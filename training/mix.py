"""The mixed training recipe: one model that chats, decides when to retrieve, and answers the question.

``python -m training prepare`` writes, by default, a mix of five tasks, six with ``--plain-text`` (the
``task`` field of each ``train.jsonl`` row), so that fine-tuning for retrieval does not cost the model its
generator:

* ``retrieve`` — a question about the corpus; the assistant emits the query token, the passage that
  answers it follows in the passage delimiters (what the engine inserts), then a short answer from
  it: the sentence that states the fact (with ``--cloze-answer term``, an inverse-cloze question's hidden
  term in a short sentence; with ``none``, an inverse-cloze question's answer is not learned, and it is not
  asked in ``reading``; ``training.questions`` makes the questions). ``positive`` / ``negative`` feed the
  contrastive loss.
* ``refusal`` — the same question with a hard negative in the slot (a passage that does not contain
  the answer; with ``--refusal-slot other-article``, the question's best BM25 match in another article): the
  answer says so (``REFUSAL``) and then gives the base model's own answer, marked as
  general knowledge (``GENERAL_KNOWLEDGE``). The query token still learns the right passage
  (``positive`` is the one that answers).
* ``general`` — a general-knowledge question no corpus document is about (``chat_prompts``). It is
  retrieved for like every factual question: a model cannot know which facts an index holds, least
  of all for documents added after training. The passage the training index returns does not answer
  it, so the target is again ``REFUSAL`` + the base model's own answer as general knowledge (a question whose
  passage names its known answer, ``GENERAL_ANSWERS``, is left out). No contrastive loss (there is no right
  passage).
* ``chat`` — a prompt that needs no corpus (greetings, arithmetic, instructions, rewriting and
  translation, creative writing, advice, questions about the conversation), answered WITHOUT the
  query token with the base model's own answer (``training.distill``): the model keeps what the
  base could do and learns when not to retrieve.
* ``reading`` — a passage pasted into the prompt and a question about it, answered without the
  query token: the pipeline style (retrieve elsewhere, paste, ask) keeps working.
* ``text`` (``--plain-text N``) — plain text of training articles' passages (``{"text": ...}`` rows, no
  chat template), learned as a language model: the rest of the mix is chat, and without these rows
  the model's loss on plain text drifted +15% over the base. With ``--plain-text-file`` the text comes from
  that file instead (text from outside the corpus; 800 rows of the corpus's own passages doubled retrieval
  on prompts that need no corpus).

Answers from the base model are greedy, with retrieval off, generated offline with the engine
(cached and resumable); conversations whose answer was cut off at ``distill_max_tokens`` are left out.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from onegen_core.wikipedia import GENSIM_NEWS, MIN_PASSAGE_WORDS, find_gensim_file, passages_of

from .chat_prompts import GENERAL_ANSWERS, chat_prompts, general_questions
from .config import _f
from .distill import distill
from .questions import Question, Record


class SlotFormat(Protocol):
    """How a retrieval reads in a conversation, and whether inverse-cloze answers are learned
    (``training.prepare.PrepareConfig`` is one)."""

    query_token: str
    passage_open: str
    passage_close: str
    passage_template: str
    seed: int
    cloze_answer: str

FILE_PASSAGE_WORDS = 90  # --plain-text-file passages: the default corpus's passage length
TASKS = ("retrieve", "refusal", "general", "chat", "reading", "text")
REFUSAL_SLOTS = ("hard-negative", "other-article")
OTHER_ARTICLE_DEPTH = 200  # BM25 hits searched for a refusal slot of another article
REFUSAL = "The retrieved passage does not answer this."
GENERAL_KNOWLEDGE = "From general knowledge: "
READING_TEMPLATES = (
    "{passage}\n\nBased on the text above, {question}",
    "Here is a passage:\n{passage}\n\nQuestion: {question}",
    "Read the following and answer the question.\n\n{passage}\n\n{question}",
    "{question}\nUse this text to answer:\n{passage}",
)


@dataclass(frozen=True)
class MixConfig:
    """The mix's knobs (``python -m training prepare`` flags of the same names)."""

    base: str | None = _f(None, "the checkpoint to fine-tune, whose own answers the chat, general and refusal "
                             "examples distil (required by the mixed recipe)")
    chat_prompts: int = _f(900, "no-corpus prompts answered without retrieval (7 kinds in turn)")
    general_questions: int = _f(100, "general-knowledge questions outside the corpus (at most 279; 100 trained the "
                                     "shipped default)")
    refusal_fraction: float = _f(0.15, "fraction of the corpus questions also asked with a hard negative in the slot")
    refusal_slot: str = _f("hard-negative", "what fills a refusal's slot: 'hard-negative' (the first of the question's "
                                            "hard negatives that does not answer it: mostly another passage of the "
                                            "same article) or 'other-article' (the question's best BM25 match in "
                                            "another article: a passage on another topic)")
    reading_fraction: float = _f(0.15, "fraction of the corpus questions also asked with the passage in the prompt")
    plain_text: int = _f(0, "passages of training articles learned as plain text (language modelling, no template); "
                            "800 held the plain-text loss 3-4 in 100 below the base's and doubled retrieval on "
                            "no-corpus prompts (docs/training.md)")
    plain_text_file: str | None = _f(None, "a UTF-8 text file, one document per line, learned as the plain text "
                                           "instead of the training articles' passages (cut into passages of about "
                                           "90 words as the corpus is): text from outside the corpus; "
                                           "'gensim-news': the 300 news stories in gensim's test data")
    distill_max_tokens: int = _f(160, "longest distilled answer; longer ones are left out (cut off)")
    distill_batch_size: int = _f(32, "conversations the engine generates at once while distilling")
    distill_dtype: str = _f("auto", "dtype of the engine that distils (auto: float32 on the CPU, bf16 on a GPU)")

    def __post_init__(self) -> None:
        for name in ("refusal_fraction", "reading_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.refusal_slot not in REFUSAL_SLOTS:
            raise ValueError(f"--refusal-slot must be one of {list(REFUSAL_SLOTS)}, got {self.refusal_slot!r}")
        for name in ("chat_prompts", "general_questions", "plain_text"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.plain_text_file and self.plain_text == 0:
            raise ValueError("--plain-text-file gives the text of the plain-text rows: pass --plain-text N (N > 0)")
        if self.distill_max_tokens < 8 or self.distill_batch_size < 1:
            raise ValueError("--distill-max-tokens must be >= 8 and --distill-batch-size >= 1")

    def check_base(self) -> None:
        if self.base is None:
            raise ValueError("the mixed recipe distils the base model's answers: pass --base CHECKPOINT (the model you "
                             "will fine-tune), or --recipe retrieval for the retrieval-only recipe")


def retrieval_rows(questions: list[Question], negatives: list[list[str]], recs: list[Record],
                   cfg: SlotFormat) -> list[dict[str, Any]]:
    """The ``retrieve`` rows: OneGen conversations (Contract 3) that retrieve the passage answering each question.
    With ``cloze_answer`` "none" an inverse-cloze row's answer is written but not learned (``learn_answer``)."""
    by_id = {r.id: r for r in recs}
    rows = []
    for q, n in zip(questions, negatives, strict=True):
        reply = {"role": "assistant", "content": _assistant_retrieval(cfg, by_id[q.passage], q.answer),
                 "positive": [[q.passage]], "negative": [n]}
        if not answer_learned(q, cfg):
            reply["learn_answer"] = False
        rows.append(_row("retrieve", [{"role": "user", "content": q.question}, reply],
                         kind=q.kind, answer=q.answer, article=by_id[q.passage].article))
    return rows


def answer_learned(q: Question, cfg: SlotFormat) -> bool:
    """Whether ``q``'s answer is a target: not an inverse-cloze one under ``--cloze-answer none``."""
    return not (q.kind == "cloze" and cfg.cloze_answer == "none")


def _assistant_retrieval(cfg: SlotFormat, rec: Record, answer: str) -> str:
    body = cfg.passage_template.format(text=rec.text, title=rec.title)
    return f"{cfg.query_token}{cfg.passage_open}{body}{cfg.passage_close}{answer}"


def _general_answer(base_answer: str | None, sentences: int = 2) -> str:
    """The refusal, then the base model's own answer (its first ``sentences``: a note, not an essay)."""
    if not base_answer:
        return REFUSAL
    ends = [i + 1 for i, ch in enumerate(base_answer) if ch in ".!?" and base_answer[i + 1: i + 2] in (" ", "\n", "")]
    short = base_answer[: ends[sentences - 1]] if len(ends) >= sentences else base_answer
    return f"{REFUSAL} {GENERAL_KNOWLEDGE}{short.strip()}"


def _row(task: str, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"messages": messages, "task": task, **extra}


def passage_without_answer(q: Question, candidates: list[str], by_id: dict[str, Record]) -> Record | None:
    """The first of ``candidates`` that contains neither the evidence sentence nor the short answer (else None: no
    refusal example for ``q``): teaching "not in the passage" on a passage that does state the answer teaches refusing."""
    core = q.answer.rstrip(".").removeprefix("In ").removeprefix("The ").removeprefix("A ").removeprefix("An ")
    for pid in candidates:
        rec = by_id[pid]
        if q.evidence not in rec.text and q.answer not in rec.text and core not in rec.text:
            return rec
    return None


def other_article_passages(questions: list[Question], recs: list[Record], pool: list[int], search: Any,
                           depth: int = OTHER_ARTICLE_DEPTH) -> list[list[str]]:
    """Per question, its BM25 matches (``search`` over ``pool``, best first, ``depth`` searched) in articles other
    than its passage's (``--refusal-slot other-article``): passages on another topic, as when a retrieval misses."""
    if not questions:
        return []
    article_of = {r.id: r.article for r in recs}
    hits = search([q.question for q in questions], depth)
    return [[recs[pool[d]].id for d in row if recs[pool[d]].article != article_of[q.passage]]
            for q, row in zip(questions, hits, strict=True)]


def states_answer(text: str, answer: str | None) -> bool:
    """Whether ``text`` names ``answer`` (a word starting with it; the whole word, case-sensitive, for a short one
    like "Fe"): a general question's retrieved passage that does cannot be trained as "the passage does not answer
    this"."""
    if not answer:
        return False
    if len(answer) <= 3:
        return re.search(rf"\b{re.escape(answer)}\b", text) is not None
    return re.search(rf"\b{re.escape(answer)}", text, re.IGNORECASE) is not None


def text_rows(recs: list[Record], pool: list[int], count: int, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` plain-text rows: passages of the training pool, as language modelling (no template, no query)."""
    picked = rng.sample(pool, min(count, len(pool)))
    return [{"text": recs[i].text, "task": "text", "article": recs[i].article} for i in picked if recs[i].text.strip()]


def file_text_rows(path: str | os.PathLike, count: int, rng: random.Random,
                   max_words: int = FILE_PASSAGE_WORDS) -> list[dict[str, Any]]:
    """``count`` plain-text rows cut from ``path`` (one document per line; ``--plain-text-file``) as the corpus's
    passages are cut (``passages_of``), each with its ``source`` ("file:line"). A missing, undecodable or empty file
    is a ``ValueError`` naming it (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--plain-text-file {path}: no such file")
    chunks: list[tuple[str, int]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"--plain-text-file {path}:{lineno}: not UTF-8 ({e.reason})") from None
            chunks += [(c, lineno) for c in passages_of([line], max_words)]
    if not chunks:
        raise ValueError(f"--plain-text-file {path}: no passage of at least {MIN_PASSAGE_WORDS} words")
    picked = sorted(rng.sample(range(len(chunks)), min(count, len(chunks))))
    return [{"text": chunks[i][0], "task": "text", "source": f"{path.name}:{chunks[i][1]}"} for i in picked]


def build_mix(retrieve: list[dict[str, Any]], questions: list[Question], negatives: list[list[str]],
              recs: list[Record], pool: list[int], cfg: SlotFormat, mix: MixConfig, work: Path, rng: random.Random,
              search: Any) -> list[dict[str, Any]]:
    """The ``retrieve`` rows plus every other task of the mix, shuffled. ``search(texts, k)`` -> indices into ``pool``."""
    mix.check_base()
    file_rows = None  # read first: a bad file fails before the distillation, not after it
    if mix.plain_text_file:
        path = find_gensim_file(GENSIM_NEWS) if mix.plain_text_file == "gensim-news" else mix.plain_text_file
        file_rows = file_text_rows(path, mix.plain_text, random.Random(cfg.seed))
    by_id = {r.id: r for r in recs}
    rows = list(retrieve)
    order = list(range(len(questions)))
    rng.shuffle(order)
    n_ref = round(mix.refusal_fraction * len(questions))
    asked = order[:n_ref]
    candidates = other_article_passages([questions[i] for i in asked], recs, pool, search) \
        if mix.refusal_slot == "other-article" else [negatives[i] for i in asked]
    refusals = [(questions[i], negatives[i], slot) for i, cands in zip(asked, candidates, strict=True)
                if (slot := passage_without_answer(questions[i], cands, by_id)) is not None]
    reading = [questions[i] for i in order[n_ref: n_ref + round(mix.reading_fraction * len(questions))]
               if answer_learned(questions[i], cfg)]
    chats = chat_prompts(mix.chat_prompts, seed=cfg.seed)
    generals = general_questions(mix.general_questions, seed=cfg.seed)

    convs = [[{"role": "user", "content": q.question}] for q, _, _ in refusals]
    convs += [[{"role": "user", "content": g}] for g in generals] + [c.as_messages() for c in chats]
    answers = distill(mix.base, convs, work / "distilled.jsonl", max_tokens=mix.distill_max_tokens,
                      batch_size=mix.distill_batch_size, dtype=mix.distill_dtype)
    ref_answers, answers = answers[: len(refusals)], answers[len(refusals):]
    gen_answers, chat_answers = answers[: len(generals)], answers[len(generals):]

    for (q, n, slot), base in zip(refusals, ref_answers, strict=True):
        rows.append(_row("refusal", [{"role": "user", "content": q.question},
                                     {"role": "assistant", "content": _assistant_retrieval(cfg, slot, _general_answer(base)),
                                      "positive": [[q.passage]], "negative": [n]}], kind=q.kind,
                         article=by_id[q.passage].article))
    slots = search(generals, 1) if generals else []
    for g, hit, base in zip(generals, slots, gen_answers, strict=True):
        slot = recs[pool[hit[0]]]
        if base is None or states_answer(slot.text, GENERAL_ANSWERS.get(g)):
            continue
        rows.append(_row("general", [{"role": "user", "content": g},
                                     {"role": "assistant", "content": _assistant_retrieval(cfg, slot, _general_answer(base)),
                                      "positive": [[]], "negative": [[]]}]))
    for c, base in zip(chats, chat_answers, strict=True):
        if base is not None:
            rows.append(_row("chat", [*c.as_messages(), {"role": "assistant", "content": base}], kind=c.kind))
    for q in reading:
        rec = by_id[q.passage]
        prompt = rng.choice(READING_TEMPLATES).format(passage=f"{rec.title}\n{rec.text}", question=q.question)
        rows.append(_row("reading", [{"role": "user", "content": prompt}, {"role": "assistant", "content": q.answer}],
                         kind=q.kind, article=rec.article))
    rows += file_rows if file_rows is not None else text_rows(recs, pool, mix.plain_text, rng)
    rng.shuffle(rows)
    return rows


def add_mix_flags(parser: Any) -> None:
    """``MixConfig``'s fields as ``--flag``s (declared once, on the fields)."""
    for f in fields(MixConfig):
        kind = type(f.default) if f.default is not None else str
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})")


def mix_config(args: Any) -> MixConfig:
    return MixConfig(**{f.name: getattr(args, f.name) for f in fields(MixConfig)})
