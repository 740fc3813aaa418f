"""Hybrid retrieval in the engine (issue #20 item 5): dense and BM25 fused by reciprocal rank at the query token.

The index holds the engine tests' corpus plus one document whose rare word the prompt repeats, so BM25 ranks
it first while the tiny model's dense ranking does not. A hybrid request inserts the fused top hit and then
generates exactly what a naive recompute does with an independent fused search (plain ``bm25s`` and a
hand-written reciprocal-rank fusion over the brute-force dense ranking); its trace carries the fused ranking
and the text BM25 searched (the prompt, then the output since the last passage). Dense requests are
untouched: they equal the naive dense recompute, alone and batched with hybrid ones. ``/retrieve``'s search
fuses with the query string as BM25 text. Hybrid on an index without a BM25 side index is refused when the
request is added, and an engine whose default mode is hybrid refuses such an index at start and on reload;
a reload swaps the BM25 side index with the vectors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from core_test_data import CORPUS, PROMPTS, retrieve_batches, step_until
from naive_reference import brute_force_search, naive_generate
from transformers import AutoModelForCausalLM

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.outputs import Finished
from onegen_core.engine.params import RetrievalParams, SamplingParams
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import (
    CURRENT,
    VERSIONS,
    Document,
    IndexError_,
    version_name,
    write_index_dir,
)
from onegen_core.retrieval.bm25 import BM25_DIR, BM25UnavailableError
from onegen_core.retrieval.encoder import Encoder
from onegen_core.testing import add_bm25_side_index

CONFIG = EngineConfig(num_kv_blocks=256, block_size=8)
HYBRID = EngineConfig(num_kv_blocks=256, block_size=8, retrieval_mode="hybrid")
RARE = "Quillfeather"  # in one document and in the prompt: BM25's first hit
RARE_DOC = f"{RARE} pastries are baked in Velmora every winter."
PROMPT = f"Tell me about {RARE} pastries"
DOCS = [*CORPUS, RARE_DOC]
RRF_K = 60


def _documents(prefix: str, texts: list[str]) -> list[Document]:
    return [Document(id=f"{prefix}{i}", text=t, title=f"T{i}") for i, t in enumerate(texts)]


def _write(out: Path, ckpt, docs: list[Document], *, bm25: bool = True) -> Path:
    vecs = Encoder.from_checkpoint(ckpt).encode_documents([(d.text, d.title) for d in docs])
    out = write_index_dir(out, vecs, docs, checkpoint_fingerprint=ckpt.fingerprint,
                          special_token_ids=ckpt.token_ids.by_name, encode_dtype="float32")
    return add_bm25_side_index(out, ckpt.spec.document_template) if bm25 else out


def _publish(root: Path, number: int, ckpt, docs: list[Document], *, bm25: bool = True) -> Path:
    out = _write(root / VERSIONS / version_name(number), ckpt, docs, bm25=bm25)
    tmp = root / (CURRENT + ".tmp")
    tmp.write_text(version_name(number) + "\n")
    os.replace(tmp, root / CURRENT)
    return out


@pytest.fixture(scope="module")
def ckpt(retrieving_checkpoint):
    return load_checkpoint(retrieving_checkpoint)


@pytest.fixture(scope="module")
def index_dir(ckpt, tmp_path_factory):
    return _write(tmp_path_factory.mktemp("hybrid") / "idx", ckpt, _documents("d", DOCS))


@pytest.fixture(scope="module")
def dense_only_dir(ckpt, tmp_path_factory):
    return _write(tmp_path_factory.mktemp("dense") / "idx", ckpt, _documents("d", DOCS), bm25=False)


@pytest.fixture(scope="module")
def engine(retrieving_checkpoint, index_dir):
    return Engine.from_checkpoint(retrieving_checkpoint, index_dir, CONFIG)


@pytest.fixture(scope="module")
def hf_model(retrieving_checkpoint):
    return AutoModelForCausalLM.from_pretrained(retrieving_checkpoint, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------- an independent reference
def _bm25_ranking(texts: list[str], query: str, depth: int) -> list[int]:
    """Row numbers by plain bm25s score (the documented tokenisation: lowercase words of 2+ word characters,
    English stopwords out), zero scores left out, ties to the lower row."""
    import bm25s

    corpus = bm25s.tokenize(texts, lower=True, stopwords="en", token_pattern=r"(?u)\b\w\w+\b", show_progress=False)
    model = bm25s.BM25()
    model.index(corpus, show_progress=False)
    words = [w for w in re.findall(r"(?u)\b\w\w+\b", query.lower()) if w in corpus.vocab]
    scores = model.get_scores([corpus.vocab[w] for w in words]) if words else np.zeros(len(texts))
    order = sorted((i for i in range(len(texts)) if scores[i] > 0), key=lambda i: (-scores[i], i))
    return order[:depth]


def _rrf(rankings: list[list[str]]) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion as documented: sum of 1 / (60 + rank), ties to the better rank, then dense."""
    score: dict[str, float] = {}
    best: dict[str, tuple[int, int]] = {}
    for which, ranking in enumerate(rankings):
        for rank, key in enumerate(ranking, start=1):
            score[key] = score.get(key, 0.0) + 1.0 / (RRF_K + rank)
            best[key] = min(best.get(key, (rank, which)), (rank, which))
    return [(key, score[key]) for key in sorted(score, key=lambda key: (-round(score[key], 12), best[key]))]


