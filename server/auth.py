"""Optional Bearer API key (``--api-key``), as a dependency so that OpenAPI documents it.

Every API route depends on ``require_api_key``; ``/health/*`` does not, and ``/metrics``
does unless ``--no-metrics-auth``. Without a configured key every request passes.
"""

from __future__ import annotations

import hmac

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import APIError
from .state import ServerState, get_state

bearer = HTTPBearer(auto_error=False, description="the server's API key (only when started with --api-key)")


def check_key(state: ServerState, credentials: HTTPAuthorizationCredentials | None) -> None:
    key = state.settings.api_key_value()
    if key is None:
        return
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        state.metrics.on_rejected("unauthorized")
        raise APIError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'" if credentials is None
            else "invalid API key",
            type="authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )


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
