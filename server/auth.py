"""Optional Bearer API key (``--api-key``): checked before any work, and declared on the routes.

``middleware.ApiKeyGate`` checks the key from the request headers before the body is
read or parsed, so an unauthenticated client gets its 401 without the server buffering
its body or validating its JSON. Every path needs the key except ``/health/*``, the
playground's static files (``/``, ``/playground`` and its ``.js`` / ``.css``: no data in
them; the page sends the key on its API calls), ``/metrics`` with ``--no-metrics-auth``
and the API docs (``/docs``, ``/redoc``, ``/openapi.json``) with ``--public-docs``. The routes also depend on ``require_api_key``,
which checks the same key again from the parsed header, so that the OpenAPI schema
documents the Bearer scheme. Without a configured key every request passes.
"""

from __future__ import annotations

import hmac

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import APIError
from .state import ServerState, get_state

bearer = HTTPBearer(auto_error=False, description="the server's API key (only when started with --api-key)")
MISSING_KEY = "missing or invalid API key: send 'Authorization: Bearer <key>'"
WRONG_KEY = "invalid API key"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def key_problem(given: str | None, key: str | None) -> str | None:
    """Why ``given`` does not authenticate against ``key`` (a 401 message), or None when it does."""
    if key is None:
        return None
    if given is None:
        return MISSING_KEY
    return None if hmac.compare_digest(given.encode(), key.encode()) else WRONG_KEY


def check_key(state: ServerState, credentials: HTTPAuthorizationCredentials | None) -> None:
    problem = key_problem(credentials.credentials if credentials else None, state.settings.api_key_value())
    if problem is not None:
        state.metrics.on_rejected("unauthorized")
        raise APIError(401, problem, type="authentication_error", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer), state: ServerState = Depends(get_state)
) -> None:
    check_key(state, credentials)


async def require_api_key_for_metrics(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    state: ServerState = Depends(get_state),
) -> None:
    if state.settings.metrics_auth:
        check_key(state, credentials)
