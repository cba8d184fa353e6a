"""Dependencies as `Annotated` aliases; everything lives on `app.state`, nothing in globals."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from inhouse.config import ServerSettings
from inhouse.engine import EngineClient
from inhouse.governance.keys import ApiKey
from inhouse.governance.tenancy import Caller, KeyGrant, resolve_caller
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


# `--api-key` keys: admins of the whole server (every tenant; may name any subject)
STATIC_KEY = ApiKey("static", "--api-key", "admin", "", None, 0.0, None, "default", None, True)


def caller_of(request: Request, body_user: str | None = None) -> Caller:
    """The caller of a request that passed `require_api_key`: its key's tenant, and the subject
    the key is bound to or (if allowed) the one `X-Subject-Id` or the body's `user` names."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    header = request.headers.get("x-subject-id")
    claimed, param = (header, "X-Subject-Id") if header else (body_user, "user")
    grant: KeyGrant | None = key.grant() if key is not None else None
    return resolve_caller(grant, claimed, param)


def require_api_key(request: Request) -> ApiKey | None:
    """When the server has API keys (`--api-key`, or any active key in the key store), every /v1
    request needs `Authorization: Bearer <key>`; per-key rate limits answer 429 + Retry-After."""
    digests: tuple[bytes, ...] = request.app.state.key_digests
    store = request.app.state.key_store
    if not digests and (store is None or not store.any_active()):
        request.state.api_key = None
        return None
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       "authentication_error", code="invalid_api_key")
    key = key.strip()
    found = STATIC_KEY if any(hmac.compare_digest(key_digest(key), d) for d in digests) else None
    if found is None and store is not None:
        found = store.authenticate(key)
    if found is None:
        raise APIError(401, "incorrect or revoked API key", "authentication_error",
                       code="invalid_api_key")
    if found.rate_limit:
        wait = request.app.state.rate_limiter.hit(found.id, found.rate_limit)
        if wait:
            raise APIError(429, f"rate limit of {found.rate_limit} requests per minute reached "
                                f"for key {found.id}", "rate_limit_error", code="rate_limited",
                           headers={"Retry-After": str(wait)})
    request.state.api_key = found
    return found


def require_role(role: str):
    def check(request: Request, key: ApiKey | None = Depends(require_api_key)) -> None:
        if key is None:
            raise APIError(403, f"this endpoint needs an API key with the '{role}' role; create "
                                "one with `inhouse keys create`", "permission_error")
        if not key.allows(role):
            raise APIError(403, f"key {key.id} has the '{key.role}' role; this endpoint needs "
                                f"'{role}'", "permission_error")
    return Depends(check)


SettingsDep = Annotated[ServerSettings, Depends(_settings)]
ClientDep = Annotated[EngineClient, Depends(_client)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
AuthDep = Depends(require_api_key)
AuditorDep = require_role("auditor")
