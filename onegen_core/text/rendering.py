"""Rendering of prompts, chats, documents, queries and inserted passages into token ids.

The one place where text becomes tokens with roles. The index builder, the engine,
``/retrieve`` and training all call this, so a document renders identically
everywhere. Nothing is added behind the caller's back: BOS only where the spec's
``add_bos`` says so, never EOS.

Two kinds of text, kept apart all the way to the token ids:

* *plain* text — a raw prompt, each chat message's content, a ``/retrieve`` query,
  corpus and passage text, the fields filled into the spec's templates — is tokenised
  with special-token parsing off: ``<paragraph>``, ``[RQ]`` or ``<|im_start|>`` typed by
  a user are their characters, never the ids of a passage insertion or a role marker;
* *markup* — the spec's template text around ``{prompt}`` / ``{text}`` / ``{query}``,
  the chat template's scaffolding (role markers, end-of-turn tokens) and training's
  trusted assistant turns — keeps its special tokens.

Chat messages are rendered by the tokenizer's chat template with a placeholder per
content; the scaffolding between the placeholders is markup and the contents are
spliced back in as plain text (``chat_segments``). A mix of both is tokenised in one
call when no special token of the result comes from plain text — the same ids as
tokenising the whole string, so normal inputs render exactly as they always did —
and otherwise at the special tokens of the markup, with each run between them
tokenised as plain text (``encode_segments``).
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    from jinja2 import TemplateError
except ImportError:  # pragma: no cover - without jinja2 transformers renders no chat template at all
    class TemplateError(Exception):  # type: ignore[no-redef]
        """Stands in for jinja2's, which nothing can raise then."""

from ..formats.checkpoint import SpecialTokenIds
from ..formats.roles import Role
from ..formats.spec import OneGenSpec

# A piece of text and whether it is markup (True: special tokens parsed) or plain (False: never special).
Segment = tuple[str, bool]
_FORMATTER = string.Formatter()


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters of text that one token can stand for.

    A byte-level BPE token's string has one character per byte it covers, a
    SentencePiece piece one per character (byte-fallback pieces such as ``<0x41>`` are
    longer than what they cover), so the longest vocabulary string bounds both. Text
    longer than ``n * max_token_chars`` characters cannot fit in ``n`` tokens: it can be
    refused without tokenising it.
    """
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


class RenderError(ValueError):
    """Input that cannot be rendered (e.g. chat messages for a tokenizer without a chat template)."""


@dataclass
class Rendered:
    ids: list[int] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)
    # A request's last user turn as typed (a raw prompt, a chat's last user message), where a hybrid retrieval's
    # BM25 query starts (onegen_core.retrieval.fusion); set by the engine's input checker, None otherwise.
    user_text: str | None = field(default=None, compare=False)

    def extend(self, ids: list[int], role: Role) -> Rendered:
        self.ids.extend(ids)
        self.roles.extend([role] * len(ids))
        return self

    def __len__(self) -> int:
        return len(self.ids)


def template_segments(template: str, **values: str) -> list[Segment]:
    """A spec template (``str.format`` fields) as segments: its own text markup, the filled-in values plain."""
    out: list[Segment] = []
    for literal, name, spec, conversion in _FORMATTER.parse(template):
        if literal:
            out.append((literal, True))
        if name is not None:
            value = _FORMATTER.convert_field(_FORMATTER.get_field(name, (), values)[0], conversion)
            out.append((_FORMATTER.format_field(value, spec or ""), False))
    return out


def slice_segments(segments: Sequence[Segment], start: int, end: int) -> list[Segment]:
    """The characters ``[start, end)`` of the segments' joined text, each piece keeping its kind."""
    out: list[Segment] = []
    pos = 0
    for text, markup in segments:
        lo, hi = max(start, pos), min(end, pos + len(text))
        if lo < hi:
            out.append((text[lo - pos:hi - pos], markup))
        pos += len(text)
    return out


def _strip_segments(segments: Sequence[Segment]) -> list[Segment]:
    """The segments of ``"".join(text).strip()`` (what Jinja's ``trim`` makes of a message's content)."""
    joined = "".join(t for t, _ in segments)
    start = len(joined) - len(joined.lstrip())
    end = len(joined.rstrip())
    return slice_segments(segments, start, max(start, end))


