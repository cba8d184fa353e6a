"""The audit log over HTTP, for keys with the `auditor` role."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from inhouse.server.deps import AuditorDep
from inhouse.server.errors import APIError

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
    return {"ok": report.ok, "records": report.num_records, "checkpoints": report.num_checkpoints,
            "unsealed": report.unsealed, "first_bad_index": report.first_bad_index,
            "problem": report.problem,
            "note": "checked against the server's own key; pin the public key and verify "
                    "offline with `inhouse audit verify --public-key --witness`"}


@router.get("/v1/audit/records")
async def records(request: Request, subject: str | None = None, limit: int = 100) -> dict:
    rows = await asyncio.to_thread(_log(request).list, subject, None, min(max(limit, 1), 1000))
    return {"object": "list", "data": rows}


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
