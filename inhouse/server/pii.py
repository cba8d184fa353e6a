"""The deployment's PII policy applied to a request's messages: off, mask or block."""

from __future__ import annotations

import dataclasses

from inhouse.governance.pii import Masker, detect
from inhouse.harmony import ChatMessage, ToolCall
from inhouse.server.errors import APIError


def apply_pii_policy(mode: str, messages: list[ChatMessage]) -> tuple[list[ChatMessage],
                                                                      Masker | None, frozenset[str]]:
    """(messages to render, the masker to restore answers with, labels found)."""
    labels = frozenset(f.label for m in messages for text in _texts(m) for f in detect(text))
    if mode == "off" or not labels:
        return messages, None, labels
    if mode == "block":
        raise APIError(400, "the request contains personal information ("
                            f"{', '.join(sorted(labels))}); this server is set to refuse it",
                       param="messages", code="pii_blocked")
    masker = Masker()
    masked = [dataclasses.replace(
        m, content=masker.mask(m.content),
        reasoning=masker.mask(m.reasoning) if m.reasoning else m.reasoning,
        tool_calls=tuple(ToolCall(c.name, masker.mask(c.arguments), c.id) for c in m.tool_calls))
        for m in messages]
    return masked, masker, labels


def _texts(m: ChatMessage):
    yield m.content
    if m.reasoning:
        yield m.reasoning
    for c in m.tool_calls:
        yield c.arguments
