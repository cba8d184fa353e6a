"""Stored Responses (`store: true`): the response object and the conversation it continues, each
owned by a tenant and filed under a subject, so that another tenant never sees it (tenancy.py)
and `audit erase`/`export` and retention reach it (privacy.py).

Default: a SQLite file in inhouse's cache (WAL: concurrent readers, one writer); any SQLAlchemy
URL works. One row per response: the full input items (earlier turns expanded) and the response
object, as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sqlalchemy import Column, Float, MetaData, String, Table, Text, delete, insert, select

from inhouse.governance.database import (add_missing_columns, erase_rows, open_database,
                                         private_dir, scrub)
from inhouse.governance.tenancy import Caller

metadata = MetaData()
responses = Table(
    "responses", metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("model", String(200), nullable=False),
    Column("input_items", Text, nullable=False),  # JSON list: the whole conversation so far
    Column("response", Text, nullable=False),  # JSON: the response object
    Column("tenant", String(200), index=True),  # None: made before tenants; admins alone see it
    Column("subject", String(200), index=True),
    Column("key_id", String(64)),
)
ADDED = {"tenant": "VARCHAR(200)", "subject": "VARCHAR(200)", "key_id": "VARCHAR(64)"}


def default_url(cache_root: Path) -> str:
    """The server's own SQLite file: stored responses and API keys."""
    private_dir(cache_root)
    return f"sqlite:///{cache_root / 'server.db'}"


class ResponseStore:
    def __init__(self, url: str) -> None:
        self.engine = open_database(url, busy_ms=5000)
        metadata.create_all(self.engine)
        add_missing_columns(self.engine, "responses", ADDED)

    def save(self, response: dict, input_items: list[dict], owner: Caller) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(responses).values(
                id=response["id"], created_at=time.time(), model=response["model"],
                input_items=json.dumps(input_items, ensure_ascii=False),
                response=json.dumps(response, ensure_ascii=False), tenant=owner.tenant,
                subject=owner.subject, key_id=owner.key_id))

    def _visible(self, response_id: str, caller: Caller):
        q = responses.c.id == response_id
        return q if caller.sees_all_tenants else q & (responses.c.tenant == caller.tenant)

    def get(self, response_id: str, caller: Caller) -> tuple[dict, list[dict]] | None:
        """The response and its input items, if it exists for this caller (None otherwise: the
        caller cannot tell another tenant's response from one that does not exist)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(responses.c.response, responses.c.input_items)
                               .where(self._visible(response_id, caller))).first()
        if row is None:
            return None
        return json.loads(row.response), json.loads(row.input_items)

    def delete(self, response_id: str, caller: Caller) -> bool:
        with self.engine.begin() as conn:
            n = conn.execute(delete(responses).where(self._visible(response_id, caller))).rowcount
        if n:
            scrub(self.engine, ("responses",))
        return n > 0

    # ---- privacy (privacy.py) -------------------------------------------------------------------
    def export(self, subject: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(responses).where(responses.c.subject == subject)
                                .order_by(responses.c.created_at)).all()
        return [{"id": r.id, "created_at": r.created_at, "tenant": r.tenant,
                 "input_items": json.loads(r.input_items), "response": json.loads(r.response)}
                for r in rows]

    def erase(self, subject: str | None = None, before: float | None = None) -> int:
        """Delete a subject's stored responses, or those older than `before`; returns how many."""
        return erase_rows(self.engine, responses, responses.c.created_at, subject, before)
