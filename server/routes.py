"""Native routes: /generate (plain and SSE), /retrieve, /health/live, /health/ready, /info, /metrics,
and POST /admin/reload (check the index directories for a new version now; ``reloader.py``).

SSE of /generate sends ``data:`` lines with a ``type``: ``token`` (text delta, token
ids, logprobs), ``retrieval`` (one per search, with where it happened and the hits),
``final`` (the same body as the non-streamed response: text, usage, trace, timings)
or ``error``, and then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

import onegen_core

from . import __version__
from .auth import require_api_key, require_api_key_for_metrics
from .errors import ERROR_RESPONSES, APIError, error_response
from .generation import ClientDisconnected, until_disconnected
from .schemas import (
    GenerateRequest,
    GenerateResponse,
    GenerateShapes,
    Hit,
    IndexInfo,
    InfoResponse,
    LiveResponse,
    QueryResult,
    ReadyResponse,
    ReloadRequest,
    ReloadResponse,
    RetrieveRequest,
    RetrieveResponse,
)
from .state import ServerState, get_state
from .worker import EngineUnavailable, SearchAborted, SearchFailed

# One server-sent event (OpenAPI 3.1: the schema of a text/event-stream entry describes each event).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "description": "a JSON object, or [DONE] after the last one"},
    },
    "required": ["data"],
}
SSE_RESPONSE = {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
                "description": "JSON body, or server-sent events (data: lines) when stream is true"}

health = APIRouter(tags=["health"])
api = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
metrics_router = APIRouter(dependencies=[Depends(require_api_key_for_metrics)], tags=["operations"])


# ---------------------------------------------------------------------------- health, info, metrics
@health.get("/health/live", response_model=LiveResponse, responses={503: ERROR_RESPONSES[503]})
async def live(state: ServerState = Depends(get_state)) -> Any:
    """The process answers and the engine thread has not died (loading counts as alive)."""
    if state.worker.state == "failed":
        return error_response(503, f"the engine has failed: {state.worker.error}", "service_unavailable")
    return {"status": "ok"}


@health.get("/health/ready", response_model=ReadyResponse, responses={503: ERROR_RESPONSES[503]})
async def ready(state: ServerState = Depends(get_state)) -> Any:
    """200 when requests can be served; 503 while loading, draining, or when the engine loop is stalled."""
    reason = state.unavailable_reason()
    if reason is not None:
        return error_response(503, reason, "service_unavailable")
    return {"status": "ready"}


@metrics_router.get("/metrics", response_class=Response,
                    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                                     "description": "Prometheus text format"}, 401: ERROR_RESPONSES[401]})
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@api.get("/info", response_model=InfoResponse, tags=["operations"])
async def info(state: ServerState = Depends(get_state)) -> Any:
    """Model, dtype, limits, special tokens, index type / size / dimension, version."""
    s = state.settings
    limits: dict[str, int | float] = {
        "max_pending_requests": s.max_pending_requests, "max_num_seqs": s.max_num_seqs,
        "max_tokens": s.max_tokens_limit, "default_max_tokens": s.default_max_tokens,
        "max_retrieve_batch": s.max_retrieve_batch, "max_retrieve_k": s.max_retrieve_k,
        "max_prompts_per_request": s.max_prompts_per_request, "max_body_bytes": s.max_body_bytes,
        "drain_timeout_s": s.drain_timeout_s,
    }
    out: dict[str, Any] = {
        "model": state.model_name, "version": f"server {__version__}, onegen_core {onegen_core.__version__}",
        "state": "draining" if state.draining else state.worker.state, "limits": limits, "demo": state.demo,
    }
    engine = state.engine
    if engine is None:
        return out
    ckpt = engine.checkpoint
    spec = ckpt.spec
    limits["max_model_len"] = engine.max_model_len
    fingerprint = await asyncio.to_thread(lambda: ckpt.fingerprint)  # hashes the weights once: off the loop
    out.update(
        checkpoint=str(ckpt.path), checkpoint_fingerprint=fingerprint, architecture=ckpt.model_type,
        dtype=str(engine.dtype).removeprefix("torch."), device=str(engine.device), max_model_len=engine.max_model_len,
        kv_cache={"block_size": engine.config.block_size, "prefix_caching": engine.config.enable_prefix_caching},
        special_tokens={
            "query": [{"token": q.token, "id": ckpt.token_ids.by_name[q.token], "action": q.action,
                       "follow_up": q.follow_up} for q in spec.query_tokens],
            "document": {"token": spec.document_token, "id": ckpt.token_ids.document},
            "passage_open": {"token": spec.passage_open, "id": ckpt.token_ids.passage_open},
            "passage_close": {"token": spec.passage_close, "id": ckpt.token_ids.passage_close},
        },
        retrieval_defaults={"k": spec.retrieval.k, "max_retrievals": spec.retrieval.max_retrievals,
                            "index": engine.indexes.default, "mode": engine.config.retrieval_mode},
    )
    entries = engine.indexes.entries  # one snapshot: a reload replaces the mapping, never changes it
    default = engine.indexes.default
    first = [entries[default]] if default in entries else []
    infos = [_index_info(e) for e in first + [e for n, e in entries.items() if n != default]]
    out["indexes"] = [i for i in infos if i is not None]
    out["index"] = infos[0] if infos else None
    return out


def _index_info(entry: Any) -> IndexInfo | None:
    store = entry.store
    if store is None:  # a bare retriever (an engine built in code): no directory to describe
        return None
    m = store.manifest
    loaded = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.loaded_at))
    return IndexInfo(name=entry.name, path=str(store.path), root=str(store.root), version=store.version,
                     loaded_at=loaded, type=m.factory, size=m.count, dimension=m.dim, metric=m.metric,
                     checkpoint_fingerprint=m.checkpoint_fingerprint, build_time=m.build_time,
                     bm25=entry.bm25 is not None)


# ---------------------------------------------------------------------------- /admin/reload
@api.post("/admin/reload", response_model=ReloadResponse, tags=["operations"])
async def reload_indexes(body: ReloadRequest | None = None, state: ServerState = Depends(get_state)) -> Any:
    """Look for a new current version of each index (or of ``index``) now, load it aside and swap it in; a
    version that fails to load is refused and the served one keeps serving (``result``: failed, ``error``).
    Returns once every changed index is reloaded or refused; requests are served meanwhile."""
    name = body.index if body is not None else None
    state.check_index(name, "index")
    if state.reloader is None:
        raise APIError(503, "this server has no index reloader", type="service_unavailable")
    try:
        outcomes = await asyncio.to_thread(state.reloader.check, [name] if name else None)
    except EngineUnavailable as e:
        raise APIError(503, str(e), type="service_unavailable",
                       headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    return ReloadResponse(indexes=[dataclasses.asdict(o) for o in outcomes])


# ---------------------------------------------------------------------------- /generate
@api.post("/generate", response_model=GenerateResponse, responses={200: SSE_RESPONSE}, tags=["generation"])
async def generate(body: GenerateRequest, request: Request, state: ServerState = Depends(get_state)) -> Any:
    """Generate from a prompt or chat messages; the model retrieves in the same pass when it emits [RQ]."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(422, "give exactly one of 'prompt' and 'messages'", param="prompt")
    sampling = state.sampling_params(
        max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        stop=body.stop, seed=body.seed, logprobs=body.logprobs, ignore_eos=body.ignore_eos,
    )
    retrieval = state.retrieval_params(body.retrieval)
    if body.prompt is not None:
        inputs = [{"prompt": body.prompt, "param": "prompt"}]
    else:
        inputs = [{"messages": [m.model_dump() for m in body.messages or []], "param": "messages"}]
    gen = state.admit(request, "gen")
    await gen.begin(inputs, sampling, retrieval)
    return await gen.respond(GenerateShapes(state.model_name, gen.request_id), stream=body.stream)


