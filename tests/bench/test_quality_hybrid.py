"""bench/quality.py's hybrid rows (issue #20 item 5): the fused rankings of hand-made OneGen and BM25 rankings,
their recall@5 beside both, and the target that hybrid recall@5 reach the better of the two; and the one-pass
hybrid answer row on a tiny model, which inserts what BM25 alone ranks first."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import quality  # noqa: E402
import quality_metrics as qm  # noqa: E402


def test_hybrid_rankings_fuse_dense_and_bm25():
    dense = [["a", "b", "c", "d", "e", "f"], ["p1", "p2"]]
    bm25 = [["f", "a", "g"], ["q1", "q2"]]
    # a: 1/61 + 1/62 > f: 1/66 + 1/61 > b: 1/62 > c and g: 1/63 each, c from the list given first (dense)
    fused = quality.rank_hybrid(dense, bm25, k=5)
    assert fused[0] == ["a", "f", "b", "c", "g"]
    assert fused[1] == ["p1", "q1", "p2", "q2"]  # disjoint lists interleave, dense first


def test_hybrid_row_and_its_target():
    positives = [["f"], ["g"], ["a"]]
    dense = [["a", "b", "c", "d", "e", "f"], ["a", "b", "c", "d", "e"], ["a"]]  # finds f at 6 and a
    bm25 = [["f", "x"], ["g", "y"], ["z"]]  # finds f and g at 1
    hybrid = quality.rank_hybrid(dense, bm25)
    r5 = {name: qm.retrieval_summary(r, positives)["recall@5"]
          for name, r in (("onegen", dense), ("bm25", bm25), ("hybrid", hybrid))}
    assert r5 == {"onegen": 1 / 3, "bm25": 2 / 3, "hybrid": 1.0}
    retrieval = {k: {"recall@5": v} for k, v in {**r5, "minilm": 0.0}.items()}
    hybrid_target = next(t for t in quality.core_targets(retrieval, {}, {}) if t["target"].startswith("hybrid"))
    assert hybrid_target["pass"] is True and hybrid_target["threshold"] == 2 / 3


# ---------------------------------------------------------------------------- section 2: one-pass hybrid answers
RARE_PASSAGE = "Quillfeather pastries are baked in Velmora every winter."
OTHERS = ["Paris is the capital of France.", "Berlin lies on a river.", "Rome is the capital of Italy.",
          "The quick brown fox jumps over the lazy dog.", "Mirelle was born in Odrin and plays the harp."]


def _answer_setup(tmp_path, skip_hybrid: bool = False):
    """A retrieving tiny model over a pool searched by an exact retriever, as ``answer_engine`` builds it for
    ``--pool heldout``, and the ``Inputs`` fields ``answer_rows`` reads."""
    import argparse
    from types import SimpleNamespace

    from onegen_core.engine import Engine, EngineConfig
    from onegen_core.formats.checkpoint import load_checkpoint
    from onegen_core.formats.index_store import Document
    from onegen_core.retrieval.encoder import Encoder
    from onegen_core.retrieval.retriever import TorchRetriever
    from onegen_core.testing import build_tiny_checkpoint, make_query_token_likely

    path = build_tiny_checkpoint(tmp_path / "ckpt", arch="llama", seed=1)
    make_query_token_likely(path, rank=0)  # its greedy answers start with [RQ]
    ckpt = load_checkpoint(path)
    docs = [Document(f"p{i}", t, title=f"T{i}") for i, t in enumerate([*OTHERS, RARE_PASSAGE])]
    vectors = Encoder.from_checkpoint(ckpt).encode_documents([(d.text, d.title) for d in docs])
    engine = Engine(ckpt, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=128, block_size=8),
                    retriever=TorchRetriever(vectors, docs))
    args = argparse.Namespace(skip_hybrid_answers=skip_hybrid, no_reference_rows=True)
    # the rare word alone: this tiny model retrieves on it, and its dense ranking puts another passage first
    question = quality.Question("Quillfeather", RARE_PASSAGE, "fact", ["p5"], "Velmora")
    inp = SimpleNamespace(args=args, a_questions=[question], ckpt=ckpt, by_id={})
    return engine, docs, inp


def test_the_hybrid_answer_row_retrieves_what_bm25_ranks_first(tmp_path):
    """The row runs the question with retrieval.mode hybrid on the same engine as one-pass, BM25 built in memory
    over the pool the retriever searches; the rare word's passage, which dense retrieval misses, is inserted."""
    from onegen_core.engine.params import SamplingParams

    engine, docs, inp = _answer_setup(tmp_path)
    assert engine.indexes.get(None).bm25 is None
    assert quality.with_bm25(engine, docs, restricted=True) == "BM25 over its 6 passages, built in memory"
    rows = {key: (reqs, rp) for key, _, reqs, rp in quality.answer_rows(inp, engine, [quality.Passage(
        "p0", "T0", OTHERS[0], "Paris")])}
    assert list(rows) == ["one_pass", "one_pass_hybrid", "no_retrieval", "pipeline"]
    assert rows["one_pass"][1].mode == "dense" and rows["one_pass_hybrid"][1].mode == "hybrid"
    sampling = SamplingParams(max_tokens=24)
    got = {}
    for key in ("one_pass", "one_pass_hybrid"):
        [result] = quality.run_batch(engine, rows[key][0], sampling, rows[key][1], desc=key)
        got[key] = quality.first_hit(result).doc_id
        assert result.retrievals[0].mode == ("hybrid" if key == "one_pass_hybrid" else "dense")
    assert got["one_pass_hybrid"] == "p5" and got["one_pass"] != "p5"
    columns = quality.retrieved_columns("one_pass_hybrid", [got["one_pass_hybrid"]], inp.a_questions, [])
    assert columns == {"retrieved": 1.0, "retrieved_positive": 1.0}


def test_the_hybrid_answer_row_can_be_skipped(tmp_path):
    engine, _, inp = _answer_setup(tmp_path, skip_hybrid=True)
    keys = [key for key, *_ in quality.answer_rows(inp, engine, [quality.Passage("p0", "T0", OTHERS[0], "Paris")])]
    assert "one_pass_hybrid" not in keys and keys[0] == "one_pass"
    assert quality.is_reduced(quality.parse_args(["--skip-hybrid-answers"]))
