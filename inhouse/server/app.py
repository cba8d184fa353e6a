"""`build_app(client, settings)`: the FastAPI application. No module-level state."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import FastAPI, Request

from inhouse import __version__
from inhouse.config import ServerSettings
from inhouse.engine import EngineClient
from inhouse.config import cache_root
from inhouse.governance.keys import KeyStore
from inhouse.server.deps import RateLimiter, key_digest
from inhouse.server.store import default_url
from inhouse.governance.audit_log import AuditLog
from inhouse.server.audit import Auditor, open_audit_log
from inhouse.server.errors import APIError, install_handlers
from inhouse.server.metrics import Metrics
from inhouse.server.routes import audit, chat, responses, system
from inhouse.server.serving.chat import ChatCompletions
from inhouse.server.serving.responses import Responses
from inhouse.server.store import ResponseStore

log = logging.getLogger("inhouse.server")


def build_app(client: EngineClient, settings: ServerSettings,
              store: ResponseStore | None = None, audit_log: AuditLog | None = None,
              key_store: KeyStore | None = None) -> FastAPI:
    """The app around an engine client. `store` keeps stored Responses (default: opens
    `settings.database_url`, a SQLite file in the cache when empty); `audit_log` receives one
    record per request when `settings.audit` (default: opens `settings.audit_database_url`)."""
    app = FastAPI(title="inhouse", version=__version__,
                  description="OpenAI-compatible API for self-hosted gpt-oss models.")
    app.state.started_at = int(time.time())
    app.state.client = client
    app.state.settings = settings
    app.state.key_digests = tuple(key_digest(k) for k in settings.api_keys)
    app.state.key_store = key_store if key_store is not None else KeyStore(
        settings.database_url or default_url(cache_root()))
    app.state.rate_limiter = RateLimiter()
    app.state.metrics = Metrics(client)
    if settings.audit and audit_log is None:
        audit_log = open_audit_log(settings)
    app.state.audit_log = audit_log if settings.audit else None
    auditor = Auditor(app.state.audit_log, settings)
    app.state.chat = ChatCompletions(client, settings, app.state.metrics, auditor)
    if store is None:
        store = ResponseStore(settings.database_url or default_url(cache_root()))
    app.state.responses = Responses(client, settings, app.state.metrics, store, auditor)
    install_handlers(app)
    if settings.log_bodies:
        log.warning("REQUEST BODY LOGGING IS ON: prompts and answers are written to the log")

    @app.middleware("http")
    async def observe(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or f"http_{uuid.uuid4().hex[:16]}"
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            return APIError(413, f"request body of {length} bytes exceeds the limit of "
                                 f"{settings.max_body_bytes}").response()
        if settings.log_bodies and request.method == "POST":
            log.warning("body %s: %s", request.state.request_id, (await request.body())[:4096])
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        app.state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        log.info("%s %s %s -> %d in %.1f ms (%s bytes in)", request.state.request_id,
                 request.method, endpoint, response.status_code,
                 (time.perf_counter() - t0) * 1000, length or 0)
        response.headers["x-request-id"] = request.state.request_id
        return response

    app.include_router(system.router)
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(audit.router)
    return app
