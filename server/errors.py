"""One error shape for every route (Contract 4): ``{"error": {"message", "type", "param", "code"}}``.

``code`` is the HTTP status, as in vLLM; ``type`` says what went wrong in a word
(``invalid_request_error``, ``context_length_exceeded``, ``overloaded``, …) and ``param``
names the offending request field when there is one. The handlers registered by
``install_error_handlers`` turn FastAPI's validation errors and Starlette's 404/405 into
this shape; unexpected exceptions are answered by ``middleware.RequestContext``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """Raised by route code; rendered as the error shape with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.headers = headers


def error_payload(status: int, message: str, type: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def error_response(
    status: int, message: str, type: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_payload(status, message, type, param), status_code=status, headers=headers)


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "invalid_request_error",
    429: "overloaded",
    503: "service_unavailable",
}

# Documented on every route so that the OpenAPI schema matches what is really sent.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": desc}
    for status, desc in {
        400: "the body could not be read (e.g. not UTF-8)",
        401: "missing or wrong API key",
        413: "request body too large",
        422: "invalid request: the field is named in error.param",
        429: "overloaded: retry after the Retry-After header's seconds",
        500: "internal error",
        503: "loading, draining, or the engine stopped",
    }.items()
}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "stop", "list[constrained-str]", 0)`` -> ``"stop[0]"``: drop pydantic's union-member tags."""
    out = ""
    for p in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and p.isidentifier() and p not in _TYPE_TAGS:
            out += f".{p}" if out else p
    return out or None


def _fit(e: dict[str, Any]) -> tuple[int, bool]:
    """How far a union member got: its location's depth, then whether the value had the member's type.

    For ``stop`` (a string or a list of strings) given 17 strings, the str member fails on the type
    ("Input should be a valid string") and the list member on its length; both at the same depth —
    the list member's complaint (too many items, and the limit) is the one that explains it.
    """
    wrong_type = str(e.get("type", "")).endswith("_type") or e.get("type") == "none_required"
    return len(e.get("loc", ())), not wrong_type


def _best_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per field; for a union, the member that got furthest (``_fit``)."""
    best: dict[str, dict[str, Any]] = {}
    for e in errors:
        root = (_loc_to_param(e.get("loc", ())) or "").split(".")[0].split("[")[0]
        if root not in best or _fit(e) > _fit(best[root]):
            best[root] = e
    return list(best.values())


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _best_errors(list(exc.errors())) or [{"loc": (), "msg": "invalid request", "type": ""}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_response(422, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                              "invalid_request_error", None)
    param = _loc_to_param(first.get("loc", ()))
    msg = first.get("msg", "invalid request")
    ctx = first.get("ctx") or {}
    if first.get("type") == "too_long" and "max_length" in ctx:  # pydantic says "... after validation, not 17"
        given = ctx.get("actual_length", "more than the limit")
        msg = f"the list is too long: {given} items, at most {ctx['max_length']}"
    message = f"{param}: {msg}" if param else msg
    others = [p for e in errors[1:] if (p := _loc_to_param(e.get("loc", ())))]
    if others:
        message += f" (also invalid: {', '.join(others)})"
    return error_response(422, message, "invalid_request_error", param)


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    return error_response(
        status, str(exc.detail), _STATUS_TYPES.get(status, "error"), None, getattr(exc, "headers", None)
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
