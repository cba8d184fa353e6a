"""POST /v1/moderations."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from inhouse.server.deps import AuthDep, caller_of
from inhouse.server.protocol.moderations import ModerationRequest

router = APIRouter(dependencies=[AuthDep])


@router.post("/v1/moderations")
async def create_moderation(body: ModerationRequest, request: Request):
    return JSONResponse(await request.app.state.moderations.create(body, caller_of(request)))