def _reference_fused(index_dir: Path, ckpt, query_vector: np.ndarray, bm25_text: str) -> list[tuple[str, float]]:
    """The fused ranking of one query, from the brute-force dense ranking and plain bm25s (20 deep each)."""
    texts = [ckpt.spec.document_template.format(text=t, title=f"T{i}") for i, t in enumerate(DOCS)]
    by_text = {t: f"d{i}" for i, t in enumerate(DOCS)}
    dense = [by_text[text] for _, text in brute_force_search(index_dir, query_vector, 20)]
    lexical = [f"d{i}" for i in _bm25_ranking(texts, bm25_text, 20)]
    return _rrf([dense, lexical])


def _rq(engine: Engine) -> int:
    return next(iter(engine.token_ids.query))


def _generate(engine: Engine, prompts: list[str], modes: list[str | None], *, max_tokens: int = 16,
              forced: dict[int, int] | None = None, k: int = 1, max_retrievals: int = 1, return_passages=False):
    """Greedy results of the prompts queued together (so that their searches share steps)."""
    ids = [engine.add_request(p, sampling=SamplingParams(max_tokens=max_tokens, forced_tokens=forced or {}),
                              retrieval=RetrievalParams(k=k, max_retrievals=max_retrievals, mode=m,
                                                        return_passages=return_passages))
           for p, m in zip(prompts, modes, strict=True)]
    done = {}
    while len(done) < len(ids):
        for ev in engine.step():
            if isinstance(ev, Finished):
                done[ev.request_id] = ev.result
    return [done[i] for i in ids]


# ---------------------------------------------------------------------------- one pass
def test_a_hybrid_request_inserts_the_fused_top_hit(engine, hf_model, ckpt, index_dir):
    """The rare word's document is BM25's first hit and not the dense one; hybrid inserts it, and the whole
    generation equals the naive recompute with the reference fused search."""
    rq = _rq(engine)
    [dense] = _generate(engine, [PROMPT], ["dense"], forced={0: rq}, k=20)
    [hybrid] = _generate(engine, [PROMPT], ["hybrid"], forced={0: rq}, k=3)
    rare_id = f"d{len(DOCS) - 1}"
    assert dense.retrievals[0].hits[0].doc_id != rare_id, "the fixture needs a document only BM25 ranks first"
    record = hybrid.retrievals[0]
    assert record.mode == "hybrid" and record.bm25_query == PROMPT  # nothing generated before [RQ]
    assert record.hits[0].doc_id == rare_id

    captured: list[np.ndarray] = []

    def fused_search(q: np.ndarray, k: int) -> list[tuple[str, str]]:
        captured.append(q)
        ranking = _reference_fused(index_dir, ckpt, q, PROMPT)
        return [(f"T{int(doc[1:])}", DOCS[int(doc[1:])]) for doc, _ in ranking[:k]]

    ref = naive_generate(hf_model, engine, PROMPT, max_tokens=16, max_retrievals=1, k=3, forced_tokens={0: rq},
                         search=fused_search)
    assert hybrid.token_ids == ref
    expected = _reference_fused(index_dir, ckpt, captured[0], PROMPT)[:3]
    assert [h.doc_id for h in record.hits] == [doc for doc, _ in expected]
    assert [h.score for h in record.hits] == pytest.approx([s for _, s in expected], abs=1e-12)
    # the dense half is the dense mode's own ranking: same query vector, same hits
    assert [h.doc_id for h in dense.retrievals[0].hits] == [
        {t: f"d{i}" for i, t in enumerate(DOCS)}[text] for _, text in brute_force_search(index_dir, captured[0], 20)]


def test_bm25_searches_the_user_turn_and_the_output_since_the_last_passage(engine):
    rq = _rq(engine)
    [res] = _generate(engine, [PROMPT], ["hybrid"], forced={0: rq, 8: rq}, max_tokens=20, max_retrievals=2)
    first, second = res.retrievals
    assert first.bm25_query == PROMPT
    since = engine.tokenizer.decode(res.token_ids[1:8], skip_special_tokens=True).strip()
    assert since, "the model wrote something between the two query tokens"
    assert second.bm25_query == f"{PROMPT}\n{since}"
    [chat] = _generate_chat(engine, [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Earlier question about Rome"},
                                     {"role": "assistant", "content": "Rome."},
                                     {"role": "user", "content": PROMPT}], forced={0: rq})
    assert chat.retrievals[0].bm25_query == PROMPT  # the last user turn only


