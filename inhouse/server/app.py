"""`build_app(client, settings)`: the FastAPI application. No module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from inhouse import __version__
from inhouse.config import ServerSettings, cache_root
from inhouse.engine import EngineClient
from inhouse.governance.audit_log import AuditLog
from inhouse.governance.conversations_store import ConversationStore
from inhouse.governance.keys import KeyStore
from inhouse.governance.rate_limits import SharedRateLimiter
from inhouse.governance.privacy import PersonalData
from inhouse.governance.responses_store import ResponseStore, default_url
from inhouse.pipeline import GovernedTurns
from inhouse.pipeline.guard import PolicyGuard
from inhouse.pipeline.tools import BuiltinTools
from inhouse.tools.documents import DocumentStore
from inhouse.tools.sandbox import SandboxLimits
from inhouse.pipeline.audit import Auditor, open_audit_log
from inhouse.server.deps import key_digest
from inhouse.server.errors import install_handlers
from inhouse.server.metrics import Metrics
from inhouse.server.middleware import BodyGuard, Observe
from inhouse.server.webui import UIFiles
from inhouse.server.routes import admin, audit, chat, moderations, responses, system, ui
from inhouse.server.serving.chat import ChatCompletions
from inhouse.server.serving.conversations import Conversations
from inhouse.server.serving.moderations import Moderations
from inhouse.server.serving.responses import Responses

log = logging.getLogger("inhouse.server")


def build_app(client: EngineClient, settings: ServerSettings,
              store: ResponseStore | None = None, audit_log: AuditLog | None = None,
              key_store: KeyStore | None = None, tools: BuiltinTools | None = None,
              guard: PolicyGuard | None = None) -> FastAPI:
    """The app around an engine client. `store` keeps stored Responses (default: opens
    `settings.database_url`, a SQLite file in the cache when empty); `audit_log` receives one
    record per request when `settings.audit` (default: opens `settings.audit_database_url`).
    Every entry point runs its turns through one `GovernedTurns` (inhouse.pipeline.governed)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        """Seal the audit log on a timer while serving, and once more at a clean shutdown
        (uvicorn turns SIGTERM and SIGINT into this)."""
        log_ = app.state.audit_log
        if log_ is not None:
            log_.start_sealing()
        try:
            yield
        finally:
            app.state.governed.shutdown()
            if log_ is not None:
                await asyncio.to_thread(log_.close)

    # /docs with its scripts served from here, not a CDN: it works air-gapped. No /redoc: ReDoc
    # fetches its logo from its CDN whatever it is given (seen in tests/test_webui.py)
    app = FastAPIOffline(title="inhouse", version=__version__, lifespan=lifespan,
                         static_url="/docs-static", redoc_url=None,
                         swagger_ui_parameters={"validatorUrl": None},
                         description="OpenAI-compatible API for self-hosted gpt-oss models.")
    app.state.started_at = int(time.time())
    app.state.client = client
    app.state.settings = settings
    app.state.key_digests = tuple(key_digest(k) for k in settings.api_keys)
    app.state.key_store = key_store if key_store is not None else KeyStore(
        settings.database_url or default_url(cache_root()))
    # counted in the keys' database: every API process on it counts the same requests
    app.state.rate_limiter = SharedRateLimiter(app.state.key_store.engine)
    app.state.metrics = Metrics(client)
    if settings.audit and audit_log is None:
        audit_log = open_audit_log(settings)
    app.state.audit_log = audit_log if settings.audit else None
    server_db = settings.database_url or default_url(cache_root())
    if store is None:
        store = ResponseStore(server_db)
    conversations = ConversationStore(server_db)
    app.state.conversations = Conversations(conversations, settings)
    data = (PersonalData(app.state.audit_log, store, conversations)
            if app.state.audit_log is not None else None)
    app.state.personal_data = data
    auditor = Auditor(app.state.audit_log, settings, data)
    if tools is None:  # the browser over the server database's documents; python when asked
        tools = BuiltinTools(DocumentStore(server_db),
                             SandboxLimits(wall_seconds=settings.python_timeout_s,
                                           memory_bytes=settings.python_memory_mib << 20),
                             max_calls=settings.max_tool_calls)
    app.state.governed = GovernedTurns(client, settings, auditor, app.state.metrics, store,
                                       tools, guard)
    app.state.moderations = Moderations(guard, auditor)
    app.state.chat = ChatCompletions(client, settings, app.state.governed)
    app.state.responses = Responses(client, settings, app.state.governed)
    install_handlers(app)
    if settings.log_bodies:
        log.warning("REQUEST BODY LOGGING IS ON: prompts and answers are written to the log")
    # added last = outermost: Observe sees every response, BodyGuard every body
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, log_bodies=settings.log_bodies)
    app.add_middleware(Observe, metrics=app.state.metrics)

    app.include_router(system.router)
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(audit.router)
    app.include_router(moderations.router)
    app.include_router(admin.router)
    app.include_router(ui.api)
    if settings.web_ui:
        app.include_router(ui.router)
        app.mount("/ui", UIFiles(), name="ui")
    return app
