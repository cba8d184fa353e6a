"""POST /v1/responses, GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from inhouse.server.deps import AuthDep, caller_of
from inhouse.server.errors import APIError
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


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request):
    q = request.query_params
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        raise APIError(400, f"'limit' must be an integer, got {q.get('limit')!r}",
                       param="limit") from None
    include = q.getlist("include") + q.getlist("include[]")  # the openai client sends include[]
    return JSONResponse(await request.app.state.responses.input_items(
        response_id, caller_of(request), q.get("after"), limit, q.get("order", "desc"), include))


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    return JSONResponse(await request.app.state.responses.delete(response_id, caller_of(request)))
