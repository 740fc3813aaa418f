"""Server settings: one pydantic-settings model, every field a ``--flag`` and an ``ONEGEN_*`` variable.

Precedence: command-line flag > environment variable (``ONEGEN_PORT=8080``) > default.
The command line is generated from the fields (``--max-num-seqs`` for ``max_num_seqs``),
so a setting added here is reachable both ways with the same help text.

``--index`` is repeatable: ``--index PATH`` serves the index named ``default``, ``--index NAME=PATH``
one named NAME (``parse_index_specs``). Its variable takes one such value, or a JSON list of them:
``ONEGEN_INDEX='["wiki=/data/wiki", "news=/data/news"]'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "ONEGEN_"
DEFAULT_INDEX = "default"  # onegen_core.retrieval.registry's name for a bare index directory (not imported: torch)
INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def parse_index_specs(value: Any) -> dict[str, Path]:
    """``--index`` values -> {name: directory}, in the order given (the first is the default when none is
    named ``default``). A value is ``NAME=PATH`` when the text before its first ``=`` is a name (letters,
    digits, ``_.-``, at most 64), else a bare PATH, named ``default`` (write ``default=a=b`` for a directory
    called ``a=b``). Takes a value, a list of them, a JSON list (the environment variable) or a mapping.
    Raises ``ValueError`` naming the value."""
    if value is None or value == "":
        return {}
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON list of [NAME=]PATH values: {e.msg} at character {e.pos}") from None
    if isinstance(value, str | os.PathLike):
        value = [value]
    items = list(value.items()) if isinstance(value, dict) else [_index_spec(v) for v in value]
    out: dict[str, Path] = {}
    for name, path in items:
        if not isinstance(name, str) or not INDEX_NAME.fullmatch(name):
            raise ValueError(f"index name {name!r}: use letters, digits, '_', '.' or '-' (at most 64, the first "
                             "a letter or digit)")
        if name in out:
            raise ValueError(f"index name {name!r} is given twice ({out[name]} and {path})")
        out[name] = Path(path)
    return out


def _index_spec(value: Any) -> tuple[str, str | os.PathLike]:
    if isinstance(value, os.PathLike):
        return DEFAULT_INDEX, value
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected [NAME=]PATH, got {value!r}")
    name, sep, path = value.partition("=")
    if sep and INDEX_NAME.fullmatch(name):
        if not path:
            raise ValueError(f"{value!r}: no directory after '{name}='")
        return name, path
    return DEFAULT_INDEX, value


def _engine_fields() -> dict[str, Any]:
    """``EngineConfig``'s fields as pydantic fields: same names, defaults, help and bounds (declared once, there)."""
    from onegen_core.engine.engine_config import EngineConfig

    hints = typing.get_type_hints(EngineConfig)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(EngineConfig):
        m = f.metadata
        annotation = hints[f.name]
        if m.get("choices"):
            annotation = Literal[m["choices"]]  # type: ignore[valid-type]
        bounds = {k: m[k] for k in ("ge", "gt", "le") if m.get(k) is not None}
        out[f.name] = (annotation, Field(f.default, description=m["help"], **bounds))
    return out


# The engine's settings, declared by onegen_core.engine.EngineConfig; the server adds its own below.
EngineSettings = create_model("EngineSettings", __base__=BaseSettings, **_engine_fields())


