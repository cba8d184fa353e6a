"""Finding records in the audit log for a person (the governance console, `audit list`): a
record is the leaves of one record id (its request and its completion, or a tool's, a policy's,
an erasure's), summarised in one row and filtered on what either leaf says.

The log is walked back from its head in pages; filters on leaf columns (subject, time) go to the
database, the others (key, finish reason, kind) are applied to the grouped records. A walk stops
after `max_leaves` leaves and says so (`truncated`), so a query never reads an unbounded log.
"""

from __future__ import annotations

from dataclasses import dataclass

from inhouse.governance.audit_log import AuditLog

PAGE = 1000


@dataclass(frozen=True)
class RecordFilter:
    subject: str | None = None
    key_id: str | None = None
    finish_reason: str | None = None
    kind: str | None = None  # the first leaf's kind: request, tool, policy, erasure, ...
    since: float | None = None
    until: float | None = None


@dataclass(frozen=True)
class Found:
    records: list[dict]
    scanned: int  # leaves read
    truncated: bool  # the walk stopped at max_leaves before the log's start


def summarise(leaves: list[dict]) -> dict:
    """One row for a record from its leaves (in log order)."""
    first = leaves[0]
    done = next((leaf for leaf in leaves if leaf.get("kind") == "completion"), None)
    row = {"record_id": first["record_id"], "kind": first.get("kind"),
           "created_at": first.get("created_at"), "subject": first.get("subject"),
           "api_key_id": first.get("api_key_id"), "tenant": first.get("tenant"),
           "endpoint": first.get("endpoint"), "model": first.get("model"),
           "leaves": [leaf.get("index") for leaf in leaves],
           "verified": all(leaf.get("verified", False) for leaf in leaves)}
    if done is not None:
        row |= {"finish_reason": done.get("finish_reason"),
                "prompt_tokens": done.get("prompt_tokens"),
                "completion_tokens": done.get("completion_tokens")}
    return row


def _matches(row: dict, f: RecordFilter) -> bool:
    return ((f.key_id is None or row["api_key_id"] == f.key_id)
            and (f.finish_reason is None or row.get("finish_reason") == f.finish_reason)
            and (f.kind is None or row["kind"] == f.kind))


def find_records(log: AuditLog, f: RecordFilter, limit: int = 50,
                 max_leaves: int = 50_000) -> Found:
    """The newest `limit` records that match, newest first (by their newest leaf)."""
    by_id: dict[str, list[dict]] = {}
    matched: set[str] = set()
    below, scanned, truncated = None, 0, False
    while True:
        if scanned >= max_leaves:
            truncated = True
            break
        page = log.scan(below, f.subject, f.since, f.until, min(PAGE, max_leaves - scanned))
        if not page:
            break
        scanned += len(page)
        below = page[-1]["index"]
        for leaf in page:  # newest first: each leaf goes before those already read
            by_id.setdefault(leaf["record_id"], []).insert(0, leaf)
        for rid in {leaf["record_id"] for leaf in page}:
            if _matches(summarise(_whole(log, by_id[rid])), f):
                matched.add(rid)
            else:
                matched.discard(rid)
        if len(matched) >= limit:
            break
    rows = [summarise(v) for rid, v in by_id.items() if rid in matched]
    return Found(rows[:limit], scanned, truncated)


def _whole(log: AuditLog, leaves: list[dict]) -> list[dict]:
    """A record's leaves, read again whole when the walk has not yet reached its first leaf
    (a completion whose request is on an older page), so that filters see the request."""
    if leaves[0].get("kind") != "completion":
        return leaves
    whole = log.get(leaves[0]["record_id"])
    for leaf in whole:
        leaf.pop("content", None)
    leaves[:] = whole  # cached for the next pass
    return leaves
