"""Two branches of the engine's insert step, through the public API.

* No retrieved passage fits the remaining context: the request ends right there with
  ``finish_reason="length"``, nothing inserted and nothing generated after the query token
  (and with ``k=2``, passages that fit are kept up to the first that does not).
* An insert that inserts nothing (the retriever finds no hits): decoding goes on from the
  query token's own logits, exactly as a full recompute over ``prompt + [RQ] + ...`` does.
"""

from __future__ import annotations

import pytest
import torch
from core_test_data import PROMPTS
from naive_reference import naive_generate
from transformers import AutoModelForCausalLM

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.outputs import Finished
from onegen_core.engine.params import RetrievalParams, SamplingParams

MAX_STEPS = 300  # a sequence left with nothing to compute would otherwise spin the step loop forever


def _run(engine, prompt, sampling, retrieval):
    """One request through add_request/step, with a step cap so that a stalled sequence fails instead of hanging."""
    rid = engine.add_request(prompt, sampling=sampling, retrieval=retrieval)
    for _ in range(MAX_STEPS):
        for ev in engine.step():
            if isinstance(ev, Finished) and ev.request_id == rid:
                assert not engine.has_unfinished()
                return ev.result
    pytest.fail(f"request did not finish within {MAX_STEPS} engine steps")


@pytest.fixture(scope="module")
def hf_model(retrieving_checkpoint):
    return AutoModelForCausalLM.from_pretrained(retrieving_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def roomy(retrieving_checkpoint, tiny_index):
    return Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(num_kv_blocks=128, block_size=8))


def _small_engine(checkpoint, index, max_model_len):
    return Engine.from_checkpoint(checkpoint, index, EngineConfig(num_kv_blocks=64, block_size=8,
                                                                  max_model_len=max_model_len))


# ---------------------------------------------------------------------------------------- no passage fits
def test_no_passage_fits_finishes_with_length(retrieving_checkpoint, tiny_index, roomy):
    qid = roomy.token_ids.query_ids[0]
    prompt = PROMPTS[0]
    sp = SamplingParams(max_tokens=40, forced_tokens={0: qid})  # the first output token retrieves
    rp = RetrievalParams(max_retrievals=1, k=1, return_passages=True)
    # with room, this retrieval inserts a passage and decoding goes on
    wide = _run(roomy, prompt, sp, rp)
    [rec] = wide.retrievals
    passage_len = rec.inserted_tokens
    assert passage_len > 2 and len(wide.token_ids) > 1
    n_prompt = wide.usage.prompt_tokens
    # context for prompt + [RQ] + a few tokens, but not for the passage (+1 token to generate after it)
    max_len = n_prompt + 1 + passage_len  # room = max_len - (n_prompt + 1) - 1 = passage_len - 1
    small = _small_engine(retrieving_checkpoint, tiny_index, max_len)
    assert small.max_model_len == max_len
    res = _run(small, prompt, sp, rp)
    assert res.finish_reason == "length"
    assert res.token_ids == [qid], "the request ends at the query token: nothing generated after a failed insert"
    [rec] = res.retrievals
    assert rec.output_token_index == 0 and rec.inserted_tokens == 0 and rec.hits == []
    assert res.usage.retrieved_tokens == 0 and res.usage.completion_tokens == 1
    assert small.block_manager.num_free == small.block_manager.num_blocks
    # one token more and the same passage fits: inserted, then one generated token fills the context
    fits = _run(_small_engine(retrieving_checkpoint, tiny_index, max_len + 1), prompt, sp, rp)
    assert fits.retrievals[0].inserted_tokens == passage_len
    assert [h.doc_id for h in fits.retrievals[0].hits] == [h.doc_id for h in wide.retrievals[0].hits]
    assert fits.token_ids == wide.token_ids[:2] and fits.finish_reason == "length"


def test_passages_are_kept_up_to_the_first_that_does_not_fit(retrieving_checkpoint, tiny_index, roomy):
    qid = roomy.token_ids.query_ids[0]
    prompt = PROMPTS[1]
    sp = SamplingParams(max_tokens=40, forced_tokens={0: qid})
    rp = RetrievalParams(max_retrievals=1, k=2, return_passages=True)
    wide = _run(roomy, prompt, sp, rp)
    [rec] = wide.retrievals
    first, second = (len(roomy.renderer.passage(h.text, h.title)) for h in rec.hits)
    assert rec.inserted_tokens == first + second
    n = wide.usage.prompt_tokens + 1
    # room for the first passage and a token after it, not for both: the first is inserted, decoding goes on
    max_len = n + first + second  # room = first + second - 1
    res = _run(_small_engine(retrieving_checkpoint, tiny_index, max_len), prompt, sp, rp)
    [rec2] = res.retrievals
    assert rec2.inserted_tokens == first and [h.doc_id for h in rec2.hits] == [rec.hits[0].doc_id]
    assert res.usage.retrieved_tokens == first
    assert res.finish_reason == "length" and len(res.token_ids) == max_len - n - first + 1 > 1


# ---------------------------------------------------------------------------------------- empty search
class NoHits:
    """A retriever whose searches find nothing."""

    dim = 64

    def __init__(self):
        self.calls = 0

    def __len__(self) -> int:
        return 0

    def search(self, queries, k):
        self.calls += 1
        return [[] for _ in queries]


def test_insert_without_hits_continues_from_the_query_token(retrieving_checkpoint, tiny_index, hf_model):
    engine = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(num_kv_blocks=128, block_size=8))
    engine.retriever = stub = NoHits()
    qid = engine.token_ids.query_ids[0]
    n_empty = 0
    for prompt in PROMPTS[:4]:
        sp = SamplingParams(max_tokens=16, forced_tokens={0: qid, 7: qid})
        res = _run(engine, prompt, sp, RetrievalParams(max_retrievals=3, k=1))
        ref = naive_generate(hf_model, engine, prompt, max_tokens=16, max_retrievals=3,
                             forced_tokens={0: qid, 7: qid}, search=lambda q, k: [])
        assert res.token_ids == ref, prompt
        assert res.token_ids[0] == qid and res.token_ids[7] == qid
        assert len(res.token_ids) == 16 and res.finish_reason == "length"
        assert res.retrievals and all(r.inserted_tokens == 0 and r.hits == [] for r in res.retrievals)
        assert res.usage.retrieved_tokens == 0
        # the token after each query token comes from the query token's own logits
        assert [r.output_token_index for r in res.retrievals] == [i for i, t in enumerate(res.token_ids[:-1])
                                                                   if t == qid][:3]
        n_empty += len(res.retrievals)
    assert stub.calls == n_empty >= 8
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_insert_without_hits_equals_a_forced_query_token_without_retrieval(retrieving_checkpoint, tiny_index):
    """Same tokens as when [RQ] is only a forced token (retrieval off): the empty insert changed nothing."""
    engine = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(num_kv_blocks=128, block_size=8))
    qid = engine.token_ids.query_ids[0]
    sp = SamplingParams(max_tokens=12, forced_tokens={0: qid})
    plain = [_run(engine, p, sp, RetrievalParams(enabled=False)).token_ids for p in PROMPTS[:4]]
    engine.retriever = NoHits()
    empty = [_run(engine, p, sp, RetrievalParams(max_retrievals=1)).token_ids for p in PROMPTS[:4]]
    assert empty == plain
    assert len({tuple(t[1:3]) for t in plain}) > 1, "the prompts should lead to different continuations"
