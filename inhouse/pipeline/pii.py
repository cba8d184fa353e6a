"""The deployment's PII policy applied to a request's messages: off, mask or block."""

from __future__ import annotations

import dataclasses

from inhouse.config import ServerSettings
from inhouse.governance.pii import Masker, PiiConfig, Restorer, scan_texts
from inhouse.harmony import (BuiltinCallDelta, BuiltinCallDone, ChatMessage, ContentDelta,
                             MessageDone, ReasoningDelta, ToolCall, ToolCallDelta, ToolCallDone)
from inhouse.errors import RequestError
from inhouse.pipeline.offload import Offload
from inhouse.pipeline.tools import ToolCallFinished, ToolCallStarted


async def apply_pii_policy(settings: ServerSettings, messages: list[ChatMessage],
                           offload: Offload) -> tuple[list[ChatMessage], Masker | None,
                                                      frozenset[str]]:
    """(messages to render, the masker to restore answers with, labels found). The scan runs
    off the event loop (`offload`: a worker process when the texts are large)."""
    mode = settings.pii_mode
    try:
        cfg = PiiConfig(custom=settings.pii_patterns)
    except ValueError as e:
        raise RequestError(f"the server's PII configuration is invalid: {e}", status=500,
                           kind="server_error") from None
    texts = tuple(t for m in messages for t in _texts(m))
    scan = await offload.run(sum(map(len, texts)), scan_texts, texts, cfg, mode == "mask")
    if mode == "off" or not scan.labels:
        return messages, None, scan.labels
    if mode == "block":
        raise RequestError("the request contains personal information ("
                           f"{', '.join(sorted(scan.labels))}); this server is set to refuse it",
                           param="messages", code="pii_blocked")
    masked = iter(scan.masked)
    out = [dataclasses.replace(
        m, content=next(masked), reasoning=next(masked) if m.reasoning else m.reasoning,
        tool_calls=tuple(ToolCall(c.name, next(masked), c.id) for c in m.tool_calls))
        for m in messages]
    return out, Masker(cfg, dict(scan.mapping)), scan.labels


def _texts(m: ChatMessage):
    yield m.content
    if m.reasoning:
        yield m.reasoning
    for c in m.tool_calls:
        yield c.arguments


class EventRestorer:
    """Puts the masked values back into the model's events (answer, reasoning, tool arguments),
    holding back partial placeholders until they complete; flushes at each message end."""

    def __init__(self, masker: Masker | None) -> None:
        self.masker = masker
        self.text = {ContentDelta: Restorer(masker), ReasoningDelta: Restorer(masker)} if masker else {}
        self.args = Restorer(masker) if masker else None
        self.code = Restorer(masker) if masker else None  # a built-in call's code or arguments
        self.call: ToolCallDelta | None = None

    def __call__(self, ev) -> list:
        if self.masker is None:
            return [ev]
        if isinstance(ev, (ContentDelta, ReasoningDelta)):
            text = self.text[type(ev)].feed(ev.text)
            return [type(ev)(text)] if text else []
        if isinstance(ev, ToolCallDelta):
            self.call = ev if ev.name is not None else self.call
            text = self.args.feed(ev.arguments)
            return [dataclasses.replace(ev, arguments=text)] if text or ev.name else []
        if isinstance(ev, ToolCallDone):
            tail = self.args.flush()
            out = [ToolCallDelta(ev.index, None, tail)] if tail else []
            return out + [dataclasses.replace(ev, arguments=self.masker.restore(ev.arguments))]
        if isinstance(ev, BuiltinCallDelta):
            text = self.code.feed(ev.text)
            return [dataclasses.replace(ev, text=text)] if text else []
        if isinstance(ev, BuiltinCallDone):
            tail = self.code.flush()
            out = [BuiltinCallDelta(ev.index, ev.recipient, tail)] if tail else []
            return out + [dataclasses.replace(ev, text=self.masker.restore(ev.text))]
        if isinstance(ev, (ToolCallStarted, ToolCallFinished)):
            fields = {"arguments": self.masker.restore(ev.arguments)}
            if isinstance(ev, ToolCallFinished):
                fields["output"] = self.masker.restore(ev.output)
            return [dataclasses.replace(ev, **fields)]
        if isinstance(ev, MessageDone):
            out = [kind(tail) for kind, r in self.text.items() if (tail := r.flush())]
            return out + [ev]
        return [ev]