# ---------------------------------------------------------------------------- /retrieve
@api.post("/retrieve", response_model=RetrieveResponse, tags=["retrieval"])
async def retrieve(body: RetrieveRequest, request: Request, state: ServerState = Depends(get_state)) -> Any:
    """Encode queries with the model (query template + [RQ]) and return the top-k documents of each."""
    queries = body.query_list()
    s = state.settings
    if len(queries) > s.max_retrieve_batch:
        raise APIError(422, f"queries: {len(queries)} queries is more than this server's limit of "
                       f"{s.max_retrieve_batch} per request", param="queries")
    if body.k > s.max_retrieve_k:
        raise APIError(422, f"k: {body.k} is more than this server's limit of {s.max_retrieve_k}", param="k")
    if state.engine is not None and not state.engine.indexes:
        raise APIError(422, "this server has no index loaded (start it with --index)", type="no_index",
                       param="queries")
    state.check_index(body.index, "index")
    state.check_mode(body.mode, body.index, "mode")
    with state.admitted():
        try:
            t0 = time.perf_counter()
            hits = await until_disconnected(request, state.worker.search(queries, body.k, body.return_text,
                                                                         body.index, body.mode))
            search_ms = (time.perf_counter() - t0) * 1000
        except ClientDisconnected:
            return Response(status_code=499)
        except EngineUnavailable as e:  # refused before any work (stopping, failed): another replica may take it
            raise APIError(503, str(e), type="service_unavailable",
                           headers={"Retry-After": str(s.retry_after_s)}) from None
        except SearchAborted as e:  # accepted, then aborted: not a 503, which a proxy would run again (finish_error)
            raise APIError(500, str(e), type="server_shutdown") from None
        except SearchFailed as e:
            raise APIError(500, str(e), type="engine_error") from None
        except ValueError as e:
            raise _query_error(e, body) from None
    return RetrieveResponse(
        model=state.model_name, search_ms=round(search_ms, 3),
        results=[QueryResult(query=q, hits=[Hit.of(h) for h in row]) for q, row in zip(queries, hits, strict=True)],
    )


def _query_error(e: ValueError, body: RetrieveRequest) -> APIError:
    """422 for a query the engine refused; one too long to encode is named by its position."""
    # here, not at import: it loads torch (the engine has)
    from onegen_core.retrieval.encoder import InputTooLong

    if not isinstance(e, InputTooLong):
        return APIError(422, str(e), param="queries")
    param = "queries" if isinstance(body.queries, str) else f"queries[{e.index}]"  # e.index: the query's position
    return APIError(422, f"{param}: the query has {e.n_tokens} tokens once rendered (query template and "
                    f"query token included), more than the model's maximum of {e.max_length}; shorten it",
                    type="context_length_exceeded", param=param)
