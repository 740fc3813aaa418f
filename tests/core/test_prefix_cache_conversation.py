"""A conversation with retrievals, resent turn by turn, and the prefix cache (issue #21 item 3).

What the next turn sees (``docs/prefix-caching.md``): the conversation as the client resends it, with
each assistant turn as the text it got back. That text holds neither the query token nor the inserted
passage (special tokens are not decoded), and a client cannot put them back (message contents are plain
text), so the next turn's tokens leave the previous sequence where that turn's answer begins, or at its
query token. The cache then serves every full block of the previous turn's prompt, more where the answer's
text re-renders to the tokens generated before the query token, and never a block that holds a passage.
"""

from __future__ import annotations

import pytest

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.outputs import Finished, GenerationResult
from onegen_core.engine.params import RetrievalParams, SamplingParams

BS = 4
SYSTEM = "You answer questions from the passages you retrieve."
QUESTIONS = ["Where does Zorblat live?", "Who plays the harp?", "What is the capital of Italy?",
             "Tell me about the river.", "Numbers 0 1 2", "Who wrote the book?"]
# where each turn is made to emit the query token (an output index; None: where the model does, if it does)
RETRIEVE_AT = [0, None, 3, 0, None, 0]


def _turn(engine: Engine, messages: list[dict[str, str]], at: int | None) -> tuple[GenerationResult, list[int]]:
    """One turn: its result and its prompt's token ids."""
    forced = {} if at is None else {at: engine.token_ids.query_ids[0]}
    rid = engine.add_request(messages=[dict(m) for m in messages], sampling=SamplingParams(max_tokens=16, forced_tokens=forced),
                             retrieval=RetrievalParams(max_retrievals=1, k=1))
    seq = engine.sequences[rid]
    prompt = seq.token_ids[: seq.num_prompt_tokens]
    while engine.has_unfinished():
        for ev in engine.step():
            if isinstance(ev, Finished) and ev.request_id == rid:
                return ev.result, prompt
    pytest.fail("the turn did not finish")


def _conversation(engine: Engine) -> list[tuple[GenerationResult, list[int]]]:
    """Six turns, each resending the conversation so far with the assistant's text as it came back."""
    messages = [{"role": "system", "content": SYSTEM}]
    turns = []
    for question, at in zip(QUESTIONS, RETRIEVE_AT, strict=True):
        messages.append({"role": "user", "content": question})
        result, prompt = _turn(engine, messages, at)
        turns.append((result, prompt))
        messages.append({"role": "assistant", "content": result.text})
    return turns


@pytest.fixture(scope="module")
def conversations(retrieving_checkpoint, tiny_index):
    config = {"num_kv_blocks": 512, "block_size": BS}
    on = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(**config))
    off = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, EngineConfig(enable_prefix_caching=False, **config))
    return _conversation(on), _conversation(off)


def test_the_resent_conversation_is_answered_as_without_the_cache(conversations):
    """Same prompts, same tokens, same retrievals, turn by turn; the cache off reuses nothing."""
    on, off = conversations
    assert all(r.retrievals for (r, _), at in zip(on, RETRIEVE_AT, strict=True) if at is not None)
    for (a, pa), (b, pb) in zip(on, off, strict=True):
        assert pa == pb
        assert a.token_ids == b.token_ids
        assert [(x.output_token_index, x.inserted_tokens) for x in a.retrievals] == \
            [(x.output_token_index, x.inserted_tokens) for x in b.retrievals]
        assert b.usage.cached_tokens == 0


def test_the_assistant_text_holds_no_query_token_and_no_passage(conversations, retrieving_checkpoint):
    """What the client resends is the answer's text alone: the query token and the passage are not in it."""
    on, _ = conversations
    for result, _ in on:
        for marker in ("[RQ]", "<paragraph>", "</paragraph>"):
            assert marker not in result.text
        for rec in result.retrievals:
            assert rec.inserted_tokens > 0  # a passage was in the sequence, and is not in the text


def test_the_next_turn_reuses_the_previous_prompt_and_no_passage(conversations):
    """Turn N+1 is served every full block of turn N's prompt from the cache, and no block from turn N's query token
    on: after a retrieval at once, exactly the previous prompt's full blocks; after one mid-answer, also the answer's
    tokens before the query token where its text renders to them again."""
    on, _ = conversations
    for (prev, prev_prompt), (cur, prompt) in zip(on, on[1:], strict=False):
        assert prompt[: len(prev_prompt)] == prev_prompt, "a turn's prompt starts with the previous turn's"
        floor = len(prev_prompt) // BS * BS
        assert cur.usage.cached_tokens >= floor
        if prev.retrievals:
            query_at = len(prev_prompt) + prev.retrievals[0].output_token_index  # the [RQ] token's position
            assert cur.usage.cached_tokens <= query_at // BS * BS  # no block holding [RQ] or the passage
            if prev.retrievals[0].output_token_index == 0:
                assert cur.usage.cached_tokens == floor
    # over the conversation: every turn after the first shares its predecessor's prompt, and the first shares nothing
    assert on[0][0].usage.cached_tokens == 0
    reused = sum(r.usage.cached_tokens for r, _ in on[1:])
    assert reused >= sum(len(p) // BS * BS for _, p in on[:-1])
