"""The web UI's conversations: each belongs to one user (the caller's subject, else its key) in
one tenant, and to nobody else: another user, even of the same tenant, gets a 404, as another
tenant does (tenancy.py). `audit erase`/`export` and retention reach them (privacy.py).

One row per conversation: its title and its messages as JSON (the UI's own shape, checked by the
server's protocol model before it gets here).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, Text, delete, func, insert,
                        select, update)

from inhouse.errors import RequestError
from inhouse.governance.database import erase_rows, open_database, scrub
from inhouse.governance.tenancy import Caller

MAX_PER_USER = 1000  # a user (or a stolen key) cannot fill the disk one conversation at a time

metadata = MetaData()
conversations = Table(
    "ui_conversations", metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(200), nullable=False, index=True),
    Column("owner", String(200), nullable=False, index=True),  # see `owner_of`
    Column("subject", String(200), index=True),  # for erasure and export
    Column("key_id", String(64)),
    Column("title", String(200), nullable=False),
    Column("messages", Text, nullable=False),  # JSON list
    Column("num_messages", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False, index=True),
)


def owner_of(caller: Caller) -> str:
    """Whose conversations a caller sees: the person (subject) a key is bound to, so that a
    replaced key still finds them; an unbound key's own; the one caller of a keyless server."""
    if caller.subject:
        return f"subject:{caller.subject}"
    return f"key:{caller.key_id}" if caller.key_id else "local"


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    messages: list[dict]
    created_at: float
    updated_at: float

    def summary(self) -> dict:
        return {"id": self.id, "object": "ui.conversation", "title": self.title,
                "created_at": self.created_at, "updated_at": self.updated_at,
                "num_messages": len(self.messages)}

    def full(self) -> dict:
        return self.summary() | {"messages": self.messages}


class ConversationStore:
    def __init__(self, url: str) -> None:
        self.engine = open_database(url, busy_ms=5000)
        metadata.create_all(self.engine)

    def _mine(self, caller: Caller):
        return (conversations.c.tenant == caller.tenant) & (conversations.c.owner == owner_of(caller))

    def create(self, caller: Caller, title: str, messages: list[dict]) -> Conversation:
        now = time.time()
        conv = Conversation(f"conv_{uuid.uuid4().hex}", title, messages, now, now)
        with self.engine.begin() as conn:
            held = conn.execute(select(func.count()).select_from(conversations)
                                .where(self._mine(caller))).scalar_one()
            if held >= MAX_PER_USER:
                raise RequestError(f"you have {held} conversations, the most one user may keep; "
                                   "delete some first", status=409, code="too_many_conversations")
            conn.execute(insert(conversations).values(
                id=conv.id, tenant=caller.tenant, owner=owner_of(caller), subject=caller.subject,
                key_id=caller.key_id, title=title, num_messages=len(messages),
                messages=json.dumps(messages, ensure_ascii=False), created_at=now,
                updated_at=now))
        return conv

    def list(self, caller: Caller, limit: int = 200) -> list[Conversation]:
        """The caller's conversations, the most recently updated first (messages left out)."""
        cols = (conversations.c.id, conversations.c.title, conversations.c.num_messages,
                conversations.c.created_at, conversations.c.updated_at)
        with self.engine.connect() as conn:
            rows = conn.execute(select(*cols).where(self._mine(caller))
                                .order_by(conversations.c.updated_at.desc()).limit(limit)).all()
        return [Conversation(r.id, r.title, [{}] * r.num_messages, r.created_at, r.updated_at)
                for r in rows]

    def get(self, conv_id: str, caller: Caller) -> Conversation | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(conversations).where(
                self._mine(caller) & (conversations.c.id == conv_id))).first()
        if r is None:
            return None
        return Conversation(r.id, r.title, json.loads(r.messages), r.created_at, r.updated_at)

    def update(self, conv_id: str, caller: Caller, title: str | None,
               messages: list[dict] | None) -> Conversation | None:
        values: dict = {"updated_at": time.time()}
        if title is not None:
            values["title"] = title
        if messages is not None:
            values |= {"messages": json.dumps(messages, ensure_ascii=False),
                       "num_messages": len(messages)}
        with self.engine.begin() as conn:
            n = conn.execute(update(conversations).where(
                self._mine(caller) & (conversations.c.id == conv_id)).values(**values)).rowcount
        if n and messages is not None:
            scrub(self.engine, ("ui_conversations",))  # the old text leaves the file too
        return self.get(conv_id, caller) if n else None

    def delete(self, conv_id: str, caller: Caller) -> bool:
        with self.engine.begin() as conn:
            n = conn.execute(delete(conversations).where(
                self._mine(caller) & (conversations.c.id == conv_id))).rowcount
        if n:
            scrub(self.engine, ("ui_conversations",))
        return n > 0

    # ---- privacy (privacy.py) -------------------------------------------------------------------
    def export(self, subject: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(conversations).where(conversations.c.subject == subject)
                                .order_by(conversations.c.created_at)).all()
        return [{"id": r.id, "tenant": r.tenant, "title": r.title, "created_at": r.created_at,
                 "updated_at": r.updated_at, "messages": json.loads(r.messages)} for r in rows]

    def erase(self, subject: str | None = None, before: float | None = None) -> int:
        """Delete a subject's conversations, or those not touched since `before`."""
        return erase_rows(self.engine, conversations, conversations.c.updated_at, subject, before)
