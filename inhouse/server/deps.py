"""Dependencies as `Annotated` aliases; everything lives on `app.state`, nothing in globals."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from inhouse.config import ServerSettings
from inhouse.engine import EngineClient
from inhouse.server.errors import APIError
from inhouse.server.metrics import Metrics


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def _client(request: Request) -> EngineClient:
    return request.app.state.client


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def require_api_key(request: Request) -> None:
    """When the server has API keys, every /v1 request needs `Authorization: Bearer <key>`."""
    digests: tuple[bytes, ...] = request.app.state.key_digests
    if not digests:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       "authentication_error", code="invalid_api_key")
    given = key_digest(key.strip())
    if not any(hmac.compare_digest(given, d) for d in digests):
        raise APIError(401, "incorrect API key provided", "authentication_error",
                       code="invalid_api_key")


SettingsDep = Annotated[ServerSettings, Depends(_settings)]
ClientDep = Annotated[EngineClient, Depends(_client)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
AuthDep = Depends(require_api_key)
