"""Rendering of prompts, chats, documents, queries and inserted passages into token ids.

The one place where text becomes tokens with roles. The index builder, the engine,
``/retrieve`` and training all call this, so a document renders identically
everywhere. Nothing is added behind the caller's back: BOS only where the spec's
``add_bos`` says so, never EOS; chat templates are rendered to text by the tokenizer
and tokenised without extra special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checkpoint import SpecialTokenIds
from .roles import Role
from .spec import OneGenSpec


class RenderError(ValueError):
    """Input that cannot be rendered (e.g. chat messages for a tokenizer without a chat template)."""


@dataclass
class Rendered:
    ids: list[int] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)

    def extend(self, ids: list[int], role: Role) -> Rendered:
        self.ids.extend(ids)
        self.roles.extend([role] * len(ids))
        return self

    def __len__(self) -> int:
        return len(self.ids)


class Renderer:
    def __init__(self, tokenizer: Any, spec: OneGenSpec, token_ids: SpecialTokenIds):
        self.tokenizer = tokenizer
        self.spec = spec
        self.token_ids = token_ids
        self._bos = [tokenizer.bos_token_id] if spec.add_bos and tokenizer.bos_token_id is not None else []

    @classmethod
    def for_checkpoint(cls, ckpt: Any) -> Renderer:
        return cls(ckpt.tokenizer, ckpt.spec, ckpt.token_ids)

    def text(self, text: str) -> list[int]:
        """Plain tokenisation, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    # ---------------------------------------------------------------- prompts
    def prompt(self, prompt: str) -> Rendered:
        """A raw prompt, formatted with the spec's prompt template if it has one. All CTX."""
        text = self.spec.prompt_template.format(prompt=prompt) if self.spec.prompt_template else prompt
        return Rendered().extend(self._bos + self.text(text), Role.CTX)

    def chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> Rendered:
        """Chat messages through the tokenizer's chat template, ready for the assistant's turn. All CTX."""
        if not messages:
            raise RenderError("messages must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RenderError(f"messages[{i}] must have 'role' and 'content'")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise RenderError("this checkpoint's tokenizer has no chat template; send a plain prompt instead")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return Rendered().extend(self.text(text), Role.CTX)

    # ---------------------------------------------------------------- retrieval units
    def document(self, text: str, title: str | None = None) -> list[int]:
        """Document template + the document RET token (whose hidden state is the document vector)."""
        body = self.spec.document_template.format(text=text, title=title or "")
        return self._bos + self.text(body) + [self.token_ids.document]

    def query(self, query: str) -> list[int]:
        """Query template + the first query RET token (whose hidden state is the query vector)."""
        body = self.spec.query_template.format(query=query)
        return self._bos + self.text(body) + [self.token_ids.by_name[self.spec.query_tokens[0].token]]

    def passage(self, text: str, title: str | None = None) -> list[int]:
        """What is inserted after an ``insert`` query token: open + passage + close (all CTX)."""
        body = self.spec.passage_template.format(text=text, title=title or "")
        return [self.token_ids.passage_open] + self.text(body) + [self.token_ids.passage_close]
