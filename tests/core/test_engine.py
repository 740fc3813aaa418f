"""Engine behaviour: reference equivalence with retrievals, batching, seeds, limits, cache pressure."""

from __future__ import annotations

import pytest
import torch
from core_test_data import PROMPTS
from naive_reference import naive_generate
from transformers import AutoModelForCausalLM

from onegen_core.engine import ContextLengthExceeded, Engine, EngineConfig
from onegen_core.engine.outputs import Finished, RetrievalEvent, TokenDelta
from onegen_core.engine.params import RetrievalParams, SamplingParams
from onegen_core.retrieval.encoder import Encoder


@pytest.fixture(scope="module")
def engine(retrieving_checkpoint, tiny_index):
    return Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(num_kv_blocks=256, block_size=8))


@pytest.fixture(scope="module")
def hf_model(retrieving_checkpoint):
    return AutoModelForCausalLM.from_pretrained(retrieving_checkpoint, dtype=torch.float32).eval()


def _run_alone(engine, prompt, **kw):
    return engine.generate(prompt, SamplingParams(max_tokens=kw.get("max_tokens", 24)),
                           RetrievalParams(max_retrievals=kw.get("max_retrievals", 2), k=kw.get("k", 1)))[0]


def test_greedy_with_retrievals_equals_naive_recompute(engine, hf_model):
    retrieved = 0
    for prompt in PROMPTS[:6]:
        for k in (1, 2):
            res = _run_alone(engine, prompt, k=k)
            ref = naive_generate(hf_model, engine, prompt, max_tokens=24, max_retrievals=2, k=k)
            assert res.token_ids == ref, prompt
            retrieved += len(res.retrievals)
            assert res.usage.retrieved_tokens == sum(r.inserted_tokens for r in res.retrievals)
    assert retrieved >= 3, "the fixture model should retrieve in several of these prompts"


def test_query_vector_equals_transformers_hidden_state(engine, hf_model):
    captured = []
    real_search = engine.retriever.search

    def spy(queries, k):
        captured.append(torch.as_tensor(queries).clone())
        return real_search(queries, k)

    ref_queries: list = []
    for prompt in PROMPTS[:6]:
        engine.retriever.search = spy
        try:
            _run_alone(engine, prompt)
        finally:
            engine.retriever.search = real_search
        naive_generate(hf_model, engine, prompt, max_tokens=24, max_retrievals=2, queries_out=ref_queries)
    got = torch.cat(captured)
    assert len(got) == len(ref_queries) > 0
    assert torch.allclose(got, torch.stack(ref_queries), atol=1e-5)


def test_batched_equals_alone_with_staggered_arrivals(engine):
    alone = {p: _run_alone(engine, p, max_tokens=20).token_ids for p in PROMPTS}
    ids: dict[str, str] = {}
    results = {}
    pending = list(PROMPTS)
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:  # a new request joins every other step
            p = pending.pop(0)
            ids[engine.add_request(p, sampling=SamplingParams(max_tokens=20),
                                   retrieval=RetrievalParams(max_retrievals=2))] = p
        for ev in engine.step():
            if isinstance(ev, Finished):
                results[ids[ev.request_id]] = ev.result.token_ids
        step += 1
    assert len(results) == len(PROMPTS) >= 8
    assert results == alone
    assert sum(1 for p in PROMPTS if 400 in alone[p]) >= 2  # some retrieve, at different times


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    a = engine.generate(PROMPTS[1], sp)[0].token_ids
    mixed = engine.generate([PROMPTS[1], PROMPTS[2], PROMPTS[3]],
                            [sp, SamplingParams(max_tokens=16, temperature=1.0), SamplingParams(max_tokens=5)])
    assert mixed[0].token_ids == a
    other = engine.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=99))
    assert other[0].token_ids != a


def test_max_retrievals_masks_the_query_token(engine):
    qid = engine.token_ids.query_ids[0]
    for n in (0, 1):
        res = engine.generate(PROMPTS[:6], SamplingParams(max_tokens=24), RetrievalParams(max_retrievals=n))
        for r in res:
            assert len(r.retrievals) <= n
            assert r.token_ids.count(qid) <= n
    off = engine.generate(PROMPTS[:6], SamplingParams(max_tokens=24), RetrievalParams(enabled=False))
    assert all(not r.retrievals and qid not in r.token_ids for r in off)


def test_trace_positions_and_passages(engine):
    res = engine.generate(PROMPTS[:6], SamplingParams(max_tokens=24),
                          RetrievalParams(max_retrievals=2, k=2, return_passages=True))
    records = [(r, t) for r in res for t in r.retrievals]
    assert records
    qid = engine.token_ids.query_ids[0]
    for r, t in records:
        assert r.token_ids[t.output_token_index] == qid
        assert 0 <= t.output_text_offset <= len(r.text)
        assert len(t.hits) == 2 and all(h.text and h.doc_id.startswith("doc") for h in t.hits)
        assert t.hits[0].score >= t.hits[1].score


