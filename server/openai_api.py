"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (plain and streaming).

The official ``openai`` client works against these unchanged. OneGen extras ride
along where OpenAI's shapes allow unknown fields: requests may carry ``top_k``,
``ignore_eos`` and ``retrieval`` (through the client's ``extra_body``); every choice
carries ``retrievals`` (the retrieval trace), a streamed chunk carries ``retrieval``
when a search happened, and ``usage`` has ``retrieved_tokens``. Options OneGen cannot
honour (n > 1, echo, penalties, logit_bias, top alternatives in logprobs, tools) are
refused with 422 naming the field rather than silently ignored.

A route checks its body, admits and begins a ``Generation`` and lets it respond in its
shapes (``CompletionShapes``, ``ChatShapes``), as /generate does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from onegen_core.engine.outputs import GenerationResult, TokenDelta
from onegen_core.engine.params import RetrievalParams, SamplingParams

from .auth import require_api_key
from .errors import ERROR_RESPONSES, APIError, ErrorResponse
from .routes import SSE_RESPONSE
from .schemas import MAX_SEED, ResponseShapes, Retrieval, RetrievalOptions, Stop
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

    def check(self, state: ServerState) -> None:
        """404 for a model this server does not serve; 422 naming an option it cannot honour."""
        if self.model is not None and self.model != state.model_name:
            raise APIError(404, f"the model '{self.model}' does not exist; this server serves '{state.model_name}'",
                           type="model_not_found", param="model")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(422, f"{name} is not supported by this server (must be 0 or absent)", param=name)
        if self.logit_bias:
            raise APIError(422, "logit_bias is not supported by this server", param="logit_bias")

    def engine_params(self, state: ServerState, *, max_tokens: int | None, logprobs: bool
                      ) -> tuple[SamplingParams, RetrievalParams]:
        """The engine's parameters, OpenAI's defaults filled in (temperature 1, top_p 1)."""
        sampling = state.sampling_params(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0, top_k=max(self.top_k, 0), stop=self.stop, seed=self.seed, logprobs=logprobs,
            ignore_eos=self.ignore_eos,
        )
        return sampling, state.retrieval_params(self.retrieval)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


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

    def check(self, state: ServerState) -> None:
        super().check(state)
        if self.echo:
            raise APIError(422, "echo is not supported by this server", param="echo")
        if self.suffix:
            raise APIError(422, "suffix is not supported by this server", param="suffix")


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

    def check(self, state: ServerState) -> None:
        super().check(state)
        if self.tools:
            raise APIError(422, "tools are not supported by this server", param="tools")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens served from the prefix cache")


class UsageOAI(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    retrieved_tokens: int = Field(description="OneGen: passage tokens inserted by retrieval")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: None = None
    text_offset: list[int]


class _Choice(BaseModel):
    """One prompt's answer in OpenAI's shape (each route adds its content and narrows ``logprobs``)."""

    index: int
    finish_reason: str | None
    logprobs: BaseModel | None = None
    retrievals: list[Retrieval] = Field(default_factory=list, description="OneGen: the retrieval trace")


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class _Response(BaseModel):
    """OpenAI's envelope of a completion: each route narrows ``object`` and ``choices``."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: UsageOAI


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


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


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


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
def _usage(results: list[GenerationResult]) -> UsageOAI:
    p = sum(r.usage.prompt_tokens for r in results)
    c = sum(r.usage.completion_tokens for r in results)
    rt = sum(r.usage.retrieved_tokens for r in results)
    cached = PromptTokensDetails(cached_tokens=sum(r.usage.cached_tokens for r in results))
    return UsageOAI(prompt_tokens=p, completion_tokens=c, total_tokens=p + c + rt, prompt_tokens_details=cached,
                    retrieved_tokens=rt)


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


# ---------------------------------------------------------------------------- routes
@router.get("/models", response_model=ModelList)
async def models(state: ServerState = Depends(get_state)) -> Any:
    max_len = state.engine.max_model_len if state.engine is not None else None
    return ModelList(data=[ModelCard(id=state.model_name, created=int(state.started_at), max_model_len=max_len)])


@router.post("/completions", response_model=CompletionResponse, responses={200: SSE_RESPONSE})
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)) -> Any:
    body.check(state)
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
    sampling, retrieval = body.engine_params(state, max_tokens=body.max_tokens, logprobs=body.logprobs is not None)
    gen = state.admit(request, "cmpl")
    await gen.begin([{**kw, "param": "prompt"} for kw in prompts], sampling, retrieval)
    return await gen.respond(CompletionShapes(state, gen.request_id, body.include_usage), stream=body.stream)


@router.post("/chat/completions", response_model=ChatResponse, responses={200: SSE_RESPONSE})
async def chat_completions(body: ChatRequest, request: Request, state: ServerState = Depends(get_state)) -> Any:
    body.check(state)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    sampling, retrieval = body.engine_params(state, max_tokens=body.max_completion_tokens or body.max_tokens,
                                             logprobs=body.logprobs)
    gen = state.admit(request, "chatcmpl")
    await gen.begin([{"messages": messages, "param": "messages"}], sampling, retrieval)
    return await gen.respond(ChatShapes(state, gen.request_id, body.include_usage), stream=body.stream)


# ---------------------------------------------------------------------------- answers
@dataclass
class _OpenAIShapes(ResponseShapes):
    """What the two OpenAI routes' streams share: chunks with one choice each, a ``retrieval`` on the choice
    of a search (OneGen extra), a bare error shape, and a last chunk with the usage when asked for."""

    state: ServerState
    request_id: str
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    object: ClassVar[str]
    nothing: ClassVar[dict[str, Any]]  # the content of a choice that carries no text

    def chunk(self, index: int, content: dict[str, Any], finish_reason: str | None = None,
              logprobs: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        choice = {"index": index, **content, "finish_reason": finish_reason, "logprobs": logprobs, **extra}
        return {**self.head(), "choices": [choice]}

    def head(self) -> dict[str, Any]:
        return {"id": self.request_id, "object": self.object, "created": self.created, "model": self.state.model_name}

    def retrieval(self, index: int, retrieval: dict[str, Any]) -> dict[str, Any]:
        return self.chunk(index, self.nothing, retrieval=retrieval)

    def finished(self, index: int, result: GenerationResult) -> dict[str, Any]:
        return self.chunk(index, self.nothing, result.finish_reason)

    def closing(self, results: list[GenerationResult]) -> list[dict[str, Any]]:
        return [{**self.head(), "choices": [], "usage": _usage(results).model_dump()}] if self.include_usage else []


class CompletionShapes(_OpenAIShapes):
    """/v1/completions: a ``CompletionResponse`` (one choice per prompt), or ``text_completion`` chunks."""

    object = "text_completion"
    nothing = {"text": ""}

    def token(self, index: int, ev: TokenDelta) -> dict[str, Any] | None:
        lp = None
        if ev.logprobs is not None:
            lp = {"tokens": _token_strings(self.state, ev.token_ids), "token_logprobs": ev.logprobs,
                  "top_logprobs": None, "text_offset": []}
        return self.chunk(index, {"text": ev.text}, logprobs=lp) if ev.text or lp else None

    def body(self, results: list[GenerationResult]) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.state.model_name, usage=_usage(results),
            choices=[
                CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason,
                                 logprobs=_completion_logprobs(self.state, r),
                                 retrievals=[Retrieval.of(x) for x in r.retrievals])
                for i, r in enumerate(results)
            ],
        )


class ChatShapes(_OpenAIShapes):
    """/v1/chat/completions: a ``ChatResponse``, or ``chat.completion.chunk`` deltas after the assistant's role."""

    object = "chat.completion.chunk"
    nothing = {"delta": {}}

    def opening(self) -> list[dict[str, Any]]:
        return [self.chunk(0, {"delta": {"role": "assistant", "content": ""}})]

    def token(self, index: int, ev: TokenDelta) -> dict[str, Any] | None:
        lp = _chat_logprobs(self.state, ev.token_ids, ev.logprobs)
        if not (ev.text or lp):
            return None
        return self.chunk(index, {"delta": {"content": ev.text}}, logprobs=lp.model_dump() if lp else None)

    def body(self, results: list[GenerationResult]) -> ChatResponse:
        [r] = results
        return ChatResponse(
            id=self.request_id, created=self.created, model=self.state.model_name, usage=_usage([r]),
            choices=[ChatChoice(index=0, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason,
                                logprobs=_chat_logprobs(self.state, r.token_ids, r.logprobs),
                                retrievals=[Retrieval.of(x) for x in r.retrievals])],
        )