def _generate_chat(engine: Engine, messages: list[dict[str, str]], forced: dict[int, int]):
    rid = engine.add_request(messages=messages, sampling=SamplingParams(max_tokens=4, forced_tokens=forced),
                             retrieval=RetrievalParams(k=1, max_retrievals=1, mode="hybrid"))
    while True:
        for ev in engine.step():
            if isinstance(ev, Finished) and ev.request_id == rid:
                return [ev.result]


def test_dense_requests_are_unchanged_alone_and_batched_with_hybrid_ones(engine, hf_model):
    """Dense is what the engine always did: the naive dense recompute, token for token, and the same when its
    searches share steps with hybrid requests (one dense search per index per step, as deep as the deepest)."""
    prompts = [PROMPT, *PROMPTS[:3]]
    rq = _rq(engine)
    forced = {0: rq, 6: rq}
    for p in prompts:
        [alone] = _generate(engine, [p], [None], forced=forced, max_retrievals=2)
        assert alone.token_ids == naive_generate(hf_model, engine, p, max_tokens=16, max_retrievals=2,
                                                 forced_tokens=forced)
        assert all(r.mode == "dense" and r.bm25_query is None for r in alone.retrievals)
    modes = ["dense", "hybrid", None, "hybrid", "dense", "hybrid", None, "hybrid"]
    with retrieve_batches(engine, "mode") as batches:
        mixed = _generate(engine, prompts + prompts, modes, forced=forced, max_retrievals=2)
    assert {"dense", "hybrid"} in batches, f"no step searched both modes: {batches}"
    for p, m, res in zip(prompts + prompts, modes, mixed, strict=True):
        [alone] = _generate(engine, [p], [m], forced=forced, max_retrievals=2)
        assert res.token_ids == alone.token_ids, (p, m)
        assert [[h.doc_id for h in r.hits] for r in res.retrievals] == [
            [h.doc_id for h in r.hits] for r in alone.retrievals]
        assert [h.score for r in res.retrievals for h in r.hits] == pytest.approx(  # float noise of batching only
            [h.score for r in alone.retrievals for h in r.hits], abs=1e-5)


def test_a_hybrid_search_fuses_with_the_query_string(engine, ckpt, index_dir):
    """``/retrieve`` in hybrid mode: BM25 searches the query itself; dense mode is the plain dense search."""
    rid = engine.add_search([RARE, "capital of Germany"], k=0)  # the vectors only
    vectors = step_until(engine, rid).vectors
    rid = engine.add_search([RARE, "capital of Germany"], k=4, mode="hybrid", return_text=True)
    fused = step_until(engine, rid).hits
    for row, q, vec in zip(fused, [RARE, "capital of Germany"], vectors, strict=True):
        expected = _reference_fused(index_dir, ckpt, vec, q)[:4]
        assert [(h.doc_id, round(h.score, 12)) for h in row] == [(d, round(s, 12)) for d, s in expected]
        assert all(h.text == DOCS[int(h.doc_id[1:])] for h in row)
    assert fused[0][0].doc_id == f"d{len(DOCS) - 1}"
    rid = engine.add_search([RARE], k=4, mode="dense")
    dense = step_until(engine, rid).hits[0]
    assert [h.doc_id for h in dense] == [h.doc_id for h in engine.search([RARE], k=4)[0]]
    with pytest.raises(ValueError, match="needs the query strings"):
        engine.add_search(query_token_ids=engine.prepare_queries([RARE]), k=2, mode="hybrid")


# ---------------------------------------------------------------------------- refusals
def test_hybrid_needs_a_bm25_side_index(retrieving_checkpoint, dense_only_dir):
    engine = Engine.from_checkpoint(retrieving_checkpoint, dense_only_dir, CONFIG)
    assert engine.indexes.get(None).bm25 is None
    says = r"index 'default' \(.*\) has no BM25 side index.*python -m index_builder update --index .*--no-bm25"
    with pytest.raises(BM25UnavailableError, match=says):
        engine.add_request("x", retrieval=RetrievalParams(mode="hybrid"))
    with pytest.raises(BM25UnavailableError, match=says):
        engine.add_search(["x"], k=2, mode="hybrid")
    assert engine.add_request("x", retrieval=RetrievalParams(mode="hybrid", enabled=False))  # nothing to search
    assert engine.add_request("x", retrieval=RetrievalParams(mode="dense"))
    with pytest.raises(ValueError, match="mode must be one of dense, hybrid"):
        RetrievalParams(mode="sparse")
    with pytest.raises(ValueError, match="retrieval_mode must be one of dense, hybrid"):
        EngineConfig(retrieval_mode="bm25")
    with pytest.raises(BM25UnavailableError, match=says):  # a default that every request would fail
        Engine.from_checkpoint(retrieving_checkpoint, dense_only_dir, HYBRID)