def test_max_tokens_and_stop_strings(engine):
    base = engine.generate(PROMPTS[0], SamplingParams(max_tokens=30), RetrievalParams(enabled=False))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 30
    text = base.text
    stop = text[8:11]
    assert stop and stop in text
    res = engine.generate(PROMPTS[0], SamplingParams(max_tokens=30, stop=[stop]), RetrievalParams(enabled=False))[0]
    assert res.finish_reason == "stop"
    assert res.text == text[: text.find(stop)]
    # streamed deltas never show the stop string and add up to the final text
    rid = engine.add_request(PROMPTS[0], sampling=SamplingParams(max_tokens=30, stop=[stop]),
                             retrieval=RetrievalParams(enabled=False))
    deltas = []
    while engine.has_unfinished():
        deltas += [ev.text for ev in engine.step() if isinstance(ev, TokenDelta) and ev.request_id == rid]
    assert "".join(deltas) == res.text


def test_full_kv_cache_preempts_without_loss(retrieving_checkpoint, tiny_index, engine):
    small = Engine.from_checkpoint(retrieving_checkpoint, tiny_index,
                                   EngineConfig(num_kv_blocks=12, block_size=8, max_num_batched_tokens=64))
    assert small.max_model_len == 96
    res = small.generate(PROMPTS, SamplingParams(max_tokens=20), RetrievalParams(max_retrievals=2))
    assert small.scheduler.num_preemptions > 0
    alone = [_run_alone(engine, p, max_tokens=20).token_ids for p in PROMPTS]
    assert [r.token_ids for r in res] == alone
    assert small.block_manager.num_free == 12


def test_abort_frees_the_cache(engine):
    rid = engine.add_request(PROMPTS[6], sampling=SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free < engine.block_manager.num_blocks
    assert engine.abort(rid)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    events = engine.step()
    fin = [e for e in events if isinstance(e, Finished)]
    assert len(fin) == 1 and fin[0].reason == "abort" and not engine.has_unfinished()
    assert not engine.abort(rid)


def test_stream_events_in_order(engine):
    rid = engine.add_request(PROMPTS[2], sampling=SamplingParams(max_tokens=24),
                             retrieval=RetrievalParams(max_retrievals=2))
    events = []
    while engine.has_unfinished():
        events += [e for e in engine.step() if e.request_id == rid]
    assert isinstance(events[-1], Finished)
    kinds = {type(e) for e in events}
    assert TokenDelta in kinds
    assert sum(len(e.token_ids) for e in events if isinstance(e, TokenDelta)) == events[-1].result.usage.completion_tokens
    assert [e.record for e in events if isinstance(e, RetrievalEvent)] == events[-1].result.retrievals


def test_prompt_longer_than_context_is_refused(engine):
    with pytest.raises(ContextLengthExceeded, match="context is"):
        engine.add_request(prompt_token_ids=[5] * (engine.max_model_len + 3))
    with pytest.raises(ValueError, match="exactly one"):
        engine.add_request()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(prompt_token_ids=[10**7])


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="k must be"):
        RetrievalParams(k=0)


def test_search_matches_encoder_and_brute_force(engine, retrieving_checkpoint):
    """The engine encodes a query through its scheduler and model runner (paged KV cache, packed forward); the
    standalone ``Encoder`` (the index builder's) through a plain forward. Same vector, and the engine's hits are
    the brute-force top 3 over the index for the encoder's vector, with its scores."""
    import numpy as np

    query = "Paris is the capital of France."
    hits = engine.search([query], k=3)
    ref = Encoder.from_checkpoint(retrieving_checkpoint).encode_queries([query])[0]
    np.testing.assert_allclose(engine.encode_queries([query])[0], ref, atol=2e-5)
    scores = engine.retriever.index.reconstruct_n(0, engine.retriever.index.ntotal) @ ref
    order = np.argsort(-scores)[:3]
    assert [h.vector_id for h in hits[0]] == order.tolist()
    np.testing.assert_allclose([h.score for h in hits[0]], scores[order], atol=1e-4)


def test_forced_tokens_place_retrievals_at_fixed_positions(engine):
    qid = engine.token_ids.query_ids[0]
    forced = {0: qid, 5: qid, 9: qid}
    res = engine.generate(PROMPTS[0], SamplingParams(max_tokens=12, forced_tokens=forced),
                          RetrievalParams(max_retrievals=2, k=1))[0]
    assert [res.token_ids[i] for i in forced] == [qid, qid, qid]
    # the first two are searched; the third comes after the budget is spent and retrieves nothing
    assert [r.output_token_index for r in res.retrievals] == [0, 5]
    with pytest.raises(ValueError, match="forced_tokens"):
        engine.add_request(PROMPTS[0], sampling=SamplingParams(forced_tokens={0: 10**7}))
