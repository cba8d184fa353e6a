"""One governed turn: the path every entry point takes (Chat Completions and Responses now; the
web UI later), so that none of them can skip a step.

    caller (key -> tenant, subject) -> PII policy -> audit `request` leaf -> the turn (harmony
    render -> engine -> parser) -> PII restore -> audit `completion` leaf -> metrics -> storage

Every `request` leaf gets its `completion` leaf: a `Finished` turn, or "refused" (a refusal
after the request leaf), "disconnect" (the consumer went away) or "error".

Built-in tools (browser, python) run inside the turn: when a step ends in a call to one, the
step's record is completed, the call runs (a `tool` leaf: the call, digests of its arguments
and result), and the next step is a record of its own (`continues`, `step`) whose prompt is the
last one plus the model's tokens and the tool's answer. Each step replays on its own, from the
recorded tool results. The client sees one turn: the calls as events, one `Finished` with the
usage of every step.
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
from inhouse.harmony import (BuiltinCallDone, ChatMessage, ContentDelta, ConversationError,
                             PromptOptions, tool_result_ids)
from inhouse.pipeline.audit import Auditor
from inhouse.pipeline.chat import ChatTurn, Finished, stream_chat
from inhouse.pipeline.guard import PolicyGuard, user_text
from inhouse.pipeline.pii import EventRestorer, apply_pii_policy
from inhouse.pipeline.tools import (AnswerCitations, BuiltinRequest, BuiltinTools,
                                    ToolCallFinished, TurnTools)


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
    builtin: BuiltinRequest | None = None  # the built-in tools the server runs in this turn

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
    tools: list[TurnTools | None] = field(default_factory=list)  # per choice


class GovernedTurns:
    def __init__(self, client: EngineClient, settings: ServerSettings, auditor: Auditor,
                 observer: TurnObserver, store: ResponseStore | None = None,
                 tools: BuiltinTools | None = None, guard: PolicyGuard | None = None) -> None:
        self.client, self.settings, self.auditor = client, settings, auditor
        self.observer, self.store, self.tools, self.guard = observer, store, tools, guard
        self.offload = auditor.offload

    def shutdown(self) -> None:
        self.offload.shutdown()
        if self.tools is not None:
            self.tools.close()

    def _turn_tools(self, req: TurnRequest) -> list[TurnTools]:
        if self.tools is None:
            raise RequestError("this server runs no built-in tools", param="tools")
        self.tools.check(req.builtin, req.caller.tenant)
        return [self.tools.for_turn(req.builtin, req.caller.tenant, i == 0)
                for i in range(len(req.params))]

    async def start(self, req: TurnRequest) -> GovernedTurn:
        """Refusals (PII block, bad input, a full queue) raise `RequestError` here, before any
        output; a refusal after the request leaves is recorded in their completion leaves."""
        tools = ([None] * len(req.params) if req.builtin is None or not req.builtin.names
                 else await asyncio.to_thread(self._turn_tools, req))  # may probe the sandbox
        messages, masker, labels = await apply_pii_policy(self.settings, list(req.messages),
                                                          self.offload)
        shared = tuple(messages)
        # the tenant salts the prefix cache: no tenant reuses, or can time, another's prompts
        turns = [ChatTurn(shared, req.options, replace(p, cache_salt=req.caller.tenant), rid)
                 for p, rid in zip(req.params, req.record_ids)]
        await self.auditor.start(req.endpoint, req.caller, turns, labels, req.audit_extra)
        try:
            await self._check_input(turns, req.caller)
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
        steps = [_Steps(req, labels, render, tt, t.request_id) for tt, t in zip(tools, turns)]
        governed = [self._governed(t, s, masker, req.caller, st)
                    for t, s, st in zip(turns, streams, steps)]
        if self.guard is not None and self.guard.settings.checks("output"):
            governed = [self._held(g, t.request_id, req.caller) for g, t in zip(governed, turns)]
        return GovernedTurn(governed, masker, req.caller, tools)

    # ---- the policy guard ---------------------------------------------------------------------
    async def _judge(self, text: str, stage: str, record_ids: list[str],
                     caller: Caller) -> None:
        """Classify `text`, record the verdict on each record, and raise the refusal if the
        policy blocks it."""
        guard = self.guard
        verdict = await guard.classify(text, caller.tenant)
        action = guard.settings.action if verdict.violation else "pass"
        for rid in record_ids:
            await self.auditor.policy(rid, caller, stage, verdict, action, guard.policy.sha256,
                                      guard.guard_name)
        if verdict.violation and guard.settings.action == "block":
            raise guard.refusal(verdict, stage)

    async def _check_input(self, turns: list[ChatTurn], caller: Caller) -> None:
        """Classify the turn's user messages; a blocked input raises (recorded as refused)."""
        if self.guard is not None and self.guard.settings.checks("input"):
            await self._judge(user_text(turns[0].messages), "input",
                              [t.request_id for t in turns], caller)

    async def _held(self, stream: AsyncIterator, record_id: str,
                    caller: Caller) -> AsyncIterator:
        """The whole turn held back until the guard has classified its answer."""
        held = []
        try:
            async for ev in stream:
                if not isinstance(ev, Finished):
                    held.append(ev)
                    continue
                answer = "".join(e.text for e in held if isinstance(e, ContentDelta))
                await self._judge(answer, "output", [record_id], caller)
                for h in held:
                    yield h
                yield ev
        finally:
            await stream.aclose()

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
                        caller: Caller, steps: _Steps) -> AsyncIterator:
        restore = EventRestorer(masker)
        answer: list[str] = []
        finished = False  # has the current step's record its completion leaf?
        outcome, error = "disconnect", None
        try:
            while stream is not None:
                call, done = None, None
                async for raw in stream:
                    if isinstance(raw, Finished):
                        done = raw
                        break
                    if isinstance(raw, BuiltinCallDone):
                        call = raw
                    for ev in restore(raw):
                        if isinstance(ev, ContentDelta):
                            answer.append(ev.text)
                        yield ev
                if done is None:
                    break
                await stream.aclose()
                stream = None
                await self.auditor.complete(turn.request_id, caller, done, "".join(answer))
                finished = True
                if steps.should_run(call, done):  # the server runs the call and goes on
                    result = await steps.run(call, done, self.auditor, caller, turn.request_id)
                    for ev in (*restore(result.started), *restore(result.finished)):
                        yield ev
                    turn = steps.next_turn(turn, done, result.finished, masker)
                    await self.auditor.start(steps.req.endpoint, caller, [turn], steps.labels,
                                             steps.req.audit_extra | steps.link())
                    finished = False
                    try:
                        stream = (await start_streams([stream_chat(self.client, turn,
                                                                   steps.render)]))[0]
                        continue
                    except Exception as e:  # noqa: BLE001 - a refusal (the context is full)
                        refusal = self.refusal(e)
                        if refusal is None:
                            raise
                        await self.auditor.ended(turn.request_id, caller, "refused",
                                                 status=refusal.status, error=str(refusal))
                        finished = True  # the turn ends cut, with what it has
                        done = steps.done.pop()
                total = steps.total(done, call is not None)
                self.observer.observe_turn(total)
                if steps.tools is not None:
                    yield AnswerCitations(steps.tools.citations("".join(answer)))
                yield total
            if not finished:
                outcome, error = "error", "the turn ended without finishing"
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except BaseException as e:
            outcome, error = "error", f"{type(e).__name__}: {e}"
            raise
        finally:
            with anyio.CancelScope(shield=True):
                if stream is not None:
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


