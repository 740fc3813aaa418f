"""The OneGen spec of a checkpoint: ``onegen.json``.

It names the special tokens and their roles, what a query retrieval token does
(``insert`` a passage or ``annotate`` the output), the passage delimiters, the
document / query / prompt templates, and default retrieval limits. Presets
reproduce OneGen's released checkpoints so they load without hand-editing.

Templates use ``str.format`` fields: ``{text}`` and ``{title}`` for documents and
passages, ``{query}`` for queries, ``{prompt}`` for prompts. The document RET token
is appended after the rendered document and the query RET token after the rendered
query; nothing else (no BOS/EOS) is added behind the caller's back.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

SPEC_FILENAME = "onegen.json"
SPEC_FORMAT_VERSION = 1

Action = Literal["insert", "annotate"]
QUERY_FORMATS = ("template", "chat")
# Fields added to format version 1 after checkpoints and indexes were written with it: a spec that leaves them at
# their default writes the same onegen.json as before, so the checkpoint's fingerprint (over its files) and the
# indexes built for it stay valid (the default model's committed index among them).
ADDED_FIELDS: dict[str, Any] = {"prompt_format": "template"}


class SpecError(ValueError):
    """A missing, malformed or inconsistent ``onegen.json``."""


@dataclass(frozen=True)
class QueryToken:
    """A query RET token: sampled while decoding, its hidden state is the query vector."""

    token: str
    action: Action = "insert"
    # Token forced right after an ``annotate`` search (OneGen's entity linking forces [_CONTINUE_]).
    follow_up: str | None = None
    description: str = "retrieve a relevant document for the preceding text"


@dataclass(frozen=True)
class RetrievalDefaults:
    k: int = 1  # passages inserted per retrieval
    max_retrievals: int = 4  # per request; afterwards the query token is masked out of sampling


@dataclass(frozen=True)
class OneGenSpec:
    query_tokens: tuple[QueryToken, ...] = (QueryToken("[RQ]"),)
    document_token: str = "[RD]"
    document_token_description: str = "representation of the preceding document"
    passage_open: str = "<paragraph>"
    passage_close: str = "</paragraph>"
    # Extra special tokens the model knows (e.g. forced follow-ups); added to the vocabulary in training.
    extra_tokens: tuple[str, ...] = ()
    document_template: str = "{text}"
    passage_template: str = "{text}"
    query_template: str = "{query}"
    # How a query for /retrieve (and the index builder's search) becomes tokens before the query token:
    # "template": query_template as plain text (OneGen's concat-format checkpoints); "chat": query_template
    # as the user message of the tokenizer's chat template, ready for the assistant's turn — where a
    # chat-trained model emits the query token, so /retrieve's vector is the one generation computes.
    query_format: str = "template"
    # None: chat messages use the tokenizer's chat template and a raw prompt is used as is.
    # A string with {prompt}: raw prompts are formatted with it.
    prompt_template: str | None = None
    # How a raw prompt (/generate "prompt", /v1/completions) becomes tokens: "template" (prompt_template, or the text
    # as is); "chat": the (templated) prompt is the user message of the tokenizer's chat template, ready for the
    # assistant's turn — for a model trained on chat conversations only, which otherwise sees a raw prompt as text
    # to continue (the default SmolLM2 model answered "" to "What is anarchism?").
    prompt_format: str = "template"
    add_bos: bool = False  # prepend the tokenizer's BOS to raw prompts / documents / queries
    retrieval: RetrievalDefaults = field(default_factory=RetrievalDefaults)
    preset: str | None = None

    def __post_init__(self) -> None:
        if not self.query_tokens:
            raise SpecError("onegen.json: 'query_tokens' must name at least one query token")
        for qt in self.query_tokens:
            if qt.action not in ("insert", "annotate"):
                raise SpecError(
                    f"onegen.json: query token {qt.token!r} has action {qt.action!r}; "
                    "expected 'insert' or 'annotate'"
                )
            if qt.follow_up is not None and qt.action != "annotate":
                raise SpecError(f"onegen.json: 'follow_up' is only meaningful for annotate tokens ({qt.token!r})")
        names = self.special_tokens
        if len(set(names)) != len(names):
            raise SpecError(f"onegen.json: special tokens must be distinct, got {names}")
        if any(not n for n in names):
            raise SpecError("onegen.json: special token names must be non-empty")
        for name, tpl, fields in (
            ("document_template", self.document_template, {"text", "title"}),
            ("passage_template", self.passage_template, {"text", "title"}),
            ("query_template", self.query_template, {"query"}),
        ):
            _check_template(name, tpl, fields)
        if self.prompt_template is not None:
            _check_template("prompt_template", self.prompt_template, {"prompt"})
        if self.prompt_format not in QUERY_FORMATS:
            raise SpecError(f"onegen.json: prompt_format {self.prompt_format!r} is not one of {list(QUERY_FORMATS)}")
        if self.query_format not in QUERY_FORMATS:
            raise SpecError(f"onegen.json: query_format {self.query_format!r} is not one of {list(QUERY_FORMATS)}")
        if self.retrieval.k < 1 or self.retrieval.max_retrievals < 0:
            raise SpecError("onegen.json: retrieval.k must be >= 1 and retrieval.max_retrievals >= 0")

    # ------------------------------------------------------------------ names
    @property
    def special_tokens(self) -> list[str]:
        """Every special token the spec names, in a stable order (the order training adds them)."""
        names = [qt.token for qt in self.query_tokens] + [self.document_token, self.passage_open, self.passage_close]
        names += [qt.follow_up for qt in self.query_tokens if qt.follow_up]
        names += [t for t in self.extra_tokens if t not in names]
        return names

    def token_descriptions(self) -> dict[str, str]:
        """Natural-language description per special token (training initialises new rows from them)."""
        out = {qt.token: qt.description for qt in self.query_tokens}
        out[self.document_token] = self.document_token_description
        out[self.passage_open] = "start of a retrieved passage"
        out[self.passage_close] = "end of a retrieved passage"
        for qt in self.query_tokens:
            if qt.follow_up:
                out[qt.follow_up] = "continue generating"
        for t in self.extra_tokens:
            out.setdefault(t, t.strip("[]<>_").replace("_", " ").lower() or t)
        return out

    def query_token(self, name: str) -> QueryToken:
        for qt in self.query_tokens:
            if qt.token == name:
                return qt
        raise SpecError(f"unknown query token {name!r}; this checkpoint's are {[q.token for q in self.query_tokens]}")

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["query_tokens"] = [asdict(q) for q in self.query_tokens]
        d["extra_tokens"] = list(self.extra_tokens)
        for name, default in ADDED_FIELDS.items():  # written only when set, so older files stay byte-identical
            if d[name] == default:
                del d[name]
        return {"format_version": SPEC_FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = SPEC_FILENAME) -> OneGenSpec:
        if not isinstance(data, dict):
            raise SpecError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format_version", SPEC_FORMAT_VERSION)
        if version != SPEC_FORMAT_VERSION:
            raise SpecError(f"{source}: format_version {version} is not supported (expected {SPEC_FORMAT_VERSION})")
        base = OneGenSpec()
        if "preset" in data and data["preset"] is not None:
            preset_name = data["preset"]
            if preset_name not in PRESETS:
                raise SpecError(f"{source}: unknown preset {preset_name!r}; known presets: {sorted(PRESETS)}")
            base = PRESETS[preset_name]
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        try:
            for key, value in data.items():
                if key == "query_tokens":
                    if not isinstance(value, list):
                        raise SpecError(f"{source}: 'query_tokens' must be a list")
                    qts = []
                    for i, q in enumerate(value):
                        if isinstance(q, str):
                            q = {"token": q}
                        if not isinstance(q, dict) or "token" not in q:
                            raise SpecError(f"{source}: query_tokens[{i}] must be an object with a 'token' field")
                        extra = set(q) - set(QueryToken.__dataclass_fields__)
                        if extra:
                            raise SpecError(f"{source}: query_tokens[{i}] has unknown field(s) {sorted(extra)}")
                        qts.append(QueryToken(**q))
                    kwargs[key] = tuple(qts)
                elif key == "retrieval":
                    if not isinstance(value, dict):
                        raise SpecError(f"{source}: 'retrieval' must be an object")
                    extra = set(value) - set(RetrievalDefaults.__dataclass_fields__)
                    if extra:
                        raise SpecError(f"{source}: retrieval has unknown field(s) {sorted(extra)}")
                    kwargs[key] = RetrievalDefaults(**value)
                elif key == "extra_tokens":
                    kwargs[key] = tuple(value)
                elif key == "add_bos":
                    if not isinstance(value, bool):
                        raise SpecError(f"{source}: 'add_bos' must be true or false")
                    kwargs[key] = value
                else:
                    if value is not None and not isinstance(value, str):
                        raise SpecError(f"{source}: {key!r} must be a string, got {type(value).__name__}")
                    kwargs[key] = value
            return replace(base, **kwargs)
        except TypeError as e:  # wrong types inside nested objects
            raise SpecError(f"{source}: {e}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / SPEC_FILENAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> OneGenSpec:
        path = Path(directory) / SPEC_FILENAME
        if not path.is_file():
            raise SpecError(
                f"{path} not found: a OneGen checkpoint needs an onegen.json naming its special tokens "
                f"(write one, or start from a preset: {sorted(PRESETS)})"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
        return cls.from_dict(data, source=str(path))


def _check_template(name: str, template: str, allowed: set[str]) -> None:
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise SpecError(f"onegen.json: {name} {template!r} is not a valid template: {e}") from None
    bad = fields - allowed
    if bad:
        raise SpecError(f"onegen.json: {name} uses unknown field(s) {sorted(bad)}; allowed: {sorted(allowed)}")


# Presets for OneGen's released checkpoints (token names from the paper's repository).
PRESETS: dict[str, OneGenSpec] = {
    "default": OneGenSpec(preset="default"),
    "multi-hop": OneGenSpec(
        query_tokens=(QueryToken("[Question Representation]", "insert"),),
        document_token="[Document Fragment Representation]",
        passage_open="<paragraph>",
        passage_close="</paragraph>",
        retrieval=RetrievalDefaults(k=1, max_retrievals=4),
        preset="multi-hop",
    ),

    "entity-linking": OneGenSpec(
        query_tokens=(
            QueryToken("[LK]", "annotate", follow_up="[_CONTINUE_]", description="link the preceding mention"),
        ),
        document_token="[SE]",
        document_token_description="representation of the preceding entity description",
        passage_open="<paragraph>",
        passage_close="</paragraph>",
        retrieval=RetrievalDefaults(k=1, max_retrievals=64),
        preset="entity-linking",
    ),
}
# Self-RAG's checkpoints use multi-hop's tokens with one retrieval per request.
PRESETS["self-rag"] = replace(PRESETS["multi-hop"], retrieval=RetrievalDefaults(k=1, max_retrievals=1), preset="self-rag")


def preset(name: str) -> OneGenSpec:
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]
