"""/metrics parsed with prometheus_client's parser; counters and histograms move as requests are served."""

from __future__ import annotations

from server_harness import RETRIEVING_PROMPT, metric, scrape, wait_for

EXPECTED = [
    "onegen_num_requests_running", "onegen_num_requests_waiting", "onegen_kv_cache_usage_perc",
    "onegen_prompt_tokens_total", "onegen_generation_tokens_total", "onegen_retrieved_tokens_total",
    "onegen_request_success_total", "onegen_time_to_first_token_seconds_count",
    "onegen_inter_token_latency_seconds_count", "onegen_e2e_request_latency_seconds_count",
    "onegen_request_queue_time_seconds_count", "onegen_retrieval_search_seconds_count",
    "onegen_retrievals_per_request_count",
]


def test_metrics_move_with_requests(client):
    before = scrape(client)
    out = client.post("/generate", json={"prompt": RETRIEVING_PROMPT, "max_tokens": 32}).json()
    u = out["usage"]
    n_retrievals = len(out["retrievals"])
    assert n_retrievals > 0
    hits = client.post("/retrieve", json={"queries": ["capital of France"], "k": 1})
    assert hits.status_code == 200
    # the worker records the request's metrics as it finishes, before the response is sent
    after = scrape(client)
    names = {name for name, _ in after}
    assert all(n in names for n in EXPECTED), sorted(set(EXPECTED) - names)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("onegen_prompt_tokens_total") == u["prompt_tokens"]
    assert delta("onegen_generation_tokens_total") == u["completion_tokens"]
    assert delta("onegen_retrieved_tokens_total") == u["retrieved_tokens"] > 0
    assert delta("onegen_request_success_total", finished_reason=out["finish_reason"]) == 1
    assert delta("onegen_retrievals_total") == n_retrievals
    for h in ("onegen_time_to_first_token_seconds", "onegen_e2e_request_latency_seconds",
              "onegen_request_queue_time_seconds", "onegen_retrievals_per_request"):
        assert delta(h + "_count") == 1, h
    assert delta("onegen_retrievals_per_request_sum") == n_retrievals
    assert delta("onegen_inter_token_latency_seconds_count") == u["completion_tokens"] - 1
    assert delta("onegen_retrieval_search_seconds_count", source="generate") == n_retrievals
    assert delta("onegen_retrieval_search_seconds_count", source="retrieve") == 1
    assert delta("onegen_e2e_request_latency_seconds_sum") > 0
    # nothing left running once answered
    assert wait_for(lambda: metric(scrape(client), "onegen_num_requests_running") == 0, timeout=10)
    idle = scrape(client)
    assert metric(idle, "onegen_kv_cache_usage_perc") == 0 and metric(idle, "onegen_http_requests_in_flight") == 0


def test_metrics_content_type(client):
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain") and "version=" in r.headers["content-type"]
