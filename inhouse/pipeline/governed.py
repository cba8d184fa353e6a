"""One governed turn: the path every entry point takes (Chat Completions and Responses now; the
built-in tools and the web UI later), so that none of them can skip a step.

    caller (key -> tenant, subject) -> PII policy -> audit `request` leaf -> the turn (harmony
    render -> engine -> parser) -> PII restore -> audit `completion` leaf -> metrics -> storage

Every `request` leaf gets its `completion` leaf: a `Finished` turn, or "refused" (a refusal
after the request leaf), "disconnect" (the consumer went away) or "error".
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio

from inhouse.config import ServerSettings
from inhouse.engine import EngineClient, InvalidRequest, QueueFull, SamplingParams
from inhouse.errors import InhouseError, RequestError
from inhouse.governance.pii import Masker
from inhouse.governance.responses_store import ResponseStore
from inhouse.governance.tenancy import Caller
from inhouse.harmony import ChatMessage, ContentDelta, ConversationError, PromptOptions
from inhouse.pipeline.audit import Auditor
from inhouse.pipeline.chat import ChatTurn, Finished, stream_chat
from inhouse.pipeline.pii import EventRestorer, apply_pii_policy


class TurnObserver(Protocol):
    def observe_turn(self, finished: Finished) -> None: ...


@dataclass(frozen=True)
class TurnRequest:
    """What an entry point asks for: one conversation, `len(params)` independent choices."""

    endpoint: str
    caller: Caller
    messages: tuple[ChatMessage, ...]
    options: PromptOptions
    params: tuple[SamplingParams, ...]
    record_ids: tuple[str, ...]  # one per choice: the audit record and engine request ids
    audit_extra: dict[str, Any] = field(default_factory=dict)  # stop strings, ...

    def __post_init__(self) -> None:
        if len(self.params) != len(self.record_ids) or not self.params:
            raise ValueError("a turn request needs one record id per choice")


@dataclass
class GovernedTurn:
    """The running choices: each stream yields restored harmony events, `TokenEvent`s and one
    `Finished` (already audited and counted). Close every stream (`aclose`) when done."""

    streams: list[AsyncIterator]
    masker: Masker | None
    caller: Caller


class GovernedTurns:
    def __init__(self, client: EngineClient, settings: ServerSettings, auditor: Auditor,
                 observer: TurnObserver, store: ResponseStore | None = None) -> None:
        self.client, self.settings, self.auditor = client, settings, auditor
        self.observer, self.store = observer, store
        self.offload = auditor.offload

    def shutdown(self) -> None:
        self.offload.shutdown()

    async def start(self, req: TurnRequest) -> GovernedTurn:
        """Refusals (PII block, bad input, a full queue) raise `RequestError` here, before any
        output; a refusal after the request leaves is recorded in their completion leaves."""
        messages, masker, labels = await apply_pii_policy(self.settings, list(req.messages),
                                                          self.offload)
        shared = tuple(messages)
        # the tenant salts the prefix cache: no tenant reuses, or can time, another's prompts
        turns = [ChatTurn(shared, req.options, replace(p, cache_salt=req.caller.tenant), rid)
                 for p, rid in zip(req.params, req.record_ids)]
        await self.auditor.start(req.endpoint, req.caller, turns, labels, req.audit_extra)
        try:
            render = _Once(self.offload.render)  # n choices, one conversation: rendered once
            streams = await start_streams([stream_chat(self.client, t, render) for t in turns])
        except BaseException as e:
            refusal = self.refusal(e)
            with anyio.CancelScope(shield=True):
                for t in turns:
                    await self.auditor.ended(t.request_id, req.caller, "refused",
                                             status=refusal.status if refusal else 499)
            if refusal is None:
                raise
            raise refusal from None
        return GovernedTurn([self._governed(t, s, masker, req.caller)
                             for t, s in zip(turns, streams)], masker, req.caller)

    def refusal(self, e: BaseException) -> RequestError | None:
        """The engine's and harmony's refusals as a `RequestError`; None for anything else."""
        return as_request_error(e, self.retry_after)

    def retry_after(self) -> int:
        """Seconds until the queue ahead has drained at the rate requests finished lately."""
        s = self.client.stats()
        if s.finished_per_s <= 0:
            return 60 if s.num_waiting else 1
        return max(1, min(3600, math.ceil((s.num_waiting + 1) / s.finished_per_s)))

    async def _governed(self, turn: ChatTurn, stream: AsyncIterator, masker: Masker | None,
                        caller: Caller) -> AsyncIterator:
        restore = EventRestorer(masker)
        answer: list[str] = []
        finished = False
        outcome, error = "disconnect", None
        try:
            async for raw in stream:
                if isinstance(raw, Finished):  # the parser's last MessageDone flushed restore
                    await self.auditor.complete(turn.request_id, caller, raw, "".join(answer))
                    finished = True
                    self.observer.observe_turn(raw)
                    yield raw
                    continue
                for ev in restore(raw):
                    if isinstance(ev, ContentDelta):
                        answer.append(ev.text)
                    yield ev
            outcome, error = "error", "the turn ended without finishing"
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except BaseException as e:
            outcome, error = "error", f"{type(e).__name__}: {e}"
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
                if not finished:
                    await self.auditor.ended(turn.request_id, caller, outcome, error=error)

    # ---- storage with its owner -----------------------------------------------------------------
    def should_store(self, asked: bool | None) -> bool:
        """`store` as asked; when not asked, stored unless the deployment keeps no text
        (`--audit-content none`: nothing is kept unless a request asks for it)."""
        if asked is not None:
            return asked
        return self.settings.audit_content != "none"

    async def save(self, turn: GovernedTurn, response: dict, items: list[dict]) -> None:
        """Store a response for its caller's tenant and subject; with PII masking on, what is
        stored holds the placeholders, never the values."""
        if self.store is None:
            return
        if turn.masker is not None:
            response, items = _masked(response, turn.masker), _masked(items, turn.masker)
        await asyncio.to_thread(self.store.save, response, items, turn.caller)


def as_request_error(e: BaseException, retry_after=lambda: 1) -> RequestError | None:
    """A refusal from the layers below (engine, harmony) as a `RequestError`, the one mapping the
    pipeline and the server's error handler share; None when `e` is no refusal (a bug: 500).
    `retry_after()`: the seconds a full queue asks the client to wait."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, QueueFull):
        return RequestError(str(e), status=429, code="queue_full", kind="rate_limit_error",
                            retry_after_s=retry_after())
    if isinstance(e, InvalidRequest):
        code = "context_length_exceeded" if "context window" in str(e) else None
        return RequestError(str(e), param=e.param, code=code)
    if isinstance(e, ConversationError):
        return RequestError(str(e), param=e.param or "messages")
    if isinstance(e, InhouseError):
        return RequestError(str(e))
    return None


