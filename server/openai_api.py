"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (plain and streaming).

The official ``openai`` client works against these unchanged. OneGen extras ride
along where OpenAI's shapes allow unknown fields: requests may carry ``top_k``,
``ignore_eos`` and ``retrieval`` (through the client's ``extra_body``); every choice
carries ``retrievals`` (the retrieval trace), a streamed chunk carries ``retrieval``
when a search happened, and ``usage`` has ``retrieved_tokens``. Options OneGen cannot
honour (n > 1, echo, penalties, logit_bias, top alternatives in logprobs, tools) are
refused with 422 naming the field rather than silently ignored.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from onegen_core.outputs import Finished, GenerationResult, RetrievalEvent, TokenDelta

from .auth import require_api_key
from .errors import ERROR_RESPONSES, APIError, ErrorResponse, error_payload
from .generation import (
    SSE_DONE,
    Generation,
    admit_generation,
    finish_error,
    retrieval_params,
    sampling_params,
    sse,
    stream_generation,
    wait_generation,
)
from .routes import SSE_RESPONSE
from .schemas import MAX_SEED, Retrieval, RetrievalOptions, Stop
from .state import ServerState, get_state

router = APIRouter(
    prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"],
    responses={**ERROR_RESPONSES, 404: {"model": ErrorResponse, "description": "unknown model"}},
)

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
PromptText = Annotated[str, Field(max_length=1_000_000)]


class _Lenient(BaseModel):
    """OpenAI clients send fields this server does not know; they are ignored unless listed below."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Common(_Lenient):
    model: str | None = Field(None, description="the served model name (see /v1/models)")
    temperature: float | None = Field(None, ge=0.0, le=100.0, description="default 1.0 (OpenAI's)")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, description="not supported: must be 0 or absent")
    frequency_penalty: float | None = Field(None, description="not supported: must be 0 or absent")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty or absent")
    user: str | None = None
    top_k: int = Field(0, ge=-1, le=1_000_000, description="OneGen extra: 0 or -1 = off")
    ignore_eos: bool = Field(False, description="OneGen extra")
    retrieval: RetrievalOptions | None = Field(None, description="OneGen extra: retrieval options")

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(422, f"{name} is not supported by this server (must be 0 or absent)", param=name)
        if self.logit_bias:
            raise APIError(422, "logit_bias is not supported by this server", param="logit_bias")


class CompletionRequest(_Common):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=1024)]
        | Annotated[list[TokenId], Field(min_length=1, max_length=1_000_000)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1024)]
    )
    max_tokens: int | None = Field(16, ge=1, le=1_000_000, description="default 16 (OpenAI's)")
    logprobs: int | None = Field(None, ge=0, le=0, description="0: log-probabilities of the sampled tokens")
    echo: bool = Field(False, description="not supported: must be false")
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = Field(None, description="not supported: must be absent")


class ContentPart(_Lenient):
    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


class ChatMessageIn(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=1_000_000)] | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="default: the server's default_max_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="top alternatives are not computed: 0 only")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty or absent")


class UsageOAI(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    retrieved_tokens: int = Field(description="OneGen: passage tokens inserted by retrieval")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    retrievals: list[Retrieval] = Field(default_factory=list, description="OneGen: the retrieval trace")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOAI


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    retrievals: list[Retrieval] = Field(default_factory=list, description="OneGen: the retrieval trace")


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOAI


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "onegen"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------- helpers
def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{state.model_name}'",
                       type="model_not_found", param="model")


def _usage(results: list[GenerationResult]) -> UsageOAI:
    p = sum(r.usage.prompt_tokens for r in results)
    c = sum(r.usage.completion_tokens for r in results)
    rt = sum(r.usage.retrieved_tokens for r in results)
    return UsageOAI(prompt_tokens=p, completion_tokens=c, total_tokens=p + c + rt, retrieved_tokens=rt)


def _token_strings(state: ServerState, ids: list[int]) -> list[str]:
    tok = state.engine.checkpoint.tokenizer
    return [tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def _completion_logprobs(state: ServerState, r: GenerationResult) -> CompletionLogprobs | None:
    if r.logprobs is None:
        return None
    tokens = _token_strings(state, r.token_ids)
    offsets, pos = [], 0
    for t in tokens:  # offsets of each token's own decoding (special tokens count as their text)
        offsets.append(pos)
        pos += len(t)
    return CompletionLogprobs(tokens=tokens, token_logprobs=list(r.logprobs), text_offset=offsets)


def _chat_logprobs(state: ServerState, ids: list[int], logprobs: list[float] | None) -> ChatLogprobs | None:
    if logprobs is None:
        return None
    return ChatLogprobs(content=[
        TokenLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8")))
        for t, lp in zip(_token_strings(state, ids), logprobs, strict=True)
    ])


def _check_token_ids(state: ServerState, prompts: list[dict[str, Any]], *, nested: bool) -> None:
    """422 naming the first token id outside the model's vocabulary (``prompt[j]`` or ``prompt[i][j]``)."""
    engine = state.engine
    if engine is None:  # still loading: admission answers 503
        return
    vocab = engine.model.vocab_size
    for i, kw in enumerate(prompts):
        for j, t in enumerate(kw.get("prompt_token_ids") or ()):
            if t >= vocab:
                where = f"prompt[{i}][{j}]" if nested else f"prompt[{j}]"
                raise APIError(422, f"{where}: token id {t} is outside this model's vocabulary (ids 0 to {vocab - 1})",
                               param=where)


def _temperature(t: float | None) -> float:
    return 1.0 if t is None else t


# ---------------------------------------------------------------------------- routes
@router.get("/models", response_model=ModelList)
async def models(state: ServerState = Depends(get_state)) -> Any:
    max_len = state.engine.max_model_len if state.engine is not None else None
    return ModelList(data=[ModelCard(id=state.model_name, created=int(state.started_at), max_model_len=max_len)])


@router.post("/completions", response_model=CompletionResponse, responses={200: SSE_RESPONSE})
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)) -> Any:
    _check_model(state, body.model)
    body.check_unsupported()
    if body.echo:
        raise APIError(422, "echo is not supported by this server", param="echo")
    if body.suffix:
        raise APIError(422, "suffix is not supported by this server", param="suffix")
    p = body.prompt
    # Text is rendered as plain text (special-token strings in it stay characters); a token-id array is
    # used as given: the way for a caller who means special tokens to send them (behind the same key).
    if isinstance(p, str):
        prompts: list[dict[str, Any]] = [{"prompt": p}]
    elif p and isinstance(p[0], int):
        prompts = [{"prompt_token_ids": list(p)}]
    else:
        prompts = [{"prompt": x} if isinstance(x, str) else {"prompt_token_ids": list(x)} for x in p]
    if len(prompts) > state.settings.max_prompts_per_request:
        raise APIError(422, f"prompt: {len(prompts)} prompts is more than this server's limit of "
                       f"{state.settings.max_prompts_per_request} per request", param="prompt")
    _check_token_ids(state, prompts, nested=not (p and isinstance(p[0], int)))
    sampling = sampling_params(
        state, max_tokens=body.max_tokens, temperature=_temperature(body.temperature), top_p=body.top_p or 1.0,
        top_k=max(body.top_k, 0), stop=body.stop, seed=body.seed, logprobs=body.logprobs is not None,
        ignore_eos=body.ignore_eos,
    )
    retrieval = retrieval_params(state, body.retrieval)
    inputs = [{**kw, "param": "prompt"} for kw in prompts]
    gen, ticket = await admit_generation(state, request, "cmpl", inputs, sampling, retrieval)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_generation(gen, ticket, _completion_chunks(state, gen, created, include_usage))
    results = await wait_generation(request, gen, ticket)
    if results is None:
        return Response(status_code=499)
    return CompletionResponse(
        id=gen.request_id, created=created, model=state.model_name, usage=_usage(results),
        choices=[
            CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason,
                             logprobs=_completion_logprobs(state, r),
                             retrievals=[Retrieval.of(x) for x in r.retrievals])
            for i, r in enumerate(results)
        ],
    )


