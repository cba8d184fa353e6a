"""The web UI's conversations as the server keeps them: each caller's own (governance's
`ConversationStore`), with PII redacted before it is written when the deployment masks or blocks
PII, as it is in the audit log and the stored responses."""

from __future__ import annotations

import asyncio

from inhouse.config import ServerSettings
from inhouse.governance.conversations_store import Conversation, ConversationStore
from inhouse.governance.pii import PiiConfig, redact_texts
from inhouse.governance.tenancy import Caller
from inhouse.server.errors import APIError
from inhouse.server.protocol.ui import ConversationIn, ConversationPatch, UIMessage

TEXT_FIELDS = ("content", "reasoning")


class Conversations:
    def __init__(self, store: ConversationStore, settings: ServerSettings) -> None:
        self.store, self.settings = store, settings
        self.pii = PiiConfig(custom=settings.pii_patterns)

    def _kept(self, messages: list[UIMessage]) -> list[dict]:
        rows = [m.model_dump(exclude_defaults=True) for m in messages]
        if self.settings.pii_mode == "off":
            return rows
        texts = tuple(r.get(f) or "" for r in rows for f in TEXT_FIELDS)
        red = iter(redact_texts(texts, self.pii))
        for r in rows:
            for f in TEXT_FIELDS:
                value = next(red)
                if f in r:
                    r[f] = value
            for t in r.get("tools", []):  # the model's code and the tool's answers too
                for f in ("detail", "output"):
                    if t.get(f):
                        t[f] = redact_texts((t[f],), self.pii)[0]
        return rows

    def _title(self, title: str) -> str:
        return title if self.settings.pii_mode == "off" else redact_texts((title,), self.pii)[0]

    async def create(self, body: ConversationIn, caller: Caller) -> dict:
        def run() -> Conversation:
            return self.store.create(caller, self._title(body.title), self._kept(body.messages))
        return (await asyncio.to_thread(run)).full()

    async def list(self, caller: Caller) -> dict:
        convs = await asyncio.to_thread(self.store.list, caller)
        return {"object": "list", "data": [c.summary() for c in convs]}

    async def get(self, conv_id: str, caller: Caller) -> dict:
        conv = await asyncio.to_thread(self.store.get, conv_id, caller)
        if conv is None:
            raise APIError(404, f"no conversation {conv_id}", code="not_found")
        return conv.full()

    async def update(self, conv_id: str, body: ConversationPatch, caller: Caller) -> dict:
        def run() -> Conversation | None:
            title = self._title(body.title) if body.title is not None else None
            msgs = self._kept(body.messages) if body.messages is not None else None
            return self.store.update(conv_id, caller, title, msgs)
        conv = await asyncio.to_thread(run)
        if conv is None:
            raise APIError(404, f"no conversation {conv_id}", code="not_found")
        return conv.full()

    async def delete(self, conv_id: str, caller: Caller) -> dict:
        if not await asyncio.to_thread(self.store.delete, conv_id, caller):
            raise APIError(404, f"no conversation {conv_id}", code="not_found")
        return {"id": conv_id, "object": "ui.conversation.deleted", "deleted": True}
