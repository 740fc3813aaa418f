"""bench/quality.py section 4 (the hand-written sets, issue #18): the metrics on hand-made outputs with known
values, each able to fail, and the whole section end to end through the engine on a tiny random model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import quality_metrics as qm  # noqa: E402
from quality_metrics import SetOutput as Out  # noqa: E402

SETS = {
    "knowledge": [
        {"id": "k1", "question": "Who wrote it?", "answer": "Jonathan Swift", "aliases": ["Swift"], "passages": ["p1"]},
        {"id": "k2", "question": "Which year?", "answer": "1729", "aliases": [], "passages": ["p1"]},
        {"id": "k3", "question": "How many?", "answer": "15,000", "aliases": [], "passages": ["p2"]},
        {"id": "k4", "question": "Who painted it?", "answer": "Émile Cohl", "aliases": [], "passages": ["p3", "p4"]},
    ],
    "no_corpus": [
        {"id": "n1", "kind": "greeting", "messages": [{"role": "user", "content": "Hey!"}]},
        {"id": "n2", "kind": "greeting", "messages": [{"role": "user", "content": "Morning!"}]},
        {"id": "n3", "kind": "arithmetic", "messages": [{"role": "user", "content": "2+2?"}]},
        {"id": "n4", "kind": "conversation", "messages": [{"role": "user", "content": "I'm Ana."},
                                                          {"role": "assistant", "content": "Hi Ana."},
                                                          {"role": "user", "content": "My name?"}]},
    ],
    "general": [
        {"id": "g1", "question": "Capital of Australia?", "answer": "Canberra", "aliases": []},
        {"id": "g2", "question": "Moonlight Sonata?", "answer": "Beethoven", "aliases": ["Ludwig van Beethoven"]},
        {"id": "g3", "question": "Largest bone?", "answer": "femur", "aliases": []},
        {"id": "g4", "question": "Square root of 144?", "answer": "12", "aliases": []},
    ],
}
OUTS = {
    "knowledge": [  # retrieved 3 of 4; gold passage retrieved for k1, k3 (k2 got p9, k4 nothing)
        Out("It was written by Swift in 1729.", True, ["p1"]),
        Out("The retrieved passage does not answer this.", True, ["p9"]),
        Out("The retrieved passage does not answer this. From general knowledge: 15000.", True, ["p2"]),
        Out("Who painted it? I am not sure.", False, []),  # repeats its question
    ],
    "reading": [Out("Jonathan Swift"), Out("1729"), Out("fifteen thousand"), Out("Emile Cohl")],
    "no_corpus": [Out("Hello!", False), Out("Good morning.", True, ["p5"]), Out("4", False), Out("Ana.", False)],
    "general": [  # g1 correct, g2 says not found, g3 wrong, g4 correct despite the refusal
        Out("The retrieved passage does not answer this. From general knowledge: Canberra.", True, ["p1"]),
        Out("I could not find this in the passage.", True, ["p1"]),
        Out("The tibia.", True, ["p2"]),
        Out("It is 12.", False),
    ],
}


def test_contains_answer_normalises_and_needs_whole_words():
    assert qm.contains_answer("It had 15000 people", ["15,000"])
    assert qm.contains_answer("made by Emile Cohl.", ["Émile Cohl"])
    assert qm.contains_answer("the Mon-Khmer family", ["Mon–Khmer"])
    assert not qm.contains_answer("in 19190", ["1919"])
    assert not qm.contains_answer("Swiftly", ["Swift"])
    assert not qm.contains_answer("anything", [""])


def test_not_found_rule_knows_the_trained_refusal():
    from training.mix import GENERAL_KNOWLEDGE, REFUSAL

    assert qm.says_not_found(f"{REFUSAL} {GENERAL_KNOWLEDGE}Paris.")
    assert qm.says_not_found("Sorry, I couldn\u2019t find that.")
    assert not qm.says_not_found("Paris is the capital of France.")


def test_set_tables_on_known_outputs():
    t = qm.set_tables(SETS, OUTS)
    assert t["decision"]["knowledge"]["rate"] == pytest.approx(3 / 4)
    nc = t["decision"]["no_corpus"]
    assert nc["rate"] == pytest.approx(1 / 4)
    assert nc["per_kind"] == {"arithmetic": {"n": 1, "rate": 0.0}, "conversation": {"n": 1, "rate": 0.0},
                              "greeting": {"n": 2, "rate": 0.5}}
    assert t["decision"]["general"]["rate"] == pytest.approx(3 / 4)
    k = t["answers"]["knowledge"]
    assert k["contains"] == pytest.approx(2 / 4)  # k1 (alias Swift), k3 (15000); not k2, k4
    assert k["gold_retrieved"] == pytest.approx(2 / 4)
    assert k["non_empty"] == 1.0
    r = t["answers"]["reading"]
    assert r["contains"] == pytest.approx(3 / 4)  # "fifteen thousand" is not "15,000"
    assert r["f1"] == r["f1_gold"] == pytest.approx(3 / 4)  # no answer sentences in these rows
    g = t["outside"]["general"]
    assert (g["correct"], g["not_found"], g["good"]) == (pytest.approx(2 / 4), pytest.approx(2 / 4), pytest.approx(3 / 4))
    # wrong refusals count only answers whose gold passage was retrieved: k1 (answers), k3 (refuses) -> 1 of 2
    # and, for comparison, among those with another passage (k2 refuses, k4 does not) -> 1 of 2
    assert t["outside"]["wrong_refusals"] == {"n": 2, "refused": 1, "rate": 0.5,
                                              "other_n": 2, "other_refused": 1, "other_rate": 0.5}
    assert "general_hybrid" not in t["outside"] and "wrong_refusals_hybrid" not in t["outside"]


def test_the_hybrid_runs_get_their_own_general_and_wrong_refusal_rows():
    """The default is served hybrid: its general questions and wrong refusals are counted from the hybrid runs,
    beside (not mixed into) the dense ones."""
    outs = {**OUTS, "knowledge_hybrid": [qm.SetOutput(o.text, o.retrieved, list(o.hits)) for o in OUTS["knowledge"]],
            "general_hybrid": [Out("Canberra."), Out("I do not know."), Out("The tibia."), Out("The femur.")]}
    outs["knowledge_hybrid"][2].text = "The capital is here."  # k3 no longer refuses with its gold passage
    t = qm.set_tables(SETS, outs)
    assert t["outside"]["wrong_refusals_hybrid"] == {"n": 2, "refused": 0, "rate": 0.0,
                                                     "other_n": 2, "other_refused": 1, "other_rate": 0.5}
    assert t["outside"]["wrong_refusals"]["refused"] == 1
    g, gh = t["outside"]["general"], t["outside"]["general_hybrid"]
    assert (gh["correct"], gh["not_found"], gh["good"]) == (pytest.approx(1 / 4), pytest.approx(1 / 4), 0.5)
    assert g["good"] == pytest.approx(3 / 4)  # the dense row as before


def test_an_echo_is_an_answer_that_begins_with_its_question():
    q = "Which rival of Swift wrote The Generous Projector?"
    assert qm.echoes_question("Which rival of Swift wrote The Generous Projector?", q)
    assert qm.echoes_question("which rival of swift wrote the generous projector", q)  # case and punctuation aside
    assert not qm.echoes_question("Daniel Defoe wrote The Generous Projector.", q)
    assert not qm.echoes_question("Which rival? Defoe.", q)  # the first 30 letters must match
    assert not qm.echoes_question("anything", "?")  # a question without letters echoes nothing


def test_f1_accepts_the_answer_sentence_as_well_as_the_short_gold():
    rows = [{"id": "k1", "answer": "1729", "aliases": [], "passages": ["p1"],
             "sentence": "Swift published the essay anonymously in 1729."}] * 3
    preds = ["1729", "Swift published the essay anonymously in 1729.", "Defoe wrote it in 1728."]
    s = qm.knowledge_summary(preds, [qm.gold_answers(r) for r in rows], [r["sentence"] for r in rows])
    assert s["contains"] == pytest.approx(2 / 3)
    # against "1729" the sentence (6 words once "the" is dropped) scores 2/7; against itself 1; the wrong
    # answer shares "in" with the sentence: p = 1/5, r = 1/6, F1 = 2/11
    assert s["f1_gold"] == pytest.approx((1 + 2 / 7 + 0) / 3)
    assert s["f1"] == pytest.approx((1 + 1 + 2 / 11) / 3)


def test_failure_examples_pick_the_failing_rows():
    f = qm.failure_examples(SETS, OUTS, limit=1)
    assert set(f) == {"retrieved_no_corpus", "no_retrieval_knowledge", "wrong_answer", "wrong_refusal", "echo",
                      "bad_general", "reading_miss"}
    counts = {k: (v["count"], v["of"]) for k, v in f.items()}
    assert counts == {"retrieved_no_corpus": (1, 4), "no_retrieval_knowledge": (1, 4), "wrong_answer": (2, 4),
                      "wrong_refusal": (1, 4), "echo": (1, 4), "bad_general": (1, 4), "reading_miss": (1, 4)}
    assert [e["id"] for e in f["echo"]["examples"]] == ["k4"]
    assert [e["id"] for e in f["wrong_answer"]["examples"]] == ["k2"]  # limited to 1
    assert f["retrieved_no_corpus"]["examples"][0]["kind"] == "greeting"
    assert f["bad_general"]["examples"][0]["gold"] == ["femur"]


def test_set_targets_pass_and_miss():
    import quality

    tables = qm.set_tables(SETS, OUTS)
    tables["chat_kept"] = {"base_loss": 2.0, "trained_loss": 2.3}
    result = {t["target"]: t["pass"] for t in quality.set_targets(tables)}
    assert result == {"retrieves on knowledge questions": False,  # 0.75 < 0.90
                      "retrieves on no-corpus prompts": False,  # 0.25 > 0.15
                      "one-pass answer contains the gold": False,  # 0.50 < 0.70
                      "reads a passage pasted in the prompt (F1)": True,  # 0.75 >= 0.50
                      "general questions: correct or 'not found'": True,  # 0.75 >= 0.75
                      "wrong refusals with the gold passage retrieved": False,  # 0.50 > 0.10
                      "chat kept: loss on the base's own answers": False}  # 2.3 > 2.2
    good = {k: [Out(r["answer"], True, r["passages"][:1]) for r in SETS["knowledge"]] for k in ("knowledge", "reading")}
    good["no_corpus"] = [Out("hi", False) for _ in SETS["no_corpus"]]
    good["general"] = [Out(r["answer"], True) for r in SETS["general"]]
    tables = qm.set_tables(SETS, good)
    tables["chat_kept"] = {"base_loss": 2.0, "trained_loss": 2.1}
    assert all(t["pass"] for t in quality.set_targets(tables))
    tables["chat_kept"] = {}  # the base was skipped: n/a, not a pass
    assert [t["pass"] for t in quality.set_targets(tables)][-1] is None


# --------------------------------------------------------------------------- end to end on a tiny model
CORPUS = [("p1", "Swift", "Jonathan Swift wrote the essay in 1729."), ("p2", "Measles", "About 15,000 babies."),
          ("p3", "Cohl", "Émile Cohl made Fantasmagorie."), ("p4", "Film", "The film came out in 1908."),
          ("p5", "Other", "The quick brown fox jumps over the lazy dog.")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import quality

    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.formats.index_store import Document, write_index_dir
    from onegen_core.retrieval.encoder import Encoder
    from onegen_core.testing import add_bm25_side_index, build_tiny_checkpoint, make_query_token_likely

    d = tmp_path_factory.mktemp("quality-sets")
    ckpt_dir = build_tiny_checkpoint(d / "ckpt", seed=3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt_dir)  # so that some answers retrieve: hits map to passage ids
    make_query_token_likely(ckpt_dir, [tok.apply_chat_template([{"role": "user", "content": r["question"]}],
                                                               tokenize=False, add_generation_prompt=True)
                                       for r in SETS["knowledge"]], rank=0)
    base_dir = build_tiny_checkpoint(d / "base", seed=4)
    ckpt = load_checkpoint(ckpt_dir)
    docs = [Document(id=pid, text=text, title=title) for pid, title, text in CORPUS]
    vecs = Encoder.from_checkpoint(ckpt, dtype="float32", device="cpu").encode_documents([(x.text, x.title) for x in docs])
    index = write_index_dir(d / "index", vecs, docs, checkpoint_fingerprint=ckpt.fingerprint,
                            special_token_ids=ckpt.token_ids.by_name)
    add_bm25_side_index(index, ckpt.spec.document_template)  # so the one-pass hybrid row runs too
    (d / "data").mkdir()
    (d / "data" / "corpus.jsonl").write_text("".join(
        json.dumps({"id": pid, "title": title, "text": text, "metadata": {"article": title, "section": ""}}) + "\n"
        for pid, title, text in CORPUS))
    (d / "sets").mkdir()
    for name, rows in SETS.items():
        (d / "sets" / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = d / "out" / "q.json"
    rc = quality.main(["--sets-only", "--checkpoint", str(ckpt_dir), "--index", str(index), "--base", str(base_dir),
                       "--data", str(d / "data"), "--sets-dir", str(d / "sets"), "--max-tokens", "12",
                       "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), out.parent / "quality_failures.md"


def test_sets_section_end_to_end_on_a_tiny_model(tiny_run):
    report, failures_md = tiny_run
    sets = report["sets"]
    assert set(sets["decision"]) == {"knowledge", "knowledge_raw", "general", "no_corpus"}
    assert set(sets["decision"]["no_corpus"]["per_kind"]) == {"greeting", "arithmetic", "conversation"}
    assert set(sets["answers"]) == {"knowledge", "knowledge_hybrid", "knowledge_raw", "reading", "base_knowledge",
                                    "base_reading"}
    assert 0.0 <= sets["answers"]["knowledge_hybrid"]["gold_retrieved"] <= 1.0
    for row in sets["answers"].values():
        assert row["n"] == 4 and 0.0 <= row["contains"] <= 1.0 and 0.0 <= row["f1"] <= 1.0
    assert set(sets["outside"]) == {"general", "general_hybrid", "base_general", "wrong_refusals",
                                    "wrong_refusals_hybrid"}
    kept = sets["chat_kept"]
    assert kept["prompts"] == 4 and kept["tokens"] > 0 and kept["base_loss"] > 0 and kept["trained_loss"] > 0
    assert set(sets["failures"]) == set(qm.FAILURE_KINDS)
    assert {k: len(v) for k, v in sets["details"].items()} == {
        "knowledge": 4, "knowledge_hybrid": 4, "knowledge_raw": 4, "reading": 4, "no_corpus": 4, "general": 4,
        "general_hybrid": 4, "base_knowledge": 4, "base_reading": 4, "base_no_corpus": 4, "base_general": 4}
    assert len(report["targets"]) == 7  # sets only: no target of sections 1-3
    passes = {t["target"]: t["pass"] for t in report["targets"]}
    if not sets["outside"]["wrong_refusals"]["n"]:  # no gold passage retrieved: nothing to refuse wrongly
        assert passes.pop("wrong refusals with the gold passage retrieved") is None
    assert None not in passes.values()
    retrieved = [h for rows in sets["details"].values() for r in rows for h in r["hits"]]
    assert sets["decision"]["knowledge"]["rate"] > 0 and retrieved, "the tiny model should retrieve sometimes"
    assert set(retrieved) <= {pid for pid, _, _ in CORPUS}
    assert all("<paragraph>" not in r["output"] and "[RQ]" not in r["output"]
               for rows in sets["details"].values() for r in rows)
    text = failures_md.read_text()
    for f in qm.FAILURE_KINDS.values():
        assert f"## {f[0]}:" in text


def test_chat_kept_scores_the_same_tokens_for_both_models(tiny_run):
    """The base model's loss on its own greedy answers is low (it chose each token); a different random model's
    is higher: the comparison is not symmetric by accident."""
    kept = tiny_run[0]["sets"]["chat_kept"]
    assert kept["base_loss"] < kept["trained_loss"]
