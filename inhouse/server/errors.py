"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inhouse.errors import InhouseError
from inhouse.pipeline.governed import as_request_error


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(e: Exception) -> APIError:
    """Refusals from the layers below (pipeline, engine, harmony) in OpenAI's shape."""
    r = as_request_error(e)
    if r is None:
        return APIError(500, f"internal error ({type(e).__name__})", "server_error")
    headers = {"Retry-After": str(r.retry_after_s)} if r.retry_after_s else None
    return APIError(r.status, str(r), r.kind, param=r.param, code=r.code, headers=headers)


# Responses' tools are a union tagged by "type"; pydantic puts the tag in an error's location
# ("tools.0.function.parameters"), where OpenAI names the field ("tools[0].parameters"). Chat's
# tools have a real field "function", so the tag is dropped on the Responses path alone.
_RESPONSES_TOOL_TAGS = ("function", "code_interpreter", "web_search", "web_search_2025_08_26",
                        "web_search_preview", "web_search_preview_2025_03_11")


def _loc_param(loc: tuple, path: str = "") -> str | None:
    if (path == "/v1/responses" and len(loc) > 3 and loc[:2] == ("body", "tools")
            and loc[3] in _RESPONSES_TOOL_TAGS):
        loc = loc[:3] + loc[4:]
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(InhouseError)
    async def _refusal(request: Request, e: InhouseError):
        return from_engine_error(e).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        param = _loc_param(tuple(first.get("loc", ())), request.url.path)
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        msg = first.get("msg", "invalid request")
        where = f" at '{param}'" if param else ""
        return APIError(400, f"{msg}{where}", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = {401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error"}.get(e.status_code,
                                                                              "invalid_request_error")
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(
            e.status_code, str(e.detail))
        return APIError(e.status_code, msg, kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        import logging
        logging.getLogger("inhouse.server").exception("unhandled error on %s",
                                                      request.state.__dict__.get("request_id"))
        return APIError(500, f"internal error ({type(e).__name__})", "server_error").response()
