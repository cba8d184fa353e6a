"""Export, erasure and retention over every store that holds a person's data: the audit log's
content, the stored responses and the web UI's conversations (and any store added later: it
joins `PersonalData`).

Erasure deletes content, never the audit leaves (their salted hashes stay, so `verify` passes);
it is itself an audit leaf naming the subject, the reason and how much each store erased.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from inhouse.governance.audit_log import AuditLog
from inhouse.governance.conversations_store import ConversationStore
from inhouse.governance.responses_store import ResponseStore


@dataclass(frozen=True)
class Erasure:
    audit_records: int  # records whose content was erased
    stored_responses: int
    conversations: int = 0


class PersonalData:
    def __init__(self, audit: AuditLog, responses: ResponseStore | None,
                 conversations: ConversationStore | None = None) -> None:
        self.audit, self.responses, self.conversations = audit, responses, conversations

    def export(self, subject: str) -> dict:
        """Everything held about a subject (PIPEDA 4.9, GDPR 15)."""
        body = self.audit.export(subject)
        body["stored_responses"] = self.responses.export(subject) if self.responses else []
        body["conversations"] = self.conversations.export(subject) if self.conversations else []
        return body

    def erase(self, subject: str | None = None, before: float | None = None,
              reason: str = "request", by: str | None = None) -> Erasure:
        """A subject's data, or everything older than `before` (retention); logged, with the
        key that asked (`by`) when it came over HTTP."""
        stored = self.responses.erase(subject, before) if self.responses else 0
        convs = self.conversations.erase(subject, before) if self.conversations else 0
        extra = {"stored_responses": stored, "conversations": convs} | ({"by": by} if by else {})
        records = self.audit.erase(subject, before, reason, extra=extra)
        return Erasure(records, stored, convs)

    def retain(self, days: float) -> Erasure:
        return self.erase(None, time.time() - days * 86400, "retention")
