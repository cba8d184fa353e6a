"""The audit log over HTTP, for keys with the `auditor` role: its state, records (search,
detail, proof, replay), and a subject's export and erasure over every store."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from inhouse.governance.audit_search import RecordFilter, find_records
from inhouse.server.deps import AuditorDep
from inhouse.server.errors import APIError
from inhouse.server.serving.replay import replay_record

router = APIRouter(dependencies=[AuditorDep])


def _log(request: Request):
    log = request.app.state.audit_log
    if log is None:
        raise APIError(404, "the audit log is off on this server")
    return log


@router.get("/v1/audit/verify")
async def verify(request: Request) -> dict:
    log = _log(request)
    if log.key is None:
        raise APIError(500, "the audit log has no signing key", "server_error")
    report = await asyncio.to_thread(log.verify, log.key.public_key())
    last = await asyncio.to_thread(log.latest_checkpoint)
    return {"ok": report.ok, "records": report.num_records, "checkpoints": report.num_checkpoints,
            "unsealed": report.unsealed, "first_bad_index": report.first_bad_index,
            "problem": report.problem, "last_checkpoint": last,
            "note": "checked against the server's own key; pin the public key and verify "
                    "offline with `inhouse audit verify --public-key --witness`"}


@router.get("/v1/audit/records")
async def records(request: Request, subject: str | None = None, limit: int = 100) -> dict:
    rows = await asyncio.to_thread(_log(request).list, subject, None, min(max(limit, 1), 1000))
    return {"object": "list", "data": rows}


@router.get("/v1/audit/search")
async def search(request: Request, subject: str | None = None, key_id: str | None = None,
                 finish_reason: str | None = None, kind: str | None = None,
                 since: float | None = None, until: float | None = None,
                 limit: int = 50) -> dict:
    """Records (one row each, newest first) filtered by subject, key, finish reason, kind and
    time (unix seconds: since <= t < until)."""
    f = RecordFilter(subject or None, key_id or None, finish_reason or None, kind or None,
                     since, until)
    found = await asyncio.to_thread(find_records, _log(request), f, min(max(limit, 1), 500))
    return {"object": "list", "data": found.records, "scanned_leaves": found.scanned,
            "truncated": found.truncated}


@router.get("/v1/audit/records/{record_id}")
async def record(record_id: str, request: Request) -> dict:
    leaves = await asyncio.to_thread(_log(request).get, record_id)
    if not leaves:
        raise APIError(404, f"no audit record {record_id}")
    return {"record_id": record_id, "leaves": leaves}


@router.get("/v1/audit/records/{record_id}/proof")
async def proof(record_id: str, request: Request, content: bool = False) -> dict:
    """The record's inclusion proof against a signed checkpoint (`audit check-proof` checks
    it offline); `?content=true` adds the content and its salts."""
    from inhouse.governance.audit_proof import ProofError, make_proof

    try:
        return await asyncio.to_thread(make_proof, _log(request), record_id, content)
    except ProofError as e:
        raise APIError(404, str(e), code="proof_unavailable") from None


@router.post("/v1/audit/records/{record_id}/replay")
async def replay(record_id: str, request: Request) -> dict:
    """Re-run the record on this server's engine; are the output ids bit-identical?"""
    state = request.app.state
    return await replay_record(state.client, state.settings, _log(request), record_id)


def _personal_data(request: Request):
    _log(request)
    return request.app.state.personal_data


@router.get("/v1/audit/export")
async def export(request: Request, subject: str) -> dict:
    """Everything held about a subject in every store (PIPEDA 4.9, GDPR 15)."""
    if not subject.strip():
        raise APIError(400, "name the subject to export", param="subject")
    return await asyncio.to_thread(_personal_data(request).export, subject)


class EraseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(min_length=1, max_length=200)
    confirm: str = Field(description="the subject again: erasure cannot be undone")


@router.post("/v1/audit/erase")
async def erase(body: EraseBody, request: Request) -> dict:
    """Erase a subject's content from every store; the erasure is itself an audit leaf."""
    if body.confirm != body.subject:
        raise APIError(400, "confirm must repeat the subject exactly: erasure cannot be undone",
                       param="confirm")
    key = getattr(request.state, "api_key", None)
    done = await asyncio.to_thread(_personal_data(request).erase, body.subject, None, "request",
                                   key.id if key is not None else None)
    return {"object": "audit.erasure", "subject": body.subject,
            "audit_records": done.audit_records, "stored_responses": done.stored_responses,
            "conversations": done.conversations}
