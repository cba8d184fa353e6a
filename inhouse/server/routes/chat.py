"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from inhouse.server.deps import AuthDep, caller_of
from inhouse.server.protocol.chat import ChatCompletionRequest
from inhouse.server.serving.common import new_id, unless_disconnected

router = APIRouter(dependencies=[AuthDep])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service = request.app.state.chat
    request_id = new_id("chatcmpl")
    request.state.request_id = request_id
    caller = caller_of(request, body.user)
    if body.stream:
        events = await service.stream(body, request_id, caller)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await unless_disconnected(request, service.create(body, request_id, caller)))