class Renderer:
    def __init__(self, tokenizer: Any, spec: OneGenSpec, token_ids: SpecialTokenIds):
        self.tokenizer = tokenizer
        self.spec = spec
        self.token_ids = token_ids
        self._bos = [tokenizer.bos_token_id] if spec.add_bos and tokenizer.bos_token_id is not None else []
        # Every token that special-token parsing can match in text: the tokenizer's special added tokens
        # (BOS / EOS / role markers) and the spec's tokens (also when a tokenizer added them as ordinary ones).
        specials: dict[str, int] = {}
        for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(added, "special", False) and str(added):
                specials[str(added)] = tid
        specials.update(token_ids.by_name)
        unk = getattr(tokenizer, "unk_token_id", None)
        self._specials = specials
        # ids that plain text must never produce (UNK is what the model gives unknown characters, not a marker)
        self._reserved = frozenset(specials.values()) - {unk}
        self._special_re = (re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
                            if specials else None)

    @classmethod
    def for_checkpoint(cls, ckpt: Any) -> Renderer:
        return cls(ckpt.tokenizer, ckpt.spec, ckpt.token_ids)

    # ---------------------------------------------------------------- text to ids
    def _encode(self, text: str, *, split_special: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split_special)

    def text(self, text: str) -> list[int]:
        """Plain text: special-token strings in it are ordinary characters; no special tokens added."""
        if not text:
            return []
        ids = self._encode(text, split_special=True)
        if self._reserved.isdisjoint(ids):
            return ids
        # A spec token that the tokenizer holds as an ordinary added token still matches with special-token
        # parsing off: tokenise each of its occurrences character by character, so no piece holds it whole.
        out: list[int] = []
        pos = 0
        assert self._special_re is not None  # a reserved id was produced, so there are special tokens
        for m in self._special_re.finditer(text):
            out += self._encode(text[pos:m.start()], split_special=True)
            for ch in m.group():
                out += self._encode(ch, split_special=True)
            pos = m.end()
        out += self._encode(text[pos:], split_special=True)
        leaked = self._reserved.intersection(out)
        if leaked:  # only a one-character special token could get here
            raise RenderError(f"plain text tokenises to special token ids {sorted(leaked)}")
        return out

    def markup(self, text: str) -> list[int]:
        """Trusted text whose special tokens are parsed: template scaffolding, training's assistant turns."""
        return self._encode(text, split_special=False) if text else []

    def encode_segments(self, segments: Sequence[Segment]) -> list[int]:
        """Markup and plain segments to ids: special tokens only where markup spells them (module docstring)."""
        segments = [(t, m) for t, m in segments if t]
        if all(m for _, m in segments):
            return self.markup("".join(t for t, _ in segments))
        if not any(m for _, m in segments):
            return self.text("".join(t for t, _ in segments))
        whole = self._whole_if_clean(segments)
        if whole is not None:
            return whole
        out: list[int] = []
        run: list[str] = []  # text since the last special token of the markup: tokenised as plain text
        for text, is_markup in segments:
            if not is_markup:
                run.append(text)
                continue
            pos = 0
            for m in self._special_re.finditer(text) if self._special_re else ():
                run.append(text[pos:m.start()])
                out += self.text("".join(run))
                run = []
                out.append(self._specials[m.group()])
                pos = m.end()
            run.append(text[pos:])
        out += self.text("".join(run))
        return out

    def _whole_if_clean(self, segments: Sequence[Segment]) -> list[int] | None:
        """The whole text tokenised in one call, if every special token in it lies in markup; else None."""
        plain: list[tuple[int, int]] = []
        pos = 0
        for text, is_markup in segments:
            if not is_markup:
                plain.append((pos, pos + len(text)))
            pos += len(text)
        full = "".join(t for t, _ in segments)
        try:
            enc = self.tokenizer(full, add_special_tokens=False, split_special_tokens=False,
                                 return_offsets_mapping=True, verbose=False)
        except NotImplementedError:  # a slow (Python) tokenizer has no offsets: split at the markup instead
            return None
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if tid in self._reserved and (e <= s or any(s < pe and ps < e for ps, pe in plain)):
                return None
        return list(enc["input_ids"])

    # ---------------------------------------------------------------- prompts
    def prompt(self, prompt: str) -> Rendered:
        """A raw prompt (plain text), formatted with the spec's prompt template if it has one; with
        ``prompt_format: chat`` that text is the user message of the chat template. All CTX."""
        if self.spec.prompt_template:
            segments = template_segments(self.spec.prompt_template, prompt=prompt)
        else:
            segments = [(prompt, False)]
        if self.spec.prompt_format == "chat":
            message = {"role": "user", "content": "".join(t for t, _ in segments)}
            return Rendered().extend(self.encode_segments(self.chat_segments([message], contents=[segments])), Role.CTX)
        return Rendered().extend(self._bos + self.encode_segments(segments), Role.CTX)

    def prompt_ids(self, ids: list[int]) -> Rendered:
        """Token ids chosen by the caller, used as they are (no template; BOS only where the spec adds it). All CTX.

        The one way to put special token ids into a prompt on purpose (e.g. OpenAI's token-array prompts).
        """
        return Rendered().extend(self._bos + list(ids), Role.CTX)

    def chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> Rendered:
        """Chat messages through the tokenizer's chat template, ready for the assistant's turn. All CTX.

        The template's scaffolding keeps its special tokens; every message's content is plain text.
        """
        segments = self.chat_segments(messages, add_generation_prompt=add_generation_prompt)
        return Rendered().extend(self.encode_segments(segments), Role.CTX)

    def chat_segments(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        contents: Sequence[Sequence[Segment]] | None = None,
    ) -> list[Segment]:
        """The chat template's text as segments: its scaffolding markup, the messages' contents plain.

        The template is rendered once with a unique placeholder per content (each must occur exactly once)
        and once with the real contents; the real text must be the placeholder text with each placeholder
        replaced by its content, verbatim or trimmed (Jinja's ``trim``), or the messages are refused.
        ``contents`` gives a content as segments of its own (e.g. a query template around a query).
        """
        if not messages:
            raise RenderError("messages must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise RenderError(f"messages[{i}] must have 'role' and a string 'content'")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise RenderError("this checkpoint's tokenizer has no chat template; send a plain prompt instead")
        parts = [list(c) for c in contents] if contents is not None else [[(m["content"], False)] for m in messages]
        if len(parts) != len(messages) or any("".join(t for t, _ in p) != m["content"]
                                              for p, m in zip(parts, messages, strict=True)):
            raise RenderError("contents must spell each message's content")  # internal misuse

        def render(msgs: list[dict[str, Any]]) -> str:
            try:
                return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            except TemplateError as e:  # the template's own raise_exception (e.g. roles must alternate)
                raise RenderError(f"the chat template refuses these messages: {e}") from None

        nonce = secrets.token_hex(6)
        tags = [f"ONEGENMSG{nonce}N{i}X" for i in range(len(messages))]
        skeleton = render([{**m, "content": tag} for m, tag in zip(messages, tags, strict=True)])
        where: list[tuple[int, int]] = []
        for i, tag in enumerate(tags):
            if skeleton.count(tag) != 1:
                raise RenderError(
                    f"the chat template renders the content of messages[{i}] {skeleton.count(tag)} times; "
                    "its contents cannot be kept apart from the template's markup"
                )
            where.append((skeleton.index(tag), i))
        where.sort()
        scaffold: list[str] = []
        pos = 0
        for at, i in where:
            scaffold.append(skeleton[pos:at])
            pos = at + len(tags[i])
        scaffold.append(skeleton[pos:])
        real = render(messages)
        # Walk the real text: scaffold, content, scaffold, ... — each content as given or as trimmed.
        out: list[Segment] = [(scaffold[0], True)]
        if not real.startswith(scaffold[0]):
            raise RenderError("the chat template's output depends on the message contents beyond placing them")
        at = len(scaffold[0])
        for k, (_, i) in enumerate(where):
            after = scaffold[k + 1]
            for candidate in (parts[i], _strip_segments(parts[i])):
                text = "".join(t for t, _ in candidate)
                if real.startswith(text + after, at):
                    out += candidate
                    out.append((after, True))
                    at += len(text) + len(after)
                    break
            else:
                raise RenderError(
                    f"the chat template rewrites the content of messages[{i}]; it cannot be kept apart from "
                    "the template's markup"
                )
        if at != len(real):
            raise RenderError("the chat template's output depends on the message contents beyond placing them")
        return [(t, m) for t, m in out if t]

    # ---------------------------------------------------------------- retrieval units
    def document(self, text: str, title: str | None = None) -> list[int]:
        """Document template + the document RET token (whose hidden state is the document vector)."""
        body = template_segments(self.spec.document_template, text=text, title=title or "")
        return self._bos + self.encode_segments(body) + [self.token_ids.document]

    def query(self, query: str) -> list[int]:
        """Query template + the first query RET token (whose hidden state is the query vector).

        With ``query_format: chat`` the formatted query is the user message of the chat template and the
        query token opens the assistant's turn: the tokens a chat request to the engine holds when the
        model retrieves first, so ``/retrieve`` and in-generation retrieval compute the same vector.
        """
        body = template_segments(self.spec.query_template, query=query)
        token = self.token_ids.by_name[self.spec.query_tokens[0].token]
        if self.spec.query_format == "chat":
            message = {"role": "user", "content": "".join(t for t, _ in body)}
            return self.encode_segments(self.chat_segments([message], contents=[body])) + [token]
        return self._bos + self.encode_segments(body) + [token]

    def passage(self, text: str, title: str | None = None) -> list[int]:
        """What is inserted after an ``insert`` query token: open + passage + close (all CTX)."""
        body = template_segments(self.spec.passage_template, text=text, title=title or "")
        return [self.token_ids.passage_open] + self.encode_segments(body) + [self.token_ids.passage_close]
