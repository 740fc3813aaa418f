"""Query encodes are scheduler work: chunked under the step's token budget and interleaved with decoding.

A ``/retrieve`` batch of long queries must not freeze running streams: each step's work
is bounded by ``max_num_batched_tokens`` whatever the queries, decode tokens go first,
and the vectors equal the standalone encoder's.
"""

from __future__ import annotations

import numpy as np
import pytest
from core_test_data import PROMPTS

from onegen_core.engine import ContextLengthExceeded, Engine, EngineConfig
from onegen_core.engine.outputs import Finished, SearchDone, TokenDelta
from onegen_core.engine.params import RetrievalParams, SamplingParams
from onegen_core.retrieval.encoder import Encoder, InputTooLong

LONG_QUERY = " ".join(["Paris is the capital of France and Berlin lies on a river."] * 12)


@pytest.fixture(scope="module")
def engine(retrieving_checkpoint, tiny_index):
    return Engine.from_checkpoint(retrieving_checkpoint, tiny_index,
                                  EngineConfig(num_kv_blocks=256, block_size=8, max_num_batched_tokens=32))


def test_vectors_equal_the_standalone_encoder(engine, retrieving_checkpoint):
    queries = ["Paris is the capital of France.", LONG_QUERY, "harp"]
    ids = engine.prepare_queries(queries)
    assert len(ids[1]) > 4 * engine.config.max_num_batched_tokens  # encoded over several steps
    got = engine.encode_queries(queries)
    ref = Encoder.from_checkpoint(retrieving_checkpoint).encode_queries(queries)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_search_interleaves_with_decoding_under_the_token_budget(engine):
    """Streams get a token every step while a long query batch is encoded, their output does not change, and
    no step runs more than the token budget."""
    sampling = SamplingParams(max_tokens=40, ignore_eos=True)
    off = RetrievalParams(enabled=False)
    alone = engine.generate(PROMPTS[:3], sampling, off)
    streams = [engine.add_request(p, sampling=sampling, retrieval=off) for p in PROMPTS[:3]]
    for _ in range(3):  # prompts prefilled, decoding under way
        engine.step()
    # four different queries: the prefix cache would serve repeats of one (or of the query encoded before)
    queries = [f"{n} {LONG_QUERY}" for n in ("One", "Two", "Three", "Four")]
    search = engine.add_search(queries, k=2)
    results: dict[str, list[int]] = {}
    done = None
    encode_steps = 0
    while done is None or len(results) < len(streams):
        events = engine.step()
        assert engine.last_step_tokens <= engine.config.max_num_batched_tokens
        tokens = {r: 0 for r in streams if r in engine.sequences or any(
            isinstance(e, Finished) and e.request_id == r for e in events)}
        for ev in events:
            if isinstance(ev, TokenDelta) and ev.request_id in tokens:
                tokens[ev.request_id] += len(ev.token_ids)
            elif isinstance(ev, SearchDone):
                done = ev
            elif isinstance(ev, Finished) and ev.request_id in streams:
                results[ev.request_id] = ev.result.token_ids
        if done is None or done in events:
            encode_steps += 1
            assert all(n == 1 for n in tokens.values()), tokens  # no stream waited for the encode
    assert done.request_id == search and done.error is None and len(done.hits) == 4
    query_tokens = sum(map(len, engine.prepare_queries(queries)))
    assert encode_steps >= query_tokens // engine.config.max_num_batched_tokens  # spread over many steps
    assert [results[r] for r in streams] == [r.token_ids for r in alone]


def test_search_hits_equal_brute_force_over_the_index(engine):
    q = "Mirelle plays the harp."
    [hits] = engine.search([q], k=3, return_text=True)
    vec = engine.encode_queries([q])[0]
    index = engine.retriever.index
    order = np.argsort(-(index.reconstruct_n(0, index.ntotal) @ vec))[:3]
    assert [h.vector_id for h in hits] == order.tolist()
    assert all(h.text for h in hits)


def test_aborted_search_frees_its_cache_and_reports(engine):
    rid = engine.add_search([f"{n} {LONG_QUERY}" for n in ("Five", "Six", "Seven")], k=1)  # not in the prefix cache
    engine.step()
    assert engine.block_manager.num_free < engine.block_manager.num_blocks
    assert engine.abort(rid, error="client went away")
    events = engine.step()
    [done] = [e for e in events if isinstance(e, SearchDone)]
    assert done.request_id == rid and done.error == "client went away" and done.hits is None
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert rid not in engine.searches


