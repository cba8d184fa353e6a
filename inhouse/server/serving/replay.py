"""Replaying an audited request on the server's own engine (the console's "Replay"): the record's
prompt ids, parameters and seed through the live engine, refused unless this server computes
exactly as the record's did (model digest, kernel path, dtype, reproducible mode, adapter)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from inhouse.config import ServerSettings
from inhouse.engine import EngineClient, SamplingParams
from inhouse.errors import InhouseError
from inhouse.governance.audit_log import AuditLog
from inhouse.governance.replay_plan import ReplayPlan, compare, plan_replay
from inhouse.server.errors import APIError


def _refusal(plan: ReplayPlan, settings: ServerSettings) -> str | None:
    if plan.model_digest != settings.model_digest:
        return (f"this server's model has digest {settings.model_digest or 'unknown'}; the record "
                f"was produced by {plan.model_digest}")
    if settings.engine_mode != "reproducible":
        return f"this server runs the '{settings.engine_mode}' engine mode, not 'reproducible'"
    if plan.kernel and plan.kernel != settings.kernel:
        return f"the record ran the '{plan.kernel}' kernel path, this server '{settings.kernel}'"
    if plan.dtype != (settings.model_dtype or "bfloat16"):
        return f"the record ran in {plan.dtype}, this server in {settings.model_dtype}"
    if plan.adapter_digest and dict(settings.adapters).get(plan.adapter) != plan.adapter_digest:
        return f"this server does not serve the record's adapter {plan.adapter} ({plan.adapter_digest})"
    return None


async def replay_record(client: EngineClient, settings: ServerSettings, log: AuditLog,
                        record_id: str) -> dict:
    leaves = await asyncio.to_thread(log.get, record_id)
    if not leaves:
        raise APIError(404, f"no audit record {record_id}")
    try:
        plan = plan_replay(record_id, leaves)
    except InhouseError as e:
        raise APIError(409, str(e), code="not_replayable") from None
    why = _refusal(plan, settings)
    if why is not None:
        raise APIError(409, f"refusing to replay here: {why}; replay offline with "
                            "`inhouse audit replay`", code="not_replayable")
    out: list[int] = []
    async for o in client.generate(f"replay-{uuid.uuid4().hex[:12]}", plan.prompt_ids,
                                   SamplingParams(**plan.params)):
        out += o.new_token_ids
    return dataclasses.asdict(compare(plan, out)) | {"object": "audit.replay"}
