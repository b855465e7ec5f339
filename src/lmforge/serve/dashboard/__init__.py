"""The web dashboard at `/dashboard`: a small bundled front end (HTML, CSS, one script).

The server sends only these static files; the page signs in with an admin key (kept in the
tab's sessionStorage, sent as a Bearer token) and reads everything it shows from the same admin
API the CLI's operations go through (`/v1/admin/...`) and the OpenAI routes (`/v1/models`, the
playground's streamed `/v1/chat/completions` and `/v1/completions`). Nothing is loaded from
another origin, and the Content-Security-Policy forbids it, inline scripts included; the script
puts every server-supplied string into the page as text, never as HTML.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

router = APIRouter()

_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _read(name: str) -> bytes:
    return (resources.files(__name__) / name).read_bytes()


@router.get("/dashboard", include_in_schema=False)
def index() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/dashboard/", include_in_schema=False)
def index_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    media = _FILES.get(name)
    if media is None:  # a fixed list: no path from the request reaches the file system
        return Response(status_code=404, headers=HEADERS)
    return Response(_read(name), media_type=media, headers=HEADERS)