class ServerSettings(EngineSettings):
    """Everything ``python -m server`` can be told: the engine's settings (``EngineConfig``) and the server's."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    # ---------------------------------------------------------------- model and index
    checkpoint: Path | None = Field(
        None, description="OneGen checkpoint directory (Hugging Face model dir + onegen.json); omit to serve the "
        "embedded default model (SmolLM2-135M + the OneGen adapter over a Wikipedia sample), prepared on first start "
        "under $ONEGEN_DEFAULT_ROOT (default: .cache/onegen-default)"
    )
    index: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict, json_schema_extra={"repeatable": True},
        description="index directory built with this checkpoint: PATH (the index named 'default') or NAME=PATH, "
        "repeatable for several named indexes, which requests choose with retrieval.index (/retrieve: index); "
        "the default is 'default', else the first given. The variable takes one value or a JSON list of them "
        "(default: none, no retrieval)",
    )
    index_poll_s: float = Field(
        1.0, ge=0, le=3600, description="seconds between two looks at each index directory's current version "
        "(its CURRENT file); a new version is loaded aside and swapped in without downtime, a bad one refused "
        "(logged, counted) while the old keeps serving. 0: only on POST /admin/reload"
    )
    served_model_name: str | None = Field(
        None, description="model name reported by /info and the OpenAI routes (default: checkpoint dir name)"
    )

    # ---------------------------------------------------------------- HTTP
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 for all interfaces, as in the container)")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    api_key: SecretStr | None = Field(
        None, description="require 'Authorization: Bearer KEY' on every route except /health/* (checked before the "
        "body is read; see --no-metrics-auth and --public-docs)"
    )
    metrics_auth: bool = Field(True, description="with --api-key, require the key on /metrics too")
    public_docs: bool = Field(
        False, description="with --api-key, serve /docs, /redoc and /openapi.json without the key too"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="close a connection whose request line and headers are not complete this "
        "many seconds after it opened or after the first byte of its next request (slow-header clients)"
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, le=3600, description="seconds an idle keep-alive connection stays open between requests"
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024 * 1024, description="largest request line + headers accepted (else 400, closed)"
    )
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="largest request body accepted (else 413)")
    max_pending_requests: int = Field(
        256, ge=1, description="requests admitted at once (running + waiting); beyond it: 429 with Retry-After"
    )
    retry_after_s: int = Field(
        1, ge=1, le=3600, description="Retry-After seconds sent with a 429 (overloaded) and a 503 (loading, draining: "
        "refused before any work, so a load balancer may send it to another replica)"
    )
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of /generate and chat when not given")
    max_retrieve_batch: int = Field(64, ge=1, description="most queries in one /retrieve request")
    max_retrieve_k: int = Field(100, ge=1, description="largest k of /retrieve and retrieval options")
    max_prompts_per_request: int = Field(16, ge=1, description="most prompts in one /v1/completions request")

    # ---------------------------------------------------------------- operations
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may run before they are aborted"
    )
    stall_timeout_s: float = Field(
        60.0, gt=0, description="/health/ready fails when the engine loop has made no progress for this long"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["json", "text"] = Field("json", description="structured JSON lines or plain text")
    log_prompts: bool = Field(False, description="include prompts and outputs in the logs (off: never logged)")

    @field_validator("index", mode="before")
    @classmethod
    def _index(cls, value: Any) -> dict[str, Path]:
        return parse_index_specs(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from onegen_core.engine.engine_config import check_device

        return check_device(value)

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            self.default_max_tokens = self.max_tokens_limit
        return self

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.checkpoint is None:
            raise ValueError("no checkpoint: the default model's settings come from server.prepare_default.serve_default")
        return self.checkpoint.resolve().name

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    def engine_config(self) -> Any:
        """The ``EngineConfig`` these settings describe."""
        from onegen_core.engine.engine_config import EngineConfig

        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})


# ---------------------------------------------------------------------------- CLI


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int, ``SecretStr`` -> str, ``Literal[...]`` stays."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0]
    if annotation is SecretStr:
        return str
    return annotation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="OneGen HTTP server: one model that generates and retrieves in one pass. "
        f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG_NAME> "
        f"(e.g. {ENV_PREFIX}MAX_NUM_SEQS=32); flags win over the environment.",
    )
    fields = ServerSettings.model_fields
    first = ("checkpoint", "index", "served_model_name")  # what to serve, then how (engine, then HTTP)
    for name in [*first, *(n for n in fields if n not in first)]:
        field = fields[name]
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        help_text = f"{field.description} [env {env}]"
        # A default of None means "not set" (its description says what happens then, often "(default: ...)").
        if not field.is_required() and field.default is not None and "(default" not in (field.description or ""):
            help_text += f" (default: {field.default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        typ = _base_type(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if (field.json_schema_extra or {}).get("repeatable"):
            parser.add_argument(flag, action="append", metavar="[NAME=]PATH", **kwargs)
        elif typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(typ) is Literal:
            parser.add_argument(flag, choices=list(typing.get_args(typ)), **kwargs)
        else:
            parser.add_argument(flag, type=str, metavar=name.upper(), **kwargs)
    return parser


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """Flags over environment over defaults; a bad value exits with the field named (argparse style)."""
    from pydantic import ValidationError

    parser = build_parser()
    given = vars(parser.parse_args(argv))
    try:
        return ServerSettings(**given)
    except ValidationError as e:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in e.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits
