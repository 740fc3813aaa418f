"""The playground: a page served by the server itself that shows one-pass retrieval as it happens.

``GET /playground`` answers ``index.html``; ``playground.js`` and ``playground.css`` sit next to
it in this package (plain files, no build step, nothing fetched from elsewhere: the
Content-Security-Policy sent with them allows this origin only). ``GET /`` redirects to the page.

The page's files hold no data, so they load without the API key (``PUBLIC_PATHS``, the only
paths ``app.public_paths`` adds for it); everything the page shows comes from the API routes
(``/info``, ``/generate`` streamed, ``/retrieve``), which it calls with the key the user types,
kept in the browser. So that a page opened on a keyed server can ask for the key before its
first call (instead of logging a 401 in the console), the served HTML says whether the server
wants one: the ``onegen-api-key`` meta tag reads ``required`` or ``optional``, a fact any 401
tells anyway. The routes are left out of the OpenAPI schema: they are not part of the API.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import RedirectResponse, Response

from ..state import ServerState, get_state

PAGE_PATH = "/playground"
# file name -> media type; the only files served (a fixed list: no path from the request reaches the disk)
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
PUBLIC_PATHS = frozenset({"/", PAGE_PATH, *(f"{PAGE_PATH}/{name}" for name in ASSETS)})
AUTH_META_OPTIONAL = '<meta name="onegen-api-key" content="optional">'
AUTH_META_REQUIRED = '<meta name="onegen-api-key" content="required">'
# Same origin only: no script, style, font or connection elsewhere; data: for the (empty) favicon.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def asset(name: str) -> str:
    """The text of one of the page's files, read from the installed package once."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def page_html(auth_required: bool) -> str:
    html = asset("index.html")
    if AUTH_META_OPTIONAL not in html:
        raise RuntimeError(f"server/playground/index.html lost its {AUTH_META_OPTIONAL} tag")
    return html.replace(AUTH_META_OPTIONAL, AUTH_META_REQUIRED) if auth_required else html


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse(PAGE_PATH, status_code=307)


@router.get(PAGE_PATH)
async def page(state: ServerState = Depends(get_state)) -> Response:
    required = state.settings.api_key_value() is not None
    return Response(page_html(required), media_type="text/html; charset=utf-8", headers=HEADERS)


def _asset_route(name: str, media_type: str) -> None:
    async def serve() -> Response:
        return Response(asset(name), media_type=media_type, headers=HEADERS)

    router.add_api_route(f"{PAGE_PATH}/{name}", serve, methods=["GET"], name=f"playground_{name}")


for _name, _media_type in ASSETS.items():
    _asset_route(_name, _media_type)
