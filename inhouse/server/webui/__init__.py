"""The web UI: static files served by the server itself (no CDN, no build step, nothing fetched
from outside), under a strict Content-Security-Policy: scripts, styles and connections to this
origin only, no inline script, no framing."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "font-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cross-Origin-Opener-Policy": "same-origin"}


def page() -> Response:
    """The single page (sign-in, chat, console): never cached, so an upgrade is seen at once."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                        headers=HEADERS | {"Cache-Control": "no-store"})


class UIFiles(StaticFiles):
    """The page's scripts and styles, with the same headers."""

    def __init__(self) -> None:
        super().__init__(directory=STATIC)

    def file_response(self, full_path, stat_result, scope: Scope, status_code: int = 200):
        r = super().file_response(full_path, stat_result, scope, status_code)
        r.headers.update(HEADERS | {"Cache-Control": "no-cache"})
        return r
