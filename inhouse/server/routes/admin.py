"""API keys over HTTP, for `admin` keys (the console's Keys page; `inhouse keys` on the host)."""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from inhouse.governance.keys import ApiKey, KeyError_
from inhouse.server.deps import require_role
from inhouse.server.errors import APIError

router = APIRouter(dependencies=[require_role("admin")])


def _shown(key: ApiKey) -> dict:
    """A key as listings show it: its prefix, never its digest or plaintext."""
    return {"object": "api_key"} | dataclasses.asdict(key)


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    role: str = "user"
    tenant: str | None = Field(default=None, max_length=200)
    subject: str | None = Field(default=None, max_length=200)
    on_behalf: bool = False
    rate_limit: int | None = None


@router.get("/v1/admin/keys")
async def list_keys(request: Request) -> dict:
    keys = await asyncio.to_thread(request.app.state.key_store.list)
    return {"object": "list", "data": [_shown(k) for k in keys]}


@router.post("/v1/admin/keys")
async def create_key(body: NewKey, request: Request) -> dict:
    """The plaintext key is in this answer and nowhere else, ever."""
    store = request.app.state.key_store
    try:
        key, plaintext = await asyncio.to_thread(
            store.create, body.name, body.role, body.rate_limit, body.tenant or None,
            body.subject or None, body.on_behalf)
    except KeyError_ as e:
        raise APIError(400, str(e), code="invalid_key_request") from None
    return _shown(key) | {"key": plaintext}


@router.delete("/v1/admin/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> dict:
    try:
        key = await asyncio.to_thread(request.app.state.key_store.revoke, key_id)
    except KeyError_ as e:
        raise APIError(404, str(e)) from None
    return _shown(key)
