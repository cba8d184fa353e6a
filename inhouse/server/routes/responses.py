"""POST /v1/responses, GET and DELETE /v1/responses/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from inhouse.server.deps import AuthDep, caller_of
from inhouse.server.protocol.responses import ResponsesRequest
from inhouse.server.serving.common import unless_disconnected

router = APIRouter(dependencies=[AuthDep])


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    service = request.app.state.responses
    caller = caller_of(request, body.user)
    if body.stream:
        events = await service.stream(body, caller)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await unless_disconnected(request, service.create(body, caller)))


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    return JSONResponse(await request.app.state.responses.get(response_id, caller_of(request)))


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    return JSONResponse(await request.app.state.responses.delete(response_id, caller_of(request)))
