"""The prefix cache as clients see it: ``usage.cached_tokens`` on /generate, ``usage.prompt_tokens_details
.cached_tokens`` on the OpenAI routes (official client), and the cache's counters in /metrics (issue #21)."""

from __future__ import annotations

import uuid

import openai
import pytest
from server_harness import metric, scrape


def _long_prompt() -> str:
    """A prompt no other test sends (its blocks are cold), several KV blocks long."""
    tag = uuid.uuid4().hex[:8]
    return f"Session {tag}. " + " ".join(f"Note {i}: the lighthouse keeper logs the tide at dawn." for i in range(12))


@pytest.fixture(scope="module")
def oai(live_server):
    with openai.OpenAI(base_url=live_server.url + "/v1", api_key=live_server.api_key, max_retries=0,
                       timeout=60) as c:
        yield c


def test_generate_reports_cached_prompt_tokens_and_metrics_count_them(client):
    body = {"prompt": _long_prompt(), "max_tokens": 8, "temperature": 0, "retrieval": {"enabled": False}}
    before = scrape(client)
    cold = client.post("/generate", json=body).json()
    warm = client.post("/generate", json=body).json()
    after = scrape(client)
    n = cold["usage"]["prompt_tokens"]
    assert cold["usage"]["cached_tokens"] == 0, cold["usage"]
    assert 0 < warm["usage"]["cached_tokens"] < n, warm["usage"]  # at least the last token is computed
    assert warm["text"] == cold["text"]
    kv = client.get("/info").json()["kv_cache"]
    assert kv["prefix_caching"] is True
    block = kv["block_size"]
    assert warm["usage"]["cached_tokens"] % block == 0 and n - warm["usage"]["cached_tokens"] <= block

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert delta("onegen_prompt_tokens_cached_total") == warm["usage"]["cached_tokens"]
    assert delta("onegen_prefix_cache_hit_tokens") >= warm["usage"]["cached_tokens"]
    assert delta("onegen_prefix_cache_miss_tokens") >= n  # the cold prompt was prefilled in full
    assert metric(after, "onegen_num_cached_kv_blocks") > 0


def test_openai_usage_has_prompt_tokens_details(oai, live_server):
    model = oai.models.list().data[0].id
    messages = [{"role": "system", "content": _long_prompt()}, {"role": "user", "content": "Summarise."}]
    kw = dict(model=model, messages=messages, max_tokens=4, temperature=0, extra_body={"retrieval": {"enabled": False}})
    cold = oai.chat.completions.create(**kw)
    warm = oai.chat.completions.create(**kw)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < warm.usage.prompt_tokens_details.cached_tokens < warm.usage.prompt_tokens
    streamed = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    usage = streamed[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == warm.usage.prompt_tokens_details.cached_tokens