@dataclass
class _ToolRun:
    started: Any
    finished: ToolCallFinished


class _Steps:
    """One choice's built-in tool loop: whether a step's end is a call the server runs, running
    it (audited), the next step's turn, and the usage of all steps together."""

    def __init__(self, req: TurnRequest, labels, render, tools: TurnTools | None,
                 root_id: str) -> None:
        self.req, self.labels, self.render, self.tools = req, labels, render, tools
        self.root_id = root_id  # the choice's first record; step k is f"{root_id}-step{k}"
        self.done: list[Finished] = []

    def should_run(self, call: BuiltinCallDone | None, done: Finished) -> bool:
        return (self.tools is not None and call is not None and done.finish_reason == "tool_calls"
                and self.tools.can_call()
                and done.completion_tokens < self._budget())

    def _budget(self) -> int:
        return self.req.params[0].max_tokens - sum(f.completion_tokens for f in self.done)

    async def run(self, call: BuiltinCallDone, done: Finished, auditor: Auditor, caller: Caller,
                  record_id: str) -> _ToolRun:
        """Run the call the step `record_id` ended with; its `tool` leaf joins that record."""
        self.done.append(done)
        started = self.tools.started(call.recipient, call.text)
        finished = await self.tools.run(started)
        await auditor.tool(record_id, caller, finished)
        return _ToolRun(started, finished)

    def next_turn(self, turn: ChatTurn, done: Finished, result: ToolCallFinished,
                  masker: Masker | None) -> ChatTurn:
        output = masker.mask(result.output) if masker is not None else result.output
        extra = turn.extra_ids + done.output_ids + tuple(tool_result_ids(result.recipient, output))
        params = replace(turn.params, max_tokens=max(1, self._budget()))
        return ChatTurn(turn.messages, turn.options, params,
                        f"{self.root_id}-step{len(self.done)}", extra)

    def link(self) -> dict:
        return {"continues": self.root_id, "step": len(self.done)}

    def total(self, last: Finished, called: bool) -> Finished:
        """The turn's `Finished` as the client sees it: the last step's, with every step's
        tokens counted (each step read its whole prompt). A turn that stopped on a built-in call
        the server did not run (its call or token limit) ends as "length": it was cut."""
        if called and self.tools is not None and last.finish_reason == "tool_calls":
            last = replace(last, finish_reason="length")
        steps = self.done + [last]
        if len(steps) == 1:
            return last
        return replace(last, prompt_tokens=sum(f.prompt_tokens for f in steps),
                       completion_tokens=sum(f.completion_tokens for f in steps),
                       reasoning_tokens=sum(f.reasoning_tokens for f in steps),
                       cached_tokens=sum(f.cached_tokens for f in steps),
                       total_s=sum(f.total_s for f in steps),
                       time_to_first_token_s=steps[0].time_to_first_token_s)


class _Once:
    """A renderer that renders the first conversation it is given and answers every later call
    with that result (all choices of one turn share their prompt)."""

    def __init__(self, render) -> None:
        self.render, self._task = render, None

    async def __call__(self, messages, options) -> list[int]:
        if self._task is None:
            self._task = asyncio.ensure_future(self.render(messages, options))
        return list(await asyncio.shield(self._task))


# NOTE: identifiers and enumerations are never masked: a random id holds digit runs that the
# detectors take for a SIN or a card number about once in 300 (resp_...189061658...), and a stored
# object whose id was masked answers no one (its GET, export and erasure look it up by id).
_NOT_TEXT = frozenset({"id", "object", "type", "status", "role", "model", "call_id", "item_id",
                       "previous_response_id", "response_id", "container_id"})


def _masked(obj, masker: Masker):
    if isinstance(obj, str):
        return masker.mask(obj)
    if isinstance(obj, list):
        return [_masked(x, masker) for x in obj]
    if isinstance(obj, dict):
        return {k: v if k in _NOT_TEXT else _masked(v, masker) for k, v in obj.items()}
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
