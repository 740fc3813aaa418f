"""The model decides when to retrieve: a request with retrieval on whose model emits no query token is
reported as such (no retrievals in the trace, no retrieved tokens in its usage), and one that does emit it is
reported with its retrieval (issue #18, item 4: nothing is forced). Over HTTP: tests/server/test_no_retrieval.py."""

from __future__ import annotations

import pytest
from core_test_data import CORPUS

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.params import RetrievalParams, SamplingParams
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import Document, write_index_dir
from onegen_core.retrieval.encoder import Encoder

PROMPTS = ["Hello, how are you?", "What is seven times eight?", "Write a short poem.", "The river flows",
           "Good morning!", "Tell me a joke.", "Paris is", "Thanks a lot."]


def _index(ckpt_dir, out):
    ckpt = load_checkpoint(ckpt_dir)
    docs = [Document(id=f"doc{i}", text=t, title=f"T{i}") for i, t in enumerate(CORPUS)]
    vecs = Encoder.from_checkpoint(ckpt).encode_documents([(d.text, d.title) for d in docs])
    return write_index_dir(out, vecs, docs, checkpoint_fingerprint=ckpt.fingerprint,
                           special_token_ids=ckpt.token_ids.by_name)


@pytest.fixture(scope="module")
def quiet_model(tiny_checkpoint, tmp_path_factory):
    """A tiny random model that never happens to emit its query token on PROMPTS, with an index to retrieve from."""
    return tiny_checkpoint, _index(tiny_checkpoint, tmp_path_factory.mktemp("quiet-index") / "idx")


def test_an_answer_without_a_query_token_reports_no_retrieval(quiet_model):
    ckpt, index = quiet_model
    engine = Engine.from_checkpoint(ckpt, index, EngineConfig(dtype="float32"))
    qid = engine.token_ids.query_ids[0]
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=16), RetrievalParams(enabled=True, k=2))
    quiet = [res for res in results if qid not in res.token_ids]  # the model did not ask: nothing is forced
    assert quiet, "every prompt retrieved: pick prompts on which this random model emits no query token"
    for res in quiet:
        assert res.retrievals == [] and res.usage.retrieved_tokens == 0
        assert res.usage.completion_tokens == len(res.token_ids) and res.usage.total_tokens == (
            res.usage.prompt_tokens + len(res.token_ids))
    for res in results:
        if res not in quiet:  # emitted the query token (with the budget of 1 left): reported with its passage
            assert [r.output_token_index for r in res.retrievals] == [res.token_ids.index(qid)]
    # The same requests with the query token placed at the start: now each is reported with its retrieval.
    forced = engine.generate(PROMPTS, SamplingParams(max_tokens=16, forced_tokens={0: qid}), RetrievalParams(k=2))
    for res in forced:
        assert len(res.retrievals) == 1 and res.retrievals[0].output_token_index == 0
        assert res.usage.retrieved_tokens > 0 and len(res.retrievals[0].hits) == 2
