"""The mixed training recipe (``training.mix``): every task written, the query token where it belongs, the
base model's own answers distilled with the engine (resumable), questions that read like questions on a
corpus that is not Wikipedia, and no held-out article in the training data."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from wiki_dump_fixture import ARTICLES, write_dump

from onegen_core.wikipedia import wikipedia_passages, write_corpus
from training.chat_prompts import CHAT_KINDS, GENERAL_ANSWERS, chat_prompts, general_questions
from training.distill import distill
from training.mix import GENERAL_KNOWLEDGE, REFUSAL, MixConfig, states_answer
from training.prepare import PrepareConfig, prepare, read_passages

RQ, OPEN, CLOSE = "[RQ]", "<paragraph>", "</paragraph>"


def make_eos_likely(ckpt_dir) -> None:
    """A random tiny model ends its answers: the end-of-turn token gets the LM-head row of the token greedy
    decoding emits most, scaled by 1.05, so it wins wherever that token would (answers finish, not run to max)."""
    from collections import Counter as C

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt_dir)
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    counts: C[int] = C()
    for p in ("Hello there", "What is 3 plus 4", "Write a poem"):
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        with torch.no_grad():
            counts.update(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist())
    donor = counts.most_common(1)[0][0]
    sd = load_file(str(ckpt_dir / "model.safetensors"))
    key = "lm_head.weight" if "lm_head.weight" in sd else "model.embed_tokens.weight"
    for eos in {tok.eos_token_id, *tok.convert_tokens_to_ids(["<|im_end|>"])} - {None, tok.unk_token_id}:
        sd[key][eos] = sd[key][donor] * 1.05
    save_file(sd, str(ckpt_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from onegen_core.testing import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp("mix-base") / "base", arch="llama",
                                 extra_text="\n".join(ARTICLES.values()), max_positions=1024)
    make_eos_likely(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-wiki")
    path = root / "passages.jsonl"
    write_corpus(wikipedia_passages(write_dump(root / "wiki.xml.bz2"), max_words=40, min_article_words=40), path)
    return path


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


MIX = dict(chat_prompts=21, general_questions=6, refusal_fraction=0.5, reading_fraction=0.3, plain_text=5,
           distill_max_tokens=24, distill_batch_size=8, distill_dtype="float32")


def test_the_mix_writes_every_task_with_the_query_token_where_it_belongs(tmp_path, base, corpus):
    out = tmp_path / "data"
    summary = prepare(corpus, out, PrepareConfig(heldout=0.34, seed=1), MixConfig(base=str(base), **MIX))
    rows = _rows(out / "train.jsonl")
    tasks = Counter(r["task"] for r in rows)
    assert set(tasks) == {"retrieve", "refusal", "general", "chat", "reading", "text"}, tasks
    assert summary["train_tasks"] == dict(tasks)
    passages = {r.id: r for r in read_passages(corpus)}
    train_texts = {p.text for p in passages.values() if p.article not in summary["heldout_articles"]}
    for r in rows:
        if r["task"] == "text":  # plain text of a training passage: no messages, no query token
            assert "messages" not in r and r["text"] in train_texts
            continue
        *context, answer = r["messages"]
        assert answer["role"] == "assistant" and all(m["role"] in ("user", "assistant") for m in context)
        assert all(RQ not in m["content"] for m in context)  # the user never types the query token
        content = answer["content"]
        if r["task"] in ("retrieve", "refusal", "general"):
            assert content.startswith(RQ + OPEN) and content.count(RQ) == 1 and CLOSE in content
            slot, reply = content[len(RQ + OPEN):].split(CLOSE)
            assert len(answer["positive"]) == len(answer["negative"]) == 1
            if r["task"] == "retrieve":
                assert answer["positive"] == [[slot_id := answer["positive"][0][0]]]
                assert slot.endswith(passages[slot_id].text) and reply == r["answer"] and reply in slot
            elif r["task"] == "refusal":  # a hard negative fills the slot; the query still learns the right passage
                [[pos]] = answer["positive"]
                assert not slot.endswith(passages[pos].text) and reply.startswith(REFUSAL)
            else:
                assert answer["positive"] == [[]] and reply.startswith(REFUSAL + " " + GENERAL_KNOWLEDGE)
        else:
            assert RQ not in content and OPEN not in content and "positive" not in answer
    reading = [r for r in rows if r["task"] == "reading"]
    assert all(r["messages"][1]["content"] in r["messages"][0]["content"] for r in reading)  # answer is in the prompt
    assert {r["kind"] for r in rows if r["task"] == "chat"} <= set(CHAT_KINDS)

    # The data passes the trainer's own loader: unit ids resolve, every conversation renders, the query token of
    # the retrieving tasks is a RET position with (or, for general questions, without) a positive.
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.text.rendering import Renderer
    from training.data import load_training_data

    data = load_training_data(Renderer.for_checkpoint(load_checkpoint(base)), train_file=out / "train.jsonl",
                              db_file=out / "db.jsonl", max_length=1024, progress=False)
    assert len(data.train) == len(rows)
    plain = [e for e in data.train if not e.targets[0] and e.targets[1:].all() and not e.query_positions]
    assert len(plain) >= tasks["text"]  # a plain-text row is language modelling: every token after the first
    with_query = Counter(bool(e.query_positions) for e in data.train)
    assert with_query[True] == tasks["retrieve"] + tasks["refusal"] + tasks["general"]
    assert sum(1 for e in data.train if e.query_positions and not e.positives[0]) == tasks["general"]


def test_distillation_is_the_engines_greedy_answer_and_resumes(tmp_path, base):
    convs = [[{"role": "user", "content": f"Hello number {i}"}] for i in range(5)]
    cache = tmp_path / "distilled.jsonl"
    first = distill(base, convs[:3], cache, max_tokens=24, batch_size=2, dtype="float32", progress=False)
    assert len(_rows(cache)) == 3
    both = distill(base, convs, cache, max_tokens=24, batch_size=2, dtype="float32", progress=False)
    assert both[:3] == first and len(_rows(cache)) == 5  # only the two new conversations were generated
    assert any(a is not None for a in both)

    from onegen_core.engine import Engine, EngineConfig
    from onegen_core.engine.params import RetrievalParams, SamplingParams

    eng = Engine.from_checkpoint(base, None, EngineConfig(dtype="float32"))
    [ref] = eng.generate(messages=[convs[4]], sampling=SamplingParams(max_tokens=24),
                         retrieval=RetrievalParams(enabled=False))
    from training.distill import whole_sentences

    assert both[4] == whole_sentences(ref.text, ref.finish_reason == "stop")


def test_the_mixed_recipe_asks_for_its_base():
    with pytest.raises(ValueError, match="--base"):
        prepare("unused.jsonl", "unused", PrepareConfig(), MixConfig())


def test_no_heldout_article_reaches_the_training_data(tmp_path, base, corpus):
    out = tmp_path / "data"
    summary = prepare(corpus, out, PrepareConfig(heldout=0.34, seed=1), MixConfig(base=str(base), **MIX))
    held = set(summary["heldout_articles"])
    passages = read_passages(corpus)
    held_ids = {p.id for p in passages if p.article in held}
    held_texts = [p.text for p in passages if p.article in held]
    blob = (out / "train.jsonl").read_text() + (out / "db.jsonl").read_text()
    assert not any(pid in re.findall(r'"([^"]+)"', blob) for pid in held_ids)
    assert not any(t in blob for t in held_texts)


NEWS = [
    ("Storm closes schools across the northern valley", "Heavy snow closed 40 schools across the northern valley on "
     "Monday. The regional weather office said the storm dropped 35 centimetres of snow overnight. Officials expect "
     "the schools to reopen on Wednesday once the roads are cleared."),
    ("An earthquake measuring 4.1 on the Richter scale shakes the coast", "An earthquake measuring 4.1 shook the "
     "coast near Port Alden early on Tuesday. The Coastal Seismic Center reported no damage. Residents of Port Alden "
     "said the shaking lasted about ten seconds."),
    ("City council approves new bicycle lanes", "The city council approved twelve kilometres of new bicycle lanes "
     "on Thursday. Mayor Ines Calder said the lanes will connect the university with the central station. "
     "Construction will begin in April and cost 3 million euros."),
    ("How to reset your router", "To reset the Lumen X2 router, hold the reset button for ten seconds until the "
     "light blinks orange. The router then restarts with its factory settings. Your Wi-Fi password is printed on "
     "the label under the router."),
    ("Local bakery wins national award", "Harvest Oven, a bakery in Millbrook, won the National Bread Award in "
     "2024. The bakery was founded by Rosa Lind in 1998. Its rye loaf was named the best bread in the country."),
    ("Quarterly results beat expectations", "Norvik Systems reported revenue of 210 million dollars for the third "
     "quarter. The company said demand for its sensors grew in Asia. Norvik Systems was founded in Oslo in 2005."),
]


def test_questions_on_a_corpus_that_is_not_wikipedia_read_like_questions(tmp_path):
    """Regression (issue #18): ``prepare --corpus`` on news made 93 of 101 questions "What is <headline>?"
    ("What is An earthquake measuring 4.1 on the?")."""
    corpus = tmp_path / "news.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"n{i}", "title": t, "text": x}) + "\n" for i, (t, x) in enumerate(NEWS)))
    prepare(corpus, tmp_path / "data", PrepareConfig(heldout=0.34, seed=0, recipe="retrieval"))
    questions = [r["messages"][0]["content"] for f in ("train.jsonl", "eval.jsonl") for r in _rows(tmp_path / "data" / f)]
    assert len(questions) >= len(NEWS)
    for q in questions:
        assert q.endswith("?"), q
        assert not any(t in q for t, _ in NEWS), q  # no headline pasted into a question
        assert not re.match(r"^(What is|Who was) [A-Z]\w+( \w+){4,}\?$", q), q


def test_cloze_term_answers_are_short_and_in_their_passage(tmp_path):
    """``--cloze-answer term``: the hidden term in a short sentence, found in the passage, never the question's
    own words again (whole-sentence answers begin with them; a model trained on them repeated the question)."""
    corpus = tmp_path / "news.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"n{i}", "title": t, "text": x}) + "\n" for i, (t, x) in enumerate(NEWS)))
    prepare(corpus, tmp_path / "data", PrepareConfig(heldout=0.34, seed=0, recipe="retrieval", cloze_answer="term"))
    cloze = [r for f in ("train.jsonl", "eval.jsonl") for r in _rows(tmp_path / "data" / f) if r["kind"] == "cloze"]
    assert cloze
    for r in cloze:
        question, content = r["messages"][0]["content"], r["messages"][1]["content"]
        slot, reply = content.split(CLOSE)
        assert reply == r["answer"] and len(reply.split()) <= 6 and reply.endswith(".")
        assert reply.removeprefix("In ").removesuffix(".").lower() in slot.lower()  # "The Dutch." of "the Dutch"
        assert not reply.startswith(question[:15])
    with pytest.raises(ValueError, match="--cloze-answer"):
        PrepareConfig(cloze_answer="word")


def test_the_default_cloze_answer_is_its_sentence_and_its_question_rule_unchanged():
    """The shipped default adapter was trained on whole-sentence cloze answers: that rule writes the same
    questions as when it was trained (its data is written again byte for byte)."""
    import random

    from training.questions import cloze_question

    s = "The island passed to the Dutch Republic in 1648, after the Peace of Westphalia."
    got = {cloze_question(s, "", random.Random(i)) for i in range(30)}
    assert got == {("The island passed to the what in 1648, after the Peace of Westphalia?", s),
                   ("The island passed to the Dutch Republic in what year, after the Peace of Westphalia?", s),
                   ("The island passed to the Dutch Republic in 1648, after the what of Westphalia?", s),
                   ("The island passed to the Dutch Republic in 1648, after the Peace of what?", s)}


def test_inverse_cloze_term_answers_name_whole_terms():
    import random

    from training.questions import cloze_question

    def every(sentence):
        return {cloze_question(sentence, "", random.Random(i), "term") for i in range(30)} - {None}

    made = every("In 1648 the island passed to the Dutch after a long siege.")
    assert ("In what year the island passed to the Dutch after a long siege?", "In 1648.") in made
    assert ("In 1648 the island passed to the what after a long siege?", "The Dutch.") in made
    counts = every("The prisoners may be held for as long as 168 hours without any charge in Alberta.")
    assert ("The prisoners may be held for as long as how many hours without any charge in Alberta?", "168.") in counts
    # no half terms: a number with a thousands separator, a hyphenated word, an abbreviation, an initial
    for sentence, bad in (("The most common aboriginal language is Cree with 17,215 speakers in Alberta.", "215."),
                          ("The Council may ask the Co-princes to dissolve the Council of Andorra.", "The Co."),
                          ("The openly bisexual radical poet Edna St. Vincent Millay wrote it.", "Edna St."),
                          ("The term was coined and defined by Adam F. Kollar in Vienna.", "Adam.")):
        assert bad not in {a for _, a in every(sentence)}, sentence


def test_plain_text_rows_are_language_modelling_and_bad_ones_are_named(tmp_path, base):
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.text.rendering import Renderer
    from training.data import DataError, load_training_data

    renderer = Renderer.for_checkpoint(load_checkpoint(base))
    db = tmp_path / "db.jsonl"
    db.write_text(json.dumps({"id": "d1", "text": "Some passage."}) + "\n")
    good = tmp_path / "train.jsonl"
    good.write_text(json.dumps({"text": "The island passed to the Dutch in 1648."}) + "\n")
    [ex] = load_training_data(renderer, train_file=good, db_file=db, max_length=64, progress=False).train
    assert ex.ids.tolist() == renderer.text("The island passed to the Dutch in 1648.")
    assert not ex.targets[0] and ex.targets[1:].all() and ex.query_positions == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "  "}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'text' must be a non-empty string"):
        load_training_data(renderer, train_file=bad, db_file=db, max_length=64, progress=False)


def test_plain_text_from_a_file_replaces_the_corpus_passages(tmp_path, base, corpus):
    """``--plain-text-file``: the text rows are passages cut from the file as the corpus is (whole sentences, about
    90 words, each naming its line), none from the corpus; the rest of the mix is the same."""
    def story(n: int) -> str:  # 12 sentences of 12 words: two passages of at most 90 words
        return " ".join(f"Story {n} sentence {j} tells about the harbour and the town council." for j in range(12))

    news = tmp_path / "news.txt"
    news.write_text(f"{story(0)}\n\n{story(1)}\nToo short.\n", encoding="utf-8")
    mix = dict(MIX, chat_prompts=0, general_questions=0, refusal_fraction=0.0, plain_text=50)  # nothing to distil
    a = prepare(corpus, tmp_path / "a", PrepareConfig(heldout=0.34, seed=1), MixConfig(base=str(base), **mix))
    b = prepare(corpus, tmp_path / "b", PrepareConfig(heldout=0.34, seed=1),
                MixConfig(base=str(base), plain_text_file=str(news), **mix))
    text = [r for r in _rows(tmp_path / "b" / "train.jsonl") if r["task"] == "text"]
    assert {r["source"] for r in text} == {"news.txt:1", "news.txt:3"} and len(text) == 4
    assert all(20 <= len(r["text"].split()) <= 90 and r["text"].endswith(".") and "article" not in r for r in text)
    assert {k: v for k, v in a["train_tasks"].items() if k != "text"} == \
        {k: v for k, v in b["train_tasks"].items() if k != "text"}


@pytest.mark.parametrize("content, flags, message", [
    (None, {}, r"--plain-text-file .*missing.txt: no such file"),
    (b"ok line\n\xff\xfe bad\n", {}, r"--plain-text-file .*bad.txt:2: not UTF-8"),
    (b"Too short.\n", {}, r"no passage of at least 20 words"),
    (b"x", {"plain_text": 0}, r"pass --plain-text N"),
])
def test_a_bad_plain_text_file_is_named_before_any_distillation(tmp_path, base, corpus, content, flags, message):
    name = {None: "missing.txt", b"Too short.\n": "short.txt", b"x": "x.txt"}.get(content, "bad.txt")
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        mix = MixConfig(base=str(base), plain_text_file=str(path), **{**MIX, **flags})
        prepare(corpus, tmp_path / "out", PrepareConfig(heldout=0.34, seed=1), mix)
    assert not (tmp_path / "out" / "distilled.jsonl").exists()


def test_chat_prompts_cover_the_kinds_and_are_distinct():
    prompts = chat_prompts(140, seed=3)
    assert len(prompts) == 140 and len({p.messages for p in prompts}) == 140
    assert Counter(p.kind for p in prompts) == {k: 20 for k in CHAT_KINDS}
    assert all(p.messages[-1][0] == "user" for p in prompts)
    assert chat_prompts(140, seed=3) == prompts and len(general_questions(50)) == 50


def test_more_general_questions_keep_the_first_hundred_the_default_was_trained_on():
    """The pool grew past 102; ``--general-questions 100`` still picks the shipped default's 100, in order."""
    import hashlib

    every = general_questions(10_000)
    assert len(every) == len(set(every)) == 102 + len(GENERAL_ANSWERS)
    assert general_questions(100) == every[:100]
    assert hashlib.sha256("\n".join(every[:100]).encode()).hexdigest()[:16] == "ba8e494c5a241cac"
    assert not set(every[:102]) & set(GENERAL_ANSWERS) and set(every[102:]) == set(GENERAL_ANSWERS)


def _slot(reply: str) -> str:
    return reply.split(OPEN, 1)[1].split(CLOSE, 1)[0]


def test_a_general_question_whose_passage_states_its_answer_is_left_out(tmp_path, base, corpus, monkeypatch):
    """A general row trains "the passage does not answer this": not where the retrieved passage names the answer."""
    assert states_answer("Its capital is Vienna.", "Vienna") and states_answer("symbol Fe.", "Fe")
    assert not states_answer("Feet and fences", "Fe") and not states_answer("Vienna", None)
    mix = MixConfig(base=str(base), **{**MIX, "chat_prompts": 0, "refusal_fraction": 0.0, "reading_fraction": 0.0})
    kept = [r for r in _rows(prepare(corpus, tmp_path / "kept", PrepareConfig(heldout=0.34, seed=1), mix) and
                             tmp_path / "kept" / "train.jsonl") if r["task"] == "general"]
    assert len(kept) >= 2
    slot_word = {r["messages"][0]["content"]: re.findall(r"[A-Za-z]{5,}", _slot(r["messages"][1]["content"]))[-1]
                 for r in kept[:2]}  # the first two questions' answers: a word of the passage each retrieves
    monkeypatch.setattr("training.mix.GENERAL_ANSWERS", slot_word)
    prepare(corpus, tmp_path / "stated", PrepareConfig(heldout=0.34, seed=1), mix)
    left = [r["messages"][0]["content"] for r in _rows(tmp_path / "stated" / "train.jsonl") if r["task"] == "general"]
    assert sorted(left) == sorted(r["messages"][0]["content"] for r in kept[2:])


def test_a_cut_off_answer_keeps_its_whole_sentences_or_is_left_out():
    from training.distill import whole_sentences

    assert whole_sentences("A haiku. Waves.", True) == "A haiku. Waves."
    assert whole_sentences("Paris is the capital. It has many muse", False) == "Paris is the capital."
    assert whole_sentences("1. Sleep early. 2. Avoid coffee and other drinks with caffeine before", False) is None
    assert whole_sentences("no sentence end at all", False) is None and whole_sentences("  ", True) is None


def test_cloze_answer_none_trains_retrieval_only_from_inverse_cloze(tmp_path, base, corpus):
    """``--cloze-answer none``: the same inverse-cloze questions as ``sentence`` (retrieval learns from them), their
    rows marked ``learn_answer: false`` so only the query token is a target, and none of them asked in
    ``reading``; every other row's answer is learned."""
    both = tmp_path / "both.jsonl"  # Wikipedia articles make natural questions; headlines, inverse cloze
    both.write_text(corpus.read_text(encoding="utf-8") + "".join(
        json.dumps({"id": f"n{i}", "title": t, "text": x}) + "\n" for i, (t, x) in enumerate(NEWS)), encoding="utf-8")
    sentence, none = tmp_path / "sentence", tmp_path / "none"
    prepare(both, sentence, PrepareConfig(heldout=0.34, seed=0, recipe="retrieval"))
    mix = MixConfig(base=str(base), **{**MIX, "reading_fraction": 1.0, "refusal_fraction": 0.0})
    prepare(both, none, PrepareConfig(heldout=0.34, seed=0, cloze_answer="none"), mix)
    asked = {r["messages"][0]["content"] for r in _rows(sentence / "train.jsonl") if r["kind"] == "cloze"}
    rows = _rows(none / "train.jsonl")
    cloze = [r for r in rows if r.get("kind") == "cloze" and r["task"] == "retrieve"]
    assert cloze and {r["messages"][0]["content"] for r in cloze} == asked
    for r in rows:
        if "messages" in r:
            unlearned = r["messages"][-1].get("learn_answer") is False
            assert unlearned == (r["task"] == "retrieve" and r["kind"] == "cloze"), r
    reading = Counter(r["kind"] for r in rows if r["task"] == "reading")
    assert reading and "cloze" not in reading, reading  # every question is asked, but for the inverse-cloze ones

    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.text.rendering import Renderer
    from training.data import load_training_data

    data = load_training_data(Renderer.for_checkpoint(load_checkpoint(base)), train_file=none / "train.jsonl",
                              db_file=none / "db.jsonl", max_length=1024, progress=False)
    only_query = [e for e in data.train if e.query_positions and e.targets.sum() == len(e.query_positions)]
    assert len(only_query) == len(cloze)  # the query token is the one target of an unlearned answer


def test_refusal_slots_from_another_article_leave_the_rest_of_the_mix_unchanged(tmp_path, base, corpus):
    """``--refusal-slot other-article``: each refusal's slot is a passage of another article that does not state
    the answer (the shipped default's hard negatives were mostly other passages of the same article, and the model
    refused as often with the gold passage in the slot as with a wrong one); every other row is the same."""
    mix = dict(MIX, chat_prompts=0, general_questions=0, reading_fraction=0.0, plain_text=0, refusal_fraction=1.0)
    prepare(corpus, tmp_path / "a", PrepareConfig(heldout=0.34, seed=1), MixConfig(base=str(base), **mix))
    prepare(corpus, tmp_path / "b", PrepareConfig(heldout=0.34, seed=1),
            MixConfig(base=str(base), refusal_slot="other-article", **mix))
    a, b = _rows(tmp_path / "a" / "train.jsonl"), _rows(tmp_path / "b" / "train.jsonl")
    assert sorted(json.dumps(r) for r in a if r["task"] != "refusal") == \
        sorted(json.dumps(r) for r in b if r["task"] != "refusal")
    title_article = {p.title: p.article for p in read_passages(corpus)}
    passages = {p.id: p for p in read_passages(corpus)}
    same = Counter()
    for name, rows in (("a", a), ("b", b)):
        refusals = [r for r in rows if r["task"] == "refusal"]
        assert refusals, name
        for r in refusals:
            reply = r["messages"][1]
            slot_title = reply["content"][len(RQ + OPEN):].split("\n", 1)[0]
            [[pos]] = reply["positive"]
            same[name] += title_article[slot_title] == passages[pos].article
            assert reply["content"].split(CLOSE)[1].startswith(REFUSAL)
    assert same["b"] == 0 and same["a"] > 0, same


def test_a_bad_refusal_slot_is_named():
    with pytest.raises(ValueError, match="--refusal-slot must be one of"):
        MixConfig(refusal_slot="random")


def test_the_heldout_questions_do_not_depend_on_the_mix(tmp_path, base, corpus):
    """Recipes are compared on the same held-out questions: ``eval.jsonl`` is the same whatever the mix's knobs
    draw from the training split (before, 800 plain-text rows changed which held-out questions the quality bench
    asked, so two experiments' recall was measured on different questions)."""
    mix = dict(MIX, chat_prompts=0, general_questions=0, refusal_fraction=0.0)  # nothing to distil
    prepare(corpus, tmp_path / "a", PrepareConfig(heldout=0.34, seed=1), MixConfig(base=str(base), **mix))
    prepare(corpus, tmp_path / "b", PrepareConfig(heldout=0.34, seed=1),
            MixConfig(base=str(base), **dict(mix, plain_text=0, reading_fraction=0.0)))
    prepare(corpus, tmp_path / "c", PrepareConfig(heldout=0.34, seed=1, recipe="retrieval"))
    a, b, c = ((tmp_path / d / "eval.jsonl").read_bytes() for d in "abc")
    assert a == b == c and a
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "b" / "train.jsonl").read_bytes()
