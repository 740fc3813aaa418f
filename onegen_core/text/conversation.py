"""Role-labelled rendering of a OneGen training conversation.

A training example is a conversation (``system`` / ``user`` / ``assistant`` messages)
whose assistant turns contain query RET tokens and, after them, the retrieved passage
wrapped in the passage delimiters. Training needs, for every token, its role and whether
it is an LM target:

* system and user text, chat-template scaffolding, passage spans (delimiters included)
  are CTX: no loss;
* assistant text and the end-of-turn token(s) are GEN: LM targets;
* a query RET token in an assistant turn is RET: its hidden state gets the contrastive
  loss, and the token itself is an LM target (the model must learn to emit it);
* the token right after a query RET token is not a target: at inference the engine
  inserts the passage (or forces the follow-up token) there, the model never samples it;
* an assistant message with ``"learn_answer": false`` keeps its query tokens (RET, targets,
  contrastive loss) but its text after the last passage and its end of turn are CTX: the
  question teaches retrieval, not how to answer (``training prepare --cloze-answer none``).

Training conversations are a trusted format: an assistant turn legitimately spells the
query token and the passage delimiters, so its text is tokenised as markup (special
tokens parsed). System and user contents are plain text, as the engine renders them:
a special-token string typed there stays characters.

Two ways to turn messages into text, both built on :class:`~onegen_core.text.rendering.Renderer`
so a prompt renders here exactly as the engine renders it:

* ``"chat_template"`` — the tokenizer's chat template. The text before assistant turn
  *i* is ``Renderer.chat(messages[:i], add_generation_prompt=True)``, the engine's prompt.
* ``"concat"`` — OneGen's ``DocumentTemplator``: message contents concatenated in order,
  no scaffolding; the text before the first assistant turn goes through
  ``Renderer.prompt`` (the spec's prompt template and BOS), like a raw engine prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..formats.roles import Role
from .rendering import Renderer, RenderError, slice_segments

ConversationFormat = Literal["chat_template", "concat"]
CONVERSATION_FORMATS: tuple[str, ...] = ("chat_template", "concat")
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass
class LabelledConversation:
    """Token ids of a conversation with, per token, its role and whether it is an LM target."""

    ids: list[int] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)
    targets: list[bool] = field(default_factory=list)  # token i is predicted from tokens < i (LM loss)
    query_positions: list[int] = field(default_factory=list)  # query RET tokens of assistant turns, in order
    query_messages: list[int] = field(default_factory=list)  # message index of each query RET token

    def __len__(self) -> int:
        return len(self.ids)

    def _extend(self, ids: list[int], role: Role, target: bool) -> None:
        self.ids.extend(ids)
        self.roles.extend([role] * len(ids))
        self.targets.extend([target] * len(ids))

    def labels(self, ignore_index: int = -100) -> list[int]:
        """Hugging Face style labels (shifted inside the loss): the id where a target, else ``ignore_index``."""
        return [t if g else ignore_index for t, g in zip(self.ids, self.targets, strict=True)]


def render_conversation(
    renderer: Renderer,
    messages: list[dict[str, Any]],
    *,
    format: ConversationFormat = "chat_template",
) -> LabelledConversation:
    """Render ``messages`` to token ids with roles and LM targets (see the module docstring)."""
    _check_messages(messages)
    if format == "chat_template":
        chunks = _chat_template_chunks(renderer, messages)
    elif format == "concat":
        chunks = _concat_chunks(renderer, messages)
    else:
        raise RenderError(f"unknown conversation format {format!r}; expected one of {CONVERSATION_FORMATS}")
    out = LabelledConversation()
    for kind, payload, msg_index in chunks:
        if kind == "ctx_ids":
            out._extend(payload, Role.CTX, False)
        elif kind == "ctx":  # segments: template markup and plain system / user contents
            out._extend(renderer.encode_segments(payload), Role.CTX, False)
        elif kind == "assistant":
            _append_assistant(renderer, out, payload, msg_index, messages[msg_index].get("learn_answer", True))
        elif kind == "tail":
            _append_tail(renderer, out, payload, messages[msg_index].get("learn_answer", True))
        else:  # pragma: no cover - internal invariant
            raise AssertionError(kind)
    for p in out.query_positions:  # the engine inserts / forces what follows a query token: never sampled
        if p + 1 < len(out.targets):
            out.targets[p + 1] = False
    assert len(out.ids) == len(out.roles) == len(out.targets)
    return out


# --------------------------------------------------------------------------- helpers
def _check_messages(messages: list[dict[str, Any]]) -> None:
    if not isinstance(messages, list) or not messages:
        raise RenderError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RenderError(f"messages[{i}] must be an object, got {type(m).__name__}")
        if m.get("role") not in MESSAGE_ROLES:
            raise RenderError(f"messages[{i}] has role {m.get('role')!r}; expected one of {MESSAGE_ROLES}")
        if not isinstance(m.get("content"), str):
            raise RenderError(f"messages[{i}] needs a string 'content'")
        if "learn_answer" in m and (m["role"] != "assistant" or not isinstance(m["learn_answer"], bool)):
            raise RenderError(f"messages[{i}]: 'learn_answer' must be true or false, on an assistant message")


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Role and content only: what the chat template sees (training rows carry positives / negatives too)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _template_text(renderer: Renderer, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return renderer.tokenizer.apply_chat_template(_plain_messages(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)


def _chat_template_chunks(renderer: Renderer, messages: list[dict[str, Any]]) -> list[tuple[str, Any, int]]:
    """Split the chat-template text into CTX scaffolding, assistant contents and end-of-turn tails."""
    if getattr(renderer.tokenizer, "chat_template", None) is None:
        raise RenderError(
            "the tokenizer has no chat template: set 'chat_template' in the training config, "
            "or use conversation_format: concat (OneGen's plain concatenation)"
        )
    full = _template_text(renderer, messages, False)
    # The same text as segments: the template's markup, and every content plain (assistant contents are
    # taken from ``full`` by position below and tokenised as markup by _append_assistant).
    segments = renderer.chat_segments(_plain_messages(messages), add_generation_prompt=False)
    if "".join(t for t, _ in segments) != full:  # pragma: no cover - chat_segments verifies against the template
        raise AssertionError("chat segments do not spell the chat template's text")
    chunks: list[tuple[str, Any, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise RenderError("messages[0] is an assistant message; a conversation must start with system or user")
        prefix = _template_text(renderer, messages[:i], True)
        upto = _template_text(renderer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= cursor):
            raise RenderError(
                f"the chat template does not render messages[{i}] incrementally (the text of a conversation "
                "prefix is not a prefix of the whole conversation's text); set 'chat_template' to a template "
                "that does, or use conversation_format: concat"
            )
        delta = upto[len(prefix):]
        content = m["content"]
        j = delta.find(content)
        if j < 0:
            raise RenderError(
                f"the chat template rewrites the content of messages[{i}] (assistant); the labelled spans "
                "cannot be located in its output"
            )
        if cursor == 0:
            # The text before the first assistant turn is exactly the engine's prompt: render it the same way.
            chunks.append(("ctx_ids", renderer.chat(messages[:i], add_generation_prompt=True).ids, i))
        else:
            chunks.append(("ctx", slice_segments(segments, cursor, len(prefix)), i))
        chunks.append(("ctx", slice_segments(segments, len(prefix), len(prefix) + j), i))
        chunks.append(("assistant", content, i))
        chunks.append(("tail", delta[j + len(content):], i))
        cursor = len(upto)
    chunks.append(("ctx", slice_segments(segments, cursor, len(full)), len(messages)))
    return chunks


def _concat_chunks(renderer: Renderer, messages: list[dict[str, Any]]) -> list[tuple[str, Any, int]]:
    """OneGen's DocumentTemplator: contents concatenated; CTX runs of non-assistant text, assistant turns GEN."""
    chunks: list[tuple[str, Any, int]] = []
    pending = ""
    started = False
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            pending += m["content"]
            continue
        if not started:
            chunks.append(("ctx_ids", renderer.prompt(pending).ids, i))
            started = True
        elif pending:
            chunks.append(("ctx", [(pending, False)], i))
        pending = ""
        chunks.append(("assistant", m["content"], i))
    if pending:
        chunks.append(("ctx", [(pending, False)], len(messages)))
    return chunks