async def _completion_chunks(state: ServerState, gen: Generation, created: int, include_usage: bool
                             ) -> AsyncIterator[bytes]:
    base = {"id": gen.request_id, "object": "text_completion", "created": created, "model": state.model_name}
    index = {rid: i for i, rid in enumerate(gen.ids)}
    async for ev in gen.events():
        i = index[ev.request_id]
        if isinstance(ev, TokenDelta):
            lp = None
            if ev.logprobs is not None:
                lp = {"tokens": _token_strings(state, ev.token_ids), "token_logprobs": ev.logprobs,
                      "top_logprobs": None, "text_offset": []}
            if ev.text or lp:
                yield sse({**base, "choices": [{"index": i, "text": ev.text, "finish_reason": None, "logprobs": lp}]})
        elif isinstance(ev, RetrievalEvent):
            yield sse({**base, "choices": [{"index": i, "text": "", "finish_reason": None, "logprobs": None,
                                            "retrieval": Retrieval.of(ev.record).model_dump()}]})
        elif isinstance(ev, Finished):
            err = finish_error(ev.result)
            if err is not None:
                yield sse(error_payload(*err))
                continue
            yield sse({**base, "choices": [{"index": i, "text": "", "finish_reason": ev.result.finish_reason,
                                            "logprobs": None}]})
    if include_usage:
        yield sse({**base, "choices": [], "usage": _usage([gen.results[r] for r in gen.ids]).model_dump()})
    yield SSE_DONE