def test_a_broken_bm25_side_index_refuses_its_version(retrieving_checkpoint, ckpt, tmp_path):
    root = tmp_path / "idx"
    _publish(root, 1, ckpt, _documents("d", CORPUS))
    engine = Engine.from_checkpoint(retrieving_checkpoint, root, CONFIG)
    v2 = _publish(root, 2, ckpt, _documents("e", CORPUS))
    (next((v2 / BM25_DIR).glob("data.*.npy"))).write_bytes(b"not an array")
    with pytest.raises(IndexError_, match="cannot read the BM25 side index"):
        engine.load_index("default")
    assert engine.index.version == 1


# ---------------------------------------------------------------------------- reloads
def test_a_reload_swaps_the_bm25_side_index_too(retrieving_checkpoint, ckpt, tmp_path):
    root = tmp_path / "idx"
    _publish(root, 1, ckpt, _documents("d", CORPUS))
    engine = Engine.from_checkpoint(retrieving_checkpoint, root, HYBRID)
    assert engine.search([RARE], k=3) and all(h.doc_id != "new" for h in _hybrid(engine, RARE))
    _publish(root, 2, ckpt, [*_documents("d", CORPUS), Document("new", RARE_DOC, title="New")])
    engine.swap_index(engine.load_index("default"))
    assert engine.index.version == 2 and len(engine.indexes.get(None).bm25) == len(CORPUS) + 1
    assert _hybrid(engine, RARE)[0].doc_id == "new"
    rq = _rq(engine)
    [res] = _generate(engine, [PROMPT], [None], forced={0: rq})  # the engine's default: hybrid
    assert res.retrievals[0].mode == "hybrid" and res.retrievals[0].hits[0].doc_id == "new"
    # with hybrid as the default, a version without BM25 is refused and the served one stays
    _publish(root, 3, ckpt, _documents("d", CORPUS), bm25=False)
    with pytest.raises(BM25UnavailableError, match="no BM25 side index"):
        engine.load_index("default")
    assert engine.index.version == 2


def test_a_hybrid_request_whose_index_lost_bm25_fails_alone(retrieving_checkpoint, ckpt, tmp_path):
    """A dense default serves a version without BM25; a hybrid request admitted before that swap ends with a
    retrieval error at its query token, while a dense one in the same step goes on."""
    root = tmp_path / "idx"
    _publish(root, 1, ckpt, _documents("d", CORPUS))
    engine = Engine.from_checkpoint(retrieving_checkpoint, root, CONFIG)
    rq = _rq(engine)
    sampling = SamplingParams(max_tokens=8, forced_tokens={2: rq})
    ids = [engine.add_request(PROMPT, sampling=sampling, retrieval=RetrievalParams(k=1, max_retrievals=1, mode=m))
           for m in ("hybrid", "dense")]
    engine.step()
    _publish(root, 2, ckpt, _documents("d", CORPUS), bm25=False)
    engine.swap_index(engine.load_index("default"))
    results = {}
    while len(results) < 2:
        for ev in engine.step():
            if isinstance(ev, Finished):
                results[ev.request_id] = ev.result
    hybrid, dense = results[ids[0]], results[ids[1]]
    assert hybrid.finish_reason == "error" and "no BM25 side index" in hybrid.error
    assert dense.finish_reason == "length" and len(dense.retrievals) == 1


def _hybrid(engine: Engine, query: str):
    rid = engine.add_search([query], k=3, mode="hybrid")
    return step_until(engine, rid).hits[0]


def test_a_pruned_version_serves_hybrid_until_it_is_swapped_out(retrieving_checkpoint, ckpt, tmp_path):
    """Its BM25 arrays are memory-mapped like its FAISS index (``index_mmap``, on by default) and its docstore is
    open, so removing its directory (``update --keep``) does not break its hybrid searches."""
    import shutil

    root = tmp_path / "idx"
    _publish(root, 1, ckpt, [*_documents("d", CORPUS), Document("rare", RARE_DOC, title="R")])
    engine = Engine.from_checkpoint(retrieving_checkpoint, root, CONFIG)
    assert engine.config.index_mmap
    _publish(root, 2, ckpt, _documents("d", CORPUS))
    shutil.rmtree(root / VERSIONS / version_name(1))
    assert _hybrid(engine, RARE)[0].doc_id == "rare"