class _Once:
    """A renderer that renders the first conversation it is given and answers every later call
    with that result (all choices of one turn share their prompt)."""

    def __init__(self, render) -> None:
        self.render, self._task = render, None

    async def __call__(self, messages, options) -> list[int]:
        if self._task is None:
            self._task = asyncio.ensure_future(self.render(messages, options))
        return list(await asyncio.shield(self._task))


def _masked(obj, masker: Masker):
    if isinstance(obj, str):
        return masker.mask(obj)
    if isinstance(obj, list):
        return [_masked(x, masker) for x in obj]
    if isinstance(obj, dict):
        return {k: _masked(v, masker) for k, v in obj.items()}
    return obj


async def start_streams(streams: list[AsyncIterator]) -> list[AsyncIterator]:
    """Pull each stream's first event, so that a refused request (bad input, full queue) raises
    here, before any response header is sent. Returns streams that replay that first event."""
    async def first(stream):
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    try:
        heads = await asyncio.gather(*(first(s) for s in streams))
    except BaseException:
        with anyio.CancelScope(shield=True):
            for s in streams:
                await s.aclose()
        raise
    return [_replay(h, s) for h, s in zip(heads, streams)]


async def _replay(head, stream: AsyncIterator) -> AsyncIterator:
    try:
        if head is not None:
            yield head
        async for item in stream:
            yield item
    finally:
        await stream.aclose()
