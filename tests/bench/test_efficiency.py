"""bench/efficiency_modes.py: every mode of the efficiency benchmark answers the same workload with the same
greedy tokens where it should (same passage inserted at the same point), on a tiny model, and the check
notices when they do not."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import efficiency_modes as em  # noqa: E402

QUESTIONS = ["Where does Zorblat live?", "Who wrote the book in 1990?", "What is the capital of Italy?"]
CORPUS = [
    ("Zorblat", "Zorblat lives in Quenta and works as a baker."),
    ("Mirelle", "Mirelle was born in Odrin and plays the harp."),
    ("Paris", "Paris is the capital of France. The river flows to the sea."),
    ("Rome", "Rome is the capital of Italy."),
    ("Berlin", "Berlin is the capital of Germany."),
    ("Book", "Question: who wrote the book? Answer: the author wrote it in the year 1990."),
    ("Madrid", "Madrid is the capital of Spain."),
    ("Fox", "The quick brown fox jumps over the lazy dog."),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from onegen_core.engine import Engine, EngineConfig
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.formats.index_store import Document, write_index_dir
    from onegen_core.retrieval.encoder import Encoder
    from onegen_core.testing import build_tiny_checkpoint

    d = tmp_path_factory.mktemp("efficiency")
    ckpt = load_checkpoint(build_tiny_checkpoint(d / "ckpt", seed=3))
    encoder = Encoder.from_checkpoint(ckpt, dtype="float32", device="cpu")
    docs = [Document(id=f"doc{i}", text=t, title=title) for i, (title, t) in enumerate(CORPUS)]
    index = write_index_dir(d / "index", encoder.encode_documents([(x.text, x.title) for x in docs]), docs,
                            checkpoint_fingerprint=ckpt.fingerprint, special_token_ids=ckpt.token_ids.by_name)
    engine = Engine.from_checkpoint(ckpt, index, EngineConfig(dtype="float32", device="cpu", max_num_seqs=8))
    requests = [em.Request(list(engine.renderer.chat([{"role": "user", "content": q}]).ids), q) for q in QUESTIONS]
    return engine, encoder, requests


def run_all(engine, encoder, wl):
    clock = em.Clock("cpu")
    return {
        "one_pass": em.one_pass(engine, wl, clock),
        "two_pass": em.two_pass(engine, wl, clock, em.same_model_retrieve(engine, encoder)),
        "ref_ids": em.ref_loop(engine, wl, clock, encoder, retokenize=False),
        "ref_text": em.ref_loop(engine, wl, clock, encoder),
        "none": em.no_retrieval(engine, wl, clock),
    }


@pytest.mark.parametrize("hops,k", [([0], 1), ([0, 5], 2), ([2, 6, 9], 1)])
def test_modes_give_one_pass_answers(setup, hops, k):
    engine, encoder, requests = setup
    wl = em.Workload(requests, hops, 14, k)
    runs = run_all(engine, encoder, wl)
    one = runs["one_pass"]
    rq = engine.token_ids.query_ids[0]
    for o in one.outcomes:
        assert len(o.output_ids) == 14
        assert [i for i, t in enumerate(o.output_ids) if t == rq] == hops  # retrieved exactly at the forced points
        assert o.retrieval_positions == hops
        assert len(o.passages) == len(hops) and all(len(p) == k for p in o.passages)
        assert o.inserted_tokens > 0
    for name in ("two_pass", "ref_ids"):
        c = em.compare(one, runs[name])
        assert c["identical"], (name, c)
        assert [o.inserted_tokens for o in runs[name].outcomes] == [o.inserted_tokens for o in one.outcomes]
    # the faithful loop re-tokenises text; a random model's text may not give back the same ids, and only then
    # may its answers differ
    c = em.compare(one, runs["ref_text"])
    for a, b in zip(one.outcomes, runs["ref_text"].outcomes, strict=True):
        if b.retokenized_same:
            assert a.output_ids == b.output_ids and a.passages == b.passages
    assert set(c["reasons"]) <= {"re-tokenised ids differ"}
    # the passages matter: without them the tokens differ, so the equalities above are not vacuous
    assert not em.compare(one, runs["none"])["identical"]
    # the work each mode does, in tokens through the model: one-pass never runs a separate forward
    assert one.model_tokens["separate forward"] == 0
    assert runs["two_pass"].model_tokens["separate forward"] > 0 and runs["ref_ids"].model_tokens["separate forward"] > 0
    if hops == [0]:  # retrieve first: the pipeline prefills what one-pass prefills, plus the query forward
        prompts = sum(len(r.prompt_ids) for r in requests)
        assert runs["two_pass"].model_tokens["engine"] == one.model_tokens["engine"]
        assert runs["two_pass"].model_tokens["separate forward"] == prompts + len(requests)  # prompt + [RQ]
        assert runs["ref_ids"].model_tokens["engine"] == one.model_tokens["engine"] + prompts  # + generating [RQ]


def test_the_check_fails_when_the_passage_moves(setup):
    """A pipeline that inserts the passage one token later than one-pass does must be reported as different."""
    engine, encoder, requests = setup
    clock = em.Clock("cpu")
    one = em.one_pass(engine, em.Workload(requests, [0, 5], 14, 1), clock)
    late = em.two_pass(engine, em.Workload(requests, [1, 6], 14, 1), clock, em.same_model_retrieve(engine, encoder))
    c = em.compare(one, late)
    assert not c["identical"]
    assert c["same_answers"] < c["n"]


def test_compare_classifies_differences():
    def run(*outs):
        return em.ModeRun("x", [em.Outcome(list(ids), [list(p) for p in ps], 0, 0.0, 0.0, retokenized_same=r)
                                for ids, ps, r in outs], 1.0, {})

    ref = run(([1, 2, 3], [["a"]], None), ([4, 5, 6], [["b"]], None), ([7, 8, 9], [["c"]], None))
    other = run(([1, 2, 3], [["a"]], True), ([4, 5, 0], [["b"]], None), ([7, 0, 9], [["d"]], None))
    c = em.compare(ref, other)
    assert c["same_answers"] == 1 and c["same_passages"] == 2 and not c["identical"]
    assert c["reasons"] == {"numerics": 1, "different passage": 1}
    assert c["first_difference_at"] == [2, 1]
    [d] = c["passage_differences"]  # the first retrieval whose passages differ, with the scores
    assert d["hop"] == 0 and [i for i, _ in d["ref"]] == ["c"] and [i for i, _ in d["other"]] == ["d"]
    retok = run(([1, 2, 3], [["a"]], None), ([4, 5, 6], [["b"]], None), ([7, 8, 0], [["c"]], False))
    assert em.compare(ref, retok)["reasons"] == {"re-tokenised ids differ": 1}
    assert em.compare(ref, ref)["identical"]


def test_workload_validates_hops():
    r = [em.Request([1, 2], "q")]
    with pytest.raises(ValueError):
        em.Workload(r, [3, 1], 10, 1)
    with pytest.raises(ValueError):
        em.Workload(r, [0, 9], 10, 1)  # no room to generate after the last retrieval
    with pytest.raises(ValueError):
        em.Workload(r, [0], 10, 0)
    assert replace(em.Workload(r, [0, 4], 10, 2), k=1).k == 1


def test_prompts_are_cut_to_length(setup):
    import efficiency

    engine, _, _ = setup
    tok = engine.tokenizer
    filler = tok.encode(" ".join(t for _, t in CORPUS) * 40, add_special_tokens=False)
    for target in (64, 200, 400):
        ids = efficiency.build_prompt(engine.renderer, tok, QUESTIONS[0], filler, target)
        assert target - 8 <= len(ids) <= target
        assert tok.decode(ids).rstrip().endswith(QUESTIONS[0] + "</s>") or QUESTIONS[0] in tok.decode(ids)
