"""The review page: `GET /` on the Serve application itself (same origin, same replicas).

A person checking the model (a radiologist, an engineer demoing a version) drops X-rays on the
page and reads the label, the probability against the threshold and the Grad-CAM overlay, beside
the model card; the page calls the same public routes as any client (``POST /explain``,
``GET /model``), so what it shows is what the API answers.

Everything the page needs ships in the package (``static/``): no CDN, no external font or
script, so it works on an air-gapped hospital network. A Content-Security-Policy holds the page to
its own origin, so nothing the page shows can send an upload elsewhere; uploads are answered and
forgotten (the application stores nothing), which the page says.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

# Asset name -> media type: the only files served (no path ever reaches the file system).
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}
HEADERS = {
    # Own origin only; images may be data: (the API's PNGs) and blob: (a local preview).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new version's page is never mixed with an old script
}


@functools.cache
def asset(name: str) -> bytes:
    """The bytes of one packaged asset (read once per process)."""
    return (resources.files("pneumonia.serving") / "static" / name).read_bytes()


def _response(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)


def add_page(api: FastAPI) -> FastAPI:
    """Add `GET /` (the page) and `GET /static/{name}` (its style and script) to ``api``."""

    # HEAD too: uptime checks and `curl -I` ask that way.
    @api.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        return _response("index.html")

    @api.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in ASSETS:
            raise StarletteHTTPException(404, f"no such page asset: {name}; the page has {', '.join(sorted(ASSETS))}")
        return _response(name)

    return api
