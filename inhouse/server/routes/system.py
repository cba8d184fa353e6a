"""Liveness, readiness, metrics and the model list."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from inhouse.server.deps import AuthDep, ClientDep, MetricsDep, SettingsDep, require_api_key
from inhouse.server.errors import APIError
from inhouse.server.serving.common import model_ids

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(settings: SettingsDep, client: ClientDep) -> dict:
    return {"status": "ready", "model": settings.model_name, "demo": settings.is_demo,
            "context_window": client.model_config.max_position_embeddings}


@router.get("/metrics")
async def metrics(request: Request, m: MetricsDep, settings: SettingsDep) -> Response:
    if settings.metrics_require_key:
        if require_api_key(request) is None:  # no keys exist: nobody could ever pass
            raise APIError(403, "/metrics needs an API key, and this server has none",
                           "permission_error")
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(request: Request, settings, model_id: str) -> dict:
    card = {"id": model_id, "object": "model", "created": request.app.state.started_at,
            "owned_by": "inhouse"}
    if settings.is_demo or settings.model_label:
        card["description"] = settings.model_label
    card["demo"] = settings.is_demo
    base, _, adapter = model_id.partition(":")
    if adapter:  # a LoRA adapter on the base model, named by the digest of its files
        card |= {"parent": base, "root": base, "adapter_digest": dict(settings.adapters)[adapter]}
    return card


@router.get("/v1/models", dependencies=[AuthDep])
async def list_models(request: Request, settings: SettingsDep) -> dict:
    return {"object": "list", "data": [_model_card(request, settings, m) for m in model_ids(settings)]}


@router.get("/v1/models/{model_id:path}", dependencies=[AuthDep])
async def get_model(model_id: str, request: Request, settings: SettingsDep) -> dict:
    if model_id not in model_ids(settings):
        raise APIError(404, f"the model '{model_id}' does not exist", param="model",
                       code="model_not_found")
    return _model_card(request, settings, model_id)
