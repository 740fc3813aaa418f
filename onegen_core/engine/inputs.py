"""Request input: what a user sends, rendered and checked before the engine sees it.

``RequestInput`` is a generation's input (prompt text, chat messages or prompt token
ids: exactly one). ``InputChecker`` renders it, or the queries of a search, and refuses
what cannot run with a ``ValueError`` that names the problem. Both are pure: the server
calls them on a tokenizer thread, so the engine's thread only steps. Text longer than
``max_model_len`` x (the longest token string of the vocabulary) characters cannot fit
whatever it says, and is refused without tokenising it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..retrieval.encoder import InputTooLong
from ..text.rendering import Rendered, Renderer, max_token_chars
from .params import SamplingParams


class ContextLengthExceeded(ValueError):
    """The prompt does not fit the model's context (``max_model_len``)."""

    code = "context_length_exceeded"


@dataclass(frozen=True)
class RequestInput:
    """A generation's input: exactly one of prompt text, chat messages or prompt token ids."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.prompt, self.messages, self.prompt_token_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")

    @property
    def user_text(self) -> str | None:
        """The last user turn as typed: the raw prompt, or the last user message's content ("" when no message
        is the user's); None for token ids. A hybrid retrieval's BM25 query starts with it."""
        if self.prompt is not None:
            return self.prompt
        if self.messages is not None:
            return next((str(m.get("content") or "") for m in reversed(self.messages) if m.get("role") == "user"), "")
        return None

    @classmethod
    def of(cls, prompt: str | RequestInput | None = None, **fields: Any) -> RequestInput:
        """The input that ``prompt`` (text or a ``RequestInput``) and / or ``fields`` (``messages=``,
        ``prompt_token_ids=``) describe: how ``Engine.prepare_request`` and ``add_request`` take it."""
        if isinstance(prompt, RequestInput):
            if any(v is not None for v in fields.values()):
                raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
            return prompt
        return cls(prompt, **fields)


class InputChecker:
    """Renders and checks inputs for one model: its renderer, vocabulary and context length."""

    def __init__(self, renderer: Renderer, vocab_size: int, max_model_len: int):
        self.renderer = renderer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_text_chars = max_model_len * max_token_chars(renderer.tokenizer)

    def request(self, given: RequestInput, sampling: SamplingParams | None = None) -> Rendered:
        """A generation's input -> its tokens and roles. ``ValueError`` / ``ContextLengthExceeded`` name the
        problem (ids outside the vocabulary, an empty prompt, one that leaves no room to generate)."""
        vocab = self.vocab_size
        if given.prompt is not None:
            self._check_text_length(given.prompt, "the prompt")
            rendered = self.renderer.prompt(given.prompt)
        elif given.messages is not None:
            self._check_text_length("".join(str(m.get("content") or "") for m in given.messages), "the messages")
            rendered = self.renderer.chat(given.messages)
        else:
            ids = list(given.prompt_token_ids or [])
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt_token_ids has ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}")
            rendered = self.renderer.prompt_ids(ids)
        bad_forced = [t for t in (sampling.forced_tokens.values() if sampling else ()) if t >= vocab]
        if bad_forced:
            raise ValueError(f"forced_tokens has ids outside the vocabulary (0..{vocab - 1}): {bad_forced[:5]}")
        if len(rendered) == 0:
            raise ValueError("the prompt is empty")
        if len(rendered) >= self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {len(rendered)} tokens; this model's context is {self.max_model_len} tokens "
                "(prompt plus at least one generated token)"
            )
        rendered.user_text = given.user_text
        return rendered

    def queries(self, queries: list[str]) -> list[list[int]]:
        """Queries -> token ids (query template + query RET token). ``InputTooLong`` names the query's position
        in ``queries``."""
        out = []
        for i, q in enumerate(queries):
            ids = self.renderer.query(q)
            if len(ids) > self.max_model_len:
                raise InputTooLong("query", i, len(ids), self.max_model_len)
            out.append(ids)
        return out

    def _check_text_length(self, text: str, what: str) -> None:
        """Refuse text that cannot fit before tokenising it: no token covers more than a known number of characters."""
        if len(text) > self.max_text_chars:
            raise ContextLengthExceeded(
                f"{what} has {len(text)} characters, which is more than {self.max_model_len} tokens for this "
                f"model's tokenizer whatever the text; this model's context is {self.max_model_len} tokens")
