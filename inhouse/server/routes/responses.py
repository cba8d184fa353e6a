"""POST /v1/responses, GET and DELETE /v1/responses/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from inhouse.server.deps import AuthDep
from inhouse.server.protocol.responses import ResponsesRequest

router = APIRouter(dependencies=[AuthDep])


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    service = request.app.state.responses
    subject = request.headers.get("x-subject-id") or body.user
    key = getattr(request.state, "api_key", None)
    key_id = key.id if key is not None else None
    if body.stream:
        events = await service.stream(body, subject, key_id)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await service.create(body, subject, key_id))


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    return JSONResponse(await request.app.state.responses.get(response_id))


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    return JSONResponse(await request.app.state.responses.delete(response_id))
