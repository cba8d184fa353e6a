"""Two ASGI middlewares, outside everything else so that nothing escapes them:

- `Observe`: a request id, a log line, and the metrics of every response, the 500s of unhandled
  errors included (they are produced outside FastAPI's `http` middlewares, which never saw them).
- `BodyGuard`: the body limit counted on the bytes actually read (a chunked upload has no
  Content-Length to trust), and lone UTF-16 surrogates (`"\\ud800"`, valid JSON that no encoder
  can write) refused with a 400 naming the parameter, before any handler sees the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inhouse.server.errors import APIError
from inhouse.server.metrics import Metrics

log = logging.getLogger("inhouse.server")

# a \uD800-\uDFFF escape in JSON text (only an escape can carry one: raw UTF-8 cannot)
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class Observe:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or f"http_{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                rid_now = scope["state"].get("request_id", rid)
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", rid_now.encode("latin-1", "replace"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - t0
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.duration.labels(endpoint).observe(elapsed)
            log.info("%s %s %s -> %d in %.1f ms", scope["state"].get("request_id", rid),
                     scope.get("method"), endpoint, status["code"], elapsed * 1000)


class BodyGuard:
    def __init__(self, app: ASGIApp, max_bytes: int, log_bodies: bool = False) -> None:
        self.app, self.max_bytes, self.log_bodies = app, max_bytes, log_bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send, self._too_large(int(length)))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, self._too_large(size, read=True))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if SURROGATE_ESCAPE.search(body):
            where = await asyncio.to_thread(_lone_surrogate, body)
            if where is not None:
                error = APIError(400, f"'{where}' holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                                      "without its pair), which is not text", param=where,
                                 code="invalid_unicode")
                return await error.response()(scope, receive, send)
        if self.log_bodies:
            log.warning("body %s: %s", scope["state"].get("request_id"), body[:4096])
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    def _too_large(self, size: int, read: bool = False) -> APIError:
        what = f"more than {self.max_bytes} bytes were sent" if read else f"{size} bytes"
        return APIError(413, f"the request body ({what}) exceeds the limit of {self.max_bytes} "
                             "bytes", code="request_too_large")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
        response = error.response()
        response.headers["connection"] = "close"  # the rest of the upload is not read
        await response(scope, receive, send)


def _lone_surrogate(body: bytes) -> str | None:
    """The parameter path of the first string (or key) holding a lone surrogate, if any."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the handler's parser answers it

    def walk(x, path: str) -> str | None:
        if isinstance(x, str):
            return (path or "body") if _bad(x) else None
        if isinstance(x, list):
            return next((p for i, v in enumerate(x) if (p := walk(v, f"{path}[{i}]"))), None)
        if isinstance(x, dict):
            for k, v in x.items():
                if _bad(k):
                    return path or "body"
                if found := walk(v, f"{path}.{k}" if path else k):
                    return found
        return None

    return walk(doc, "")


def _bad(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