@router.post("/chat/completions", response_model=ChatResponse, responses={200: SSE_RESPONSE})
async def chat_completions(body: ChatRequest, request: Request, state: ServerState = Depends(get_state)) -> Any:
    _check_model(state, body.model)
    body.check_unsupported()
    if body.tools:
        raise APIError(422, "tools are not supported by this server", param="tools")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    sampling = sampling_params(
        state, max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=_temperature(body.temperature), top_p=body.top_p or 1.0, top_k=max(body.top_k, 0),
        stop=body.stop, seed=body.seed, logprobs=body.logprobs, ignore_eos=body.ignore_eos,
    )
    retrieval = retrieval_params(state, body.retrieval)
    inputs = [{"messages": messages, "param": "messages"}]
    gen, ticket = await admit_generation(state, request, "chatcmpl", inputs, sampling, retrieval)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_generation(gen, ticket, _chat_chunks(state, gen, created, include_usage))
    results = await wait_generation(request, gen, ticket)
    if results is None:
        return Response(status_code=499)
    [r] = results
    return ChatResponse(
        id=gen.request_id, created=created, model=state.model_name, usage=_usage([r]),
        choices=[ChatChoice(index=0, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason,
                            logprobs=_chat_logprobs(state, r.token_ids, r.logprobs),
                            retrievals=[Retrieval.of(x) for x in r.retrievals])],
    )


async def _chat_chunks(state: ServerState, gen: Generation, created: int, include_usage: bool
                       ) -> AsyncIterator[bytes]:
    base = {"id": gen.request_id, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None, "logprobs": None}]})
    async for ev in gen.events():
        if isinstance(ev, TokenDelta):
            lp = _chat_logprobs(state, ev.token_ids, ev.logprobs)
            if ev.text or lp:
                yield sse({**base, "choices": [{"index": 0, "delta": {"content": ev.text}, "finish_reason": None,
                                                "logprobs": lp.model_dump() if lp else None}]})
        elif isinstance(ev, RetrievalEvent):
            yield sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": None, "logprobs": None,
                                            "retrieval": Retrieval.of(ev.record).model_dump()}]})
        elif isinstance(ev, Finished):
            err = finish_error(ev.result)
            if err is not None:
                yield sse(error_payload(*err))
                continue
            yield sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": ev.result.finish_reason,
                                            "logprobs": None}]})
    if include_usage:
        yield sse({**base, "choices": [], "usage": _usage([gen.results[r] for r in gen.ids]).model_dump()})
    yield SSE_DONE
