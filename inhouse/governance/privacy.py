"""Export, erasure and retention over every store that holds a person's data: the audit log's
content and the stored responses (and any store added later: it joins `PersonalData`).

Erasure deletes content, never the audit leaves (their salted hashes stay, so `verify` passes);
it is itself an audit leaf naming the subject, the reason and how much each store erased.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from inhouse.governance.audit_log import AuditLog
from inhouse.governance.responses_store import ResponseStore


@dataclass(frozen=True)
class Erasure:
    audit_records: int  # records whose content was erased
    stored_responses: int


class PersonalData:
    def __init__(self, audit: AuditLog, responses: ResponseStore | None) -> None:
        self.audit, self.responses = audit, responses

    def export(self, subject: str) -> dict:
        """Everything held about a subject (PIPEDA 4.9, GDPR 15)."""
        body = self.audit.export(subject)
        body["stored_responses"] = self.responses.export(subject) if self.responses else []
        return body

    def erase(self, subject: str | None = None, before: float | None = None,
              reason: str = "request") -> Erasure:
        """A subject's data, or everything older than `before` (retention); logged."""
        stored = self.responses.erase(subject, before) if self.responses else 0
        records = self.audit.erase(subject, before, reason, extra={"stored_responses": stored})
        return Erasure(records, stored)

    def retain(self, days: float) -> Erasure:
        return self.erase(None, time.time() - days * 86400, "retention")
