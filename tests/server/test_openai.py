"""The official openai client, unchanged, against /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import openai
import pytest
from server_harness import RETRIEVING_PROMPT


@pytest.fixture(scope="module")
def oai(live_server):
    with openai.OpenAI(base_url=live_server.url + "/v1", api_key=live_server.api_key, max_retries=0,
                       timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(oai):
    [card] = oai.models.list().data
    return card.id


def test_models(oai, model):
    assert model == "onegen-demo-random-weights"


def test_completions_plain_and_stream(oai, client, model):
    kw = dict(model=model, prompt=RETRIEVING_PROMPT, max_tokens=32, temperature=0)
    r = oai.completions.create(**kw)
    [choice] = r.choices
    native = client.post("/generate", json={"prompt": RETRIEVING_PROMPT, "max_tokens": 32}).json()
    assert choice.text == native["text"] and choice.finish_reason == native["finish_reason"]
    assert r.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert r.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert r.usage.retrieved_tokens == native["usage"]["retrieved_tokens"] > 0  # extra usage field
    trace = choice.retrievals  # the retrieval trace rides in an extra field
    assert [h["doc_id"] for t in trace for h in t["hits"]] == \
        [h["doc_id"] for t in native["retrievals"] for h in t["hits"]]

    chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    streamed_trace = [c.choices[0].retrieval for c in chunks if c.choices and getattr(c.choices[0], "retrieval", None)]
    assert len(streamed_trace) == len(trace)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_batch_and_logprobs(oai, model):
    prompts = ["Paris is", "Zorblat lives in"]
    r = oai.completions.create(model=model, prompt=prompts, max_tokens=8, temperature=0, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1]
    for c, p in zip(r.choices, prompts, strict=True):
        alone = oai.completions.create(model=model, prompt=p, max_tokens=8, temperature=0)
        assert c.text == alone.choices[0].text
        assert len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) > 0
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)


def test_chat_plain_and_stream(oai, client, model):
    messages = [{"role": "user", "content": "Where does Zorblat live?"}]
    kw = dict(model=model, messages=messages, max_tokens=24, temperature=0)
    r = oai.chat.completions.create(**kw, logprobs=True)
    [choice] = r.choices
    native = client.post("/generate", json={"messages": messages, "max_tokens": 24}).json()
    assert choice.message.role == "assistant" and choice.message.content == native["text"]
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_openai_errors(oai, model):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-model", prompt="x")
    assert e.value.body["type"] == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.completions.create(model=model, prompt="x", n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.completions.create(model=model, prompt="Paris " * 3000, max_tokens=4)
    assert e.value.body["type"] == "context_length_exceeded"
    with openai.OpenAI(base_url=str(oai.base_url), api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