def _append_assistant(renderer: Renderer, out: LabelledConversation, content: str, msg_index: int,
                      learn_answer: bool = True) -> None:
    """Assistant text (trusted markup): GEN, query tokens RET (and targets), passage spans CTX; with
    ``learn_answer`` false the text after the last passage (all of it, without a passage) is CTX."""
    tid = renderer.token_ids
    query_ids = set(tid.query)
    in_passage = False
    ids = renderer.markup(content)
    closes = [k for k, t in enumerate(ids) if t == tid.passage_close]
    answer_from = len(ids) if learn_answer else (closes[-1] + 1 if closes else 0)
    for k, t in enumerate(ids):
        if t == tid.passage_open:
            if in_passage:
                raise RenderError(
                    f"messages[{msg_index}]: {renderer.spec.passage_open!r} opened twice without "
                    f"{renderer.spec.passage_close!r}"
                )
            in_passage = True
            out._extend([t], Role.CTX, False)
        elif t == tid.passage_close:
            if not in_passage:
                raise RenderError(
                    f"messages[{msg_index}]: {renderer.spec.passage_close!r} without a preceding "
                    f"{renderer.spec.passage_open!r}"
                )
            in_passage = False
            out._extend([t], Role.CTX, False)
        elif in_passage:
            out._extend([t], Role.CTX, False)
        elif t in query_ids:
            out.query_positions.append(len(out.ids))
            out.query_messages.append(msg_index)
            out._extend([t], Role.RET, True)
        elif k < answer_from:
            out._extend([t], Role.GEN, True)
        else:
            out._extend([t], Role.CTX, False)
    if in_passage:
        raise RenderError(f"messages[{msg_index}]: {renderer.spec.passage_open!r} is never closed")


def _append_tail(renderer: Renderer, out: LabelledConversation, tail: str, learn_answer: bool = True) -> None:
    """End-of-turn scaffolding: GEN through the first special token (the model must learn to stop), then CTX
    (all CTX when the message's answer is not learned)."""
    ids = renderer.markup(tail)
    if not learn_answer:
        out._extend(ids, Role.CTX, False)
        return
    specials = set(getattr(renderer.tokenizer, "all_special_ids", []) or [])
    cut = len(ids)
    for k, t in enumerate(ids):
        if t in specials:
            cut = k + 1
            break
    out._extend(ids[:cut], Role.GEN, True)
    out._extend(ids[cut:], Role.CTX, False)
