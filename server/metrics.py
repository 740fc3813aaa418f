"""Prometheus metrics (prefix ``onegen_``), named after vLLM's where one exists.

Counters and histograms are fed by the engine worker thread as events come out of
``Engine.step()`` (prometheus_client is thread-safe), so a request that is aborted
or whose client went away is still counted. Gauges (running / waiting / KV cache
usage) are read from the worker's latest engine-stats snapshot at scrape time, and the
served indexes' gauges (version, documents, when it was loaded) from the engine's index
registry. Each app has its own ``CollectorRegistry``, so several apps in one process do not clash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from onegen_core.engine.outputs import GenerationResult

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_SEARCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServedIndex(NamedTuple):
    """What the index gauges show of one served index."""

    name: str
    version: int | None  # None: a plain directory (shown as 0)
    documents: int
    loaded_at: float  # Unix time


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.model_name = model_name
        label = ["model_name"]
        self.requests_running = Gauge("onegen_num_requests_running", "Requests in the engine's running batch.",
                                      label, registry=r)
        self.requests_waiting = Gauge("onegen_num_requests_waiting", "Requests waiting to be scheduled.",
                                      label, registry=r)
        self.kv_cache_usage = Gauge("onegen_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).",
                                    label, registry=r)
        self.num_preemptions = Gauge("onegen_num_preemptions", "Preemptions since start (engine counter).",
                                     label, registry=r)
        # the prefix cache (engine counters since start, read at scrape time like num_preemptions)
        self.prefix_cache_hits = Gauge("onegen_prefix_cache_hit_tokens", "Prompt tokens admissions found in the "
                                       "prefix cache since start (engine counter).", label, registry=r)
        self.prefix_cache_misses = Gauge("onegen_prefix_cache_miss_tokens", "Prompt tokens admissions had to "
                                         "prefill since start (engine counter).", label, registry=r)
        self.cached_kv_blocks = Gauge("onegen_num_cached_kv_blocks", "KV blocks registered in the prefix cache, "
                                      "held by a request or not.", label, registry=r)
        self.prefix_cache_evictions = Gauge("onegen_prefix_cache_evictions", "Cached KV blocks evicted to make "
                                            "room since start (engine counter).", label, registry=r)
        self.requests_in_flight = Gauge("onegen_http_requests_in_flight",
                                        "Requests admitted by the HTTP layer and not yet answered.", label, registry=r)
        self.prompt_tokens = Counter("onegen_prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.prompt_tokens_cached = Counter("onegen_prompt_tokens_cached", "Prompt tokens of finished requests "
                                            "served from the prefix cache.", label, registry=r)
        self.generation_tokens = Counter("onegen_generation_tokens", "Tokens generated (query tokens included).",
                                         label, registry=r)
        self.retrieved_tokens = Counter("onegen_retrieved_tokens", "Passage tokens inserted by retrieval.",
                                        label, registry=r)
        self.request_success = Counter("onegen_request_success", "Finished requests by finish reason.",
                                       label + ["finished_reason"], registry=r)
        self.requests_rejected = Counter("onegen_requests_rejected", "Requests refused before admission.",
                                         label + ["reason"], registry=r)
        self.retrievals = Counter("onegen_retrievals", "Retrievals (searches) made while generating.",
                                  label, registry=r)
        self.ttft = Histogram("onegen_time_to_first_token_seconds", "Time to first token.", label,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("onegen_inter_token_latency_seconds", "Time between consecutive output tokens.",
                             label, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("onegen_e2e_request_latency_seconds", "Arrival to finish of a request.", label,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("onegen_request_queue_time_seconds", "Arrival to first scheduling.", label,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.search_latency = Histogram("onegen_retrieval_search_seconds",
                                        "Index search latency (source: generate = in-decode, retrieve = /retrieve).",
                                        label + ["source"], buckets=_SEARCH_BUCKETS, registry=r)
        self.retrievals_per_request = Histogram("onegen_retrievals_per_request",
                                                "Retrievals made by one finished request.", label,
                                                buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32, 64), registry=r)
        index = label + ["index"]
        self.index_reloads = Counter("onegen_index_reloads", "Reloads of a new index version, by index and result "
                                     "(success; failed: refused, the old version keeps serving).",
                                     index + ["result"], registry=r)
        self.index_version = Gauge("onegen_index_version", "Version number of the served index (0: a plain "
                                   "directory, a single version).", index, registry=r)
        self.index_documents = Gauge("onegen_index_documents", "Documents (vectors) in the served index version.",
                                     index, registry=r)
        self.index_loaded = Gauge("onegen_index_last_reload_timestamp_seconds", "Unix time the served index version "
                                  "was loaded (at start, or by its last reload).", index, registry=r)
        self._stats_source: Callable[[], dict[str, Any]] | None = None
        self._in_flight_source: Callable[[], int] | None = None
        self._indexes_source: Callable[[], Iterable[ServedIndex]] | None = None

    # ---------------------------------------------------------------- fed by the worker thread
    def on_tokens(self, n: int, gaps: list[float]) -> None:
        self.generation_tokens.labels(self.model_name).inc(n)
        h = self.itl.labels(self.model_name)
        for g in gaps:
            h.observe(g)

    def on_retrieval(self, search_ms: float) -> None:
        self.retrievals.labels(self.model_name).inc()
        self.search_latency.labels(self.model_name, "generate").observe(search_ms / 1000.0)

    def on_finished(self, result: GenerationResult, tokens_already_counted: int) -> None:
        m = self.model_name
        u = result.usage
        self.prompt_tokens.labels(m).inc(u.prompt_tokens)
        self.prompt_tokens_cached.labels(m).inc(u.cached_tokens)
        if u.completion_tokens > tokens_already_counted:  # tokens not seen as deltas (e.g. withheld by a stop)
            self.generation_tokens.labels(m).inc(u.completion_tokens - tokens_already_counted)
        self.retrieved_tokens.labels(m).inc(u.retrieved_tokens)
        self.request_success.labels(m, result.finish_reason).inc()
        self.retrievals_per_request.labels(m).observe(len(result.retrievals))
        t0 = result.arrival_time
        if result.first_token_time is not None:
            self.ttft.labels(m).observe(max(0.0, result.first_token_time - t0))
        if result.first_scheduled_time is not None:
            self.queue_time.labels(m).observe(max(0.0, result.first_scheduled_time - t0))
        if result.finish_time is not None:
            self.e2e.labels(m).observe(max(0.0, result.finish_time - t0))

    def on_search(self, seconds: float) -> None:
        self.search_latency.labels(self.model_name, "retrieve").observe(seconds)

    def on_rejected(self, reason: str) -> None:
        self.requests_rejected.labels(self.model_name, reason).inc()

    def on_index_reload(self, index: str, result: str) -> None:
        self.index_reloads.labels(self.model_name, index, result).inc()

    # ---------------------------------------------------------------- scrape
    def bind(self, stats: Callable[[], dict[str, Any]], in_flight: Callable[[], int],
             indexes: Callable[[], Iterable[ServedIndex]] | None = None) -> None:
        self._stats_source = stats
        self._in_flight_source = in_flight
        self._indexes_source = indexes

    def render(self) -> bytes:
        m = self.model_name
        stats = self._stats_source() if self._stats_source else {}
        self.requests_running.labels(m).set(stats.get("num_running", 0))
        self.requests_waiting.labels(m).set(stats.get("num_waiting", 0))
        self.kv_cache_usage.labels(m).set(stats.get("kv_cache_usage", 0.0))
        self.num_preemptions.labels(m).set(stats.get("num_preemptions", 0))
        self.prefix_cache_hits.labels(m).set(stats.get("prefix_cache_hit_tokens", 0))
        self.prefix_cache_misses.labels(m).set(stats.get("prefix_cache_miss_tokens", 0))
        self.cached_kv_blocks.labels(m).set(stats.get("num_cached_kv_blocks", 0))
        self.prefix_cache_evictions.labels(m).set(stats.get("prefix_cache_evictions", 0))
        if self._in_flight_source:
            self.requests_in_flight.labels(m).set(self._in_flight_source())
        for ix in self._indexes_source() if self._indexes_source else ():
            self.index_version.labels(m, ix.name).set(ix.version or 0)
            self.index_documents.labels(m, ix.name).set(ix.documents)
            self.index_loaded.labels(m, ix.name).set(ix.loaded_at)
            for result in ("success", "failed"):  # both series exist from the start, at 0
                self.index_reloads.labels(m, ix.name, result)
        return generate_latest(self.registry)