def test_input_is_checked_before_the_engine_sees_it(engine):
    with pytest.raises(InputTooLong) as e:
        engine.prepare_queries(["fine", "word " * (engine.max_model_len + 10)])
    assert e.value.index == 1 and e.value.kind == "query"
    # a prompt too long by its characters alone is refused without tokenising it
    huge = "x" * (engine.inputs.max_text_chars + 1)
    with pytest.raises(ContextLengthExceeded, match="characters"):
        engine.prepare_request(huge)
    with pytest.raises(ContextLengthExceeded, match="characters"):
        engine.prepare_request(messages=[{"role": "user", "content": huge}])
    rendered = engine.prepare_request("Paris is")
    rid = engine.add_request(rendered=rendered, sampling=SamplingParams(max_tokens=3))
    assert engine.sequences[rid].token_ids == rendered.ids
    with pytest.raises(ValueError, match="not both"):
        engine.add_request("Paris is", rendered=rendered)
    while engine.has_unfinished():
        engine.step()


def test_decode_tokens_go_before_a_passage_extend(retrieving_checkpoint, tiny_index):
    """A passage inserted into one stream is prefilled with what the budget leaves after every other stream's decode
    token, so the others never skip a step."""
    engine = Engine.from_checkpoint(retrieving_checkpoint, tiny_index,
                                    EngineConfig(num_kv_blocks=256, block_size=8, max_num_batched_tokens=8))
    qid = engine.token_ids.query_ids[0]
    sampling = SamplingParams(max_tokens=16, ignore_eos=True)
    retrieving = engine.add_request(PROMPTS[1], sampling=SamplingParams(max_tokens=16, ignore_eos=True,
                                                                        forced_tokens={1: qid}),
                                    retrieval=RetrievalParams(max_retrievals=1, k=1))
    others = [engine.add_request(p, sampling=sampling, retrieval=RetrievalParams(enabled=False))
              for p in PROMPTS[3:6]]
    inserted = 0
    while engine.has_unfinished():
        events = engine.step()
        inserted = max(inserted, engine.sequences[retrieving].num_retrieved_tokens
                       if retrieving in engine.sequences else inserted)
        decoding = [r for r in others if r in engine.sequences and engine.sequences[r].output_ids]
        got = {r: sum(len(e.token_ids) for e in events if isinstance(e, TokenDelta) and e.request_id == r)
               for r in decoding}
        if inserted:
            assert all(n == 1 for n in got.values()), got
    assert inserted > engine.config.max_num_batched_tokens  # the extend needed several steps


def test_a_request_after_a_big_search_is_not_queued_behind_all_of_its_queries(engine):
    """A search hands the scheduler about one step's budget of queries at a time: a generation that arrives after
    a 16-query search starts within a few steps, not after every query."""
    budget = engine.config.max_num_batched_tokens
    per_query = len(engine.prepare_queries([LONG_QUERY])[0])
    search = engine.add_search([LONG_QUERY] * 16, k=1)
    engine.step()
    gen = engine.add_request(PROMPTS[0], sampling=SamplingParams(max_tokens=2),
                             retrieval=RetrievalParams(enabled=False))
    steps_to_first_token = done_step = None
    step = 0
    while engine.has_unfinished():
        step += 1
        for ev in engine.step():
            if isinstance(ev, TokenDelta) and ev.request_id == gen and steps_to_first_token is None:
                steps_to_first_token = step
            if isinstance(ev, SearchDone) and ev.request_id == search:
                done_step = step
                assert ev.error is None and len(ev.hits) == 16
    all_queries_steps = 16 * per_query // budget
    assert steps_to_first_token is not None and done_step is not None
    assert steps_to_first_token <= 2 * (per_query // budget + 2), (steps_to_first_token, all_queries_steps)
    assert steps_to_first_token < done_step


def test_step_budget_defaults_to_the_device(retrieving_checkpoint):
    """Unset, the budget is 512 tokens on the CPU (a 2048-token step there holds every stream for seconds) and
    2048 on a GPU; the engine reports the budget it runs with, and a given budget is kept."""
    from onegen_core.engine.engine_config import STEP_BUDGET_CPU, STEP_BUDGET_GPU, step_token_budget

    assert (STEP_BUDGET_CPU, STEP_BUDGET_GPU) == (512, 2048)
    assert step_token_budget(EngineConfig(), "cuda") == STEP_BUDGET_GPU
    assert step_token_budget(EngineConfig(), "cpu") == STEP_BUDGET_CPU
    assert step_token_budget(EngineConfig(max_num_batched_tokens=40), "cuda") == 40
    engine = Engine.from_checkpoint(retrieving_checkpoint, config=EngineConfig(num_kv_blocks=64, device="cpu"))
    assert engine.config.max_num_batched_tokens == STEP_BUDGET_CPU
    assert engine.scheduler.max_num_batched_tokens == STEP_BUDGET_CPU
