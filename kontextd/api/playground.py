"""The web playground: `GET /` serves a page that drives this server's own API from the browser (endpoints,
their OpenAPI fields, uploads, the queue's status stream, results and a local history).

The page and its assets are files inside the package (kontextd/playground/), served from here and nowhere
else: no CDN, no framework, nothing fetched from the internet. They are sent with a strict
Content-Security-Policy: scripts and styles from this origin only, no inline script, connections to this
origin only, images from it or from data:/blob: URLs (inline results with sync_mode, local previews of the
files chosen for upload). The page keeps the API key and its history in the browser's localStorage.
"""

from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

ASSET_PREFIX = "/playground"

# What may be served, and as what: every other name under /playground is a 404.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidated each time: a new kontextd's page never runs with an old one's script.
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return (resources.files("kontextd") / "playground" / name).read_bytes()


async def page() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


async def asset(name: str) -> Response:
    content_type = ASSETS.get(name)
    if content_type is None:
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    return Response(_read(name), media_type=content_type, headers=HEADERS)


def install(app: FastAPI) -> None:
    """GET / (the page) and GET /playground/{name} (its script, style sheet and icon), outside the API's
    OpenAPI document: they are a client of the API, not part of it."""
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False, response_class=Response)
    app.add_api_route(
        ASSET_PREFIX + "/{name}", asset, methods=["GET"], include_in_schema=False, response_class=Response
    )
