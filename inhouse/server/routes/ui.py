"""The web UI: its page at `/`, its files under `/ui/`, who the signed-in key is, and its
conversations (each caller's own; another user's or tenant's are a 404)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from inhouse import __version__
from inhouse.server.deps import AuthDep, caller_of
from inhouse.server.protocol.ui import ConversationIn, ConversationPatch
from inhouse.server.serving.common import model_ids
from inhouse.server.webui import page

router = APIRouter()
api = APIRouter(dependencies=[AuthDep])


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return page()


@api.get("/v1/ui/me")
async def me(request: Request) -> dict:
    """The signed-in key as the page needs it: which pages to show, and what the server offers."""
    key = request.state.api_key
    caller = caller_of(request)
    settings = request.app.state.settings
    return {"object": "ui.session", "keys_required": key is not None,
            "key_id": key.id if key else None, "name": key.name if key else None,
            "role": key.role if key else "user", "tenant": caller.tenant,
            "subject": caller.subject,
            "server": {"version": __version__, "models": model_ids(settings),
                       "model_label": settings.model_label, "demo": settings.is_demo,
                       "builtin_tools": list(settings.builtin_tools),
                       "audit": request.app.state.audit_log is not None,
                       "pii_mode": settings.pii_mode}}


@api.get("/v1/ui/conversations")
async def list_conversations(request: Request) -> dict:
    return await request.app.state.conversations.list(caller_of(request))


@api.post("/v1/ui/conversations")
async def create_conversation(body: ConversationIn, request: Request) -> dict:
    return await request.app.state.conversations.create(body, caller_of(request))


@api.get("/v1/ui/conversations/{conv_id}")
async def get_conversation(conv_id: str, request: Request) -> dict:
    return await request.app.state.conversations.get(conv_id, caller_of(request))


@api.post("/v1/ui/conversations/{conv_id}")
async def update_conversation(conv_id: str, body: ConversationPatch, request: Request) -> dict:
    return await request.app.state.conversations.update(conv_id, body, caller_of(request))


@api.delete("/v1/ui/conversations/{conv_id}")
async def delete_conversation(conv_id: str, request: Request) -> dict:
    return await request.app.state.conversations.delete(conv_id, caller_of(request))
