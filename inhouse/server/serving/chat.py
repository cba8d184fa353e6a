"""POST /v1/chat/completions: OpenAI chat request -> harmony turns -> engine -> chat JSON / SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from inhouse import __version__
from inhouse.config import ServerSettings
from inhouse.engine import EngineClient, SamplingParams
from inhouse.governance.tenancy import Caller
from inhouse.harmony import (ContentDelta, ConversationError, ParseWarning,
                             PromptOptions, ReasoningDelta, ToolCallDelta, ToolCallDone)
from inhouse.harmony.constraints import AnswerFormat, ToolChoice, turn_constraint
from inhouse.harmony.openai_shapes import function_tools, messages_from_chat
from inhouse.pipeline import Finished, GovernedTurns, TokenEvent, TurnRequest
from inhouse.errors import RequestError
from inhouse.server.errors import APIError, from_engine_error
from inhouse.server.protocol.chat import ChatCompletionRequest, NamedToolChoice
from inhouse.pipeline.tools import AnswerCitations
from inhouse.server.serving.builtin import builtin_for_chat
from inhouse.server.serving.common import (EFFORT, StopMatcher, check_model, logprob_entry,
                                           max_tokens_for, merge, new_id, seed_for, url_citations,
                                           usage)

log = logging.getLogger("inhouse.server")


@dataclass
class Choice:
    """What one of the n choices has said so far."""

    index: int
    stop: StopMatcher
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    finished: Finished | None = None
    pending_token: TokenEvent | None = None
    stopped_by_string: bool = False
    request_id: str = ""
    abort_sent: bool = False
    annotations: list[dict] = field(default_factory=list)  # url_citation, from the browser


class ChatCompletions:
    def __init__(self, client: EngineClient, settings: ServerSettings,
                 governed: GovernedTurns) -> None:
        self.client, self.settings, self.governed = client, settings, governed

    # ---- request -> one governed turn of n choices -------------------------------------------
    def plan(self, req: ChatCompletionRequest, request_id: str, caller: Caller) -> TurnRequest:
        """What to run; every refusal of the request's own content raises here."""
        adapter = check_model(req.model, self.settings)
        if req.n > self.settings.max_n:
            raise APIError(400, f"'n' is {req.n}; at most {self.settings.max_n}", param="n")
        messages = messages_from_chat([m.model_dump(exclude_none=True) for m in req.messages])
        answer = None
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_schema":
            spec = fmt.json_schema
            answer = AnswerFormat(spec.name, spec.schema_, "response_format.json_schema.schema",
                                  spec.description)
        elif fmt is not None and fmt.type == "json_object":
            answer = AnswerFormat("json_object", None, "response_format")
        tools = function_tools([t.model_dump() for t in (req.tools or [])])
        builtin = builtin_for_chat(self.settings)  # chat has no built-in tool types: the server's
        names = builtin.names if builtin is not None else ()
        choice = req.tool_choice
        constraint = turn_constraint(
            answer, tools, ToolChoice(name=choice.function.name) if isinstance(
                choice, NamedToolChoice) else ToolChoice(choice or "auto"), "tools", names)
        if constraint.instructions is not None:
            messages.append(constraint.instructions)
        effort = EFFORT[req.reasoning_effort or "medium"]
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = max_tokens_for(req.max_completion_tokens or req.max_tokens, self.client,
                                    self.settings, param)
        if len(self._stops(req)) > 4:
            raise APIError(400, "'stop' takes at most 4 sequences", param="stop")
        try:
            options = PromptOptions(effort, time.strftime("%Y-%m-%d"), tools=tools,
                                    builtin_tools=names,
                                    python_timeout_s=self.settings.python_timeout_s)
        except ConversationError as e:
            raise APIError(400, str(e)) from None
        params = tuple(SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0, seed=seed_for(req.seed, i),
            logprobs=(req.top_logprobs or 0) if req.logprobs else None, adapter=adapter,
            grammar=constraint.grammar)
            for i in range(req.n))
        return TurnRequest("/v1/chat/completions", caller, tuple(messages), options, params,
                           tuple(f"{request_id}-{i}" for i in range(req.n)),
                           {"stop": self._stops(req), "n": req.n}, builtin)

    async def _start(self, req: ChatCompletionRequest, request_id: str, caller: Caller):
        """(choices, their governed streams): refusals raise here, before any output."""
        # off the event loop: compiling a large schema's grammar takes a while
        plan = await asyncio.to_thread(self.plan, req, request_id, caller)
        turn = await self.governed.start(plan)
        choices = [Choice(i, StopMatcher(self._stops(req)), request_id=rid)
                   for i, rid in enumerate(plan.record_ids)]
        return choices, turn.streams

    # ---- events -> choice state --------------------------------------------------------------
    def _apply(self, c: Choice, event, tool_choice) -> dict | None:
        """Update the choice; return the chat delta this event adds (None: nothing to send)."""
        if isinstance(event, TokenEvent):
            c.pending_token = event
            return None
        if isinstance(event, Finished):
            c.finished = event
            tail = c.stop.flush()
            if tail:
                c.content += tail
                return {"content": tail}
            return None
        if isinstance(event, ReasoningDelta):
            c.reasoning += event.text
            return {"reasoning": event.text, "reasoning_content": event.text}
        if isinstance(event, ContentDelta):
            text = c.stop.feed(event.text)
            if c.stop.stopped:
                c.stopped_by_string = True
            self._logprob(c)
            if not text:
                return None
            c.content += text
            return {"content": text}
        if isinstance(event, ToolCallDelta) and tool_choice != "none":
            if event.name is not None:
                c.tool_calls.append({"id": new_id("call"), "type": "function",
                                     "function": {"name": event.name,
                                                  "arguments": event.arguments}})
                first = c.tool_calls[-1]
                return {"tool_calls": [{"index": len(c.tool_calls) - 1, "id": first["id"],
                                        "type": "function",
                                        "function": {"name": event.name, "arguments": event.arguments}}]}
            c.tool_calls[-1]["function"]["arguments"] += event.arguments
            return {"tool_calls": [{"index": len(c.tool_calls) - 1,
                                    "function": {"arguments": event.arguments}}]}
        if isinstance(event, ToolCallDone) and tool_choice != "none" and c.tool_calls:
            c.tool_calls[-1]["function"]["arguments"] = event.arguments
        if isinstance(event, AnswerCitations):
            return self._annotate(c, event)
        if isinstance(event, ParseWarning):
            c.warnings.append(event.message)
        return None

    @staticmethod
    def _annotate(c: Choice, event: AnswerCitations) -> dict | None:
        """The answer's citation marks as chat's url_citation annotations."""
        c.annotations += [{"type": "url_citation", "url_citation": span}
                          for span in url_citations(c.content, event.citations)]
        return {"annotations": list(c.annotations)} if c.annotations else None

    def _logprob(self, c: Choice) -> None:
        tok = c.pending_token
        if tok is None or tok.logprob is None:
            return
        c.pending_token = None
        c.logprobs.append(logprob_entry(tok.logprob))

    @staticmethod
    def _finish_reason(c: Choice) -> str:
        f = c.finished
        if f is None or f.finish_reason == "abort":
            return "stop"
        if f.finish_reason == "error":
            raise APIError(500, f"generation failed: {f.error}", "server_error")
        if c.stopped_by_string:
            return "stop"
        if f.finish_reason == "length":  # a grammar may close a cut call: still cut
            return "length"
        if c.tool_calls:
            return "tool_calls"
        return "stop"

    # ---- non-streaming -------------------------------------------------------------------------
    async def _stop_if_matched(self, c: Choice) -> None:
        """A stop string ended the answer: cancel the rest of its generation."""
        if c.stop.stopped and not c.abort_sent:
            c.abort_sent = True
            await self.client.abort(c.request_id)

    async def create(self, req: ChatCompletionRequest, request_id: str, caller: Caller) -> dict:
        choices, streams = await self._start(req, request_id, caller)
        async for i, event in merge(streams):
            self._apply(choices[i], event, req.tool_choice)
            await self._stop_if_matched(choices[i])
        self._record(choices)
        return {
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "system_fingerprint": self._fingerprint(),
            "choices": [self._choice_body(c, req) for c in choices],
            "usage": usage([c.finished for c in choices if c.finished]),
        }

    def _choice_body(self, c: Choice, req: ChatCompletionRequest) -> dict:
        message = {"role": "assistant", "content": c.content or None,
                   "reasoning": c.reasoning or None, "reasoning_content": c.reasoning or None}
        if c.tool_calls:
            message["tool_calls"] = c.tool_calls
        if c.annotations:
            message["annotations"] = c.annotations
        return {"index": c.index, "message": message, "finish_reason": self._finish_reason(c),
                "logprobs": {"content": c.logprobs} if req.logprobs else None}

    @staticmethod
    def _stops(req: ChatCompletionRequest) -> list[str]:
        return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    @staticmethod
    def _fingerprint() -> str:
        return f"inhouse-{__version__}"

    @staticmethod
    def _record(choices: list[Choice]) -> None:
        for c in choices:
            if c.warnings:  # returned as text; the operator sees why
                log.warning("%s: model output is not valid harmony (%d warnings, first: %s)",
                            c.request_id, len(c.warnings), c.warnings[0])

    # ---- streaming -------------------------------------------------------------------------------
    async def stream(self, req: ChatCompletionRequest, request_id: str,
                     caller: Caller) -> AsyncIterator[str]:
        choices, streams = await self._start(req, request_id, caller)  # may raise
        return self._sse(req, request_id, choices, streams)

    async def _sse_event(self, c: Choice, event, req, chunk) -> AsyncIterator[str]:
        """The SSE lines one (restored) event produces for choice c."""
        seen = len(c.logprobs)
        delta = self._apply(c, event, req.tool_choice)
        await self._stop_if_matched(c)
        if delta is not None:
            lp = {"content": c.logprobs[seen:]} if req.logprobs and "content" in delta else None
            yield chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None}])
        if isinstance(event, Finished):
            try:
                reason = self._finish_reason(c)
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                reason = "stop"
            yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason}])

    async def _sse(self, req, request_id, choices, streams) -> AsyncIterator[str]:
        created, model = int(time.time()), req.model  # the base or "BASE:ADAPTER", as asked

        def chunk(choice_list: list[dict], **extra) -> str:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "system_fingerprint": self._fingerprint(),
                    "choices": choice_list} | extra
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        for c in choices:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        try:
            async for i, event in merge(streams):
                async for line in self._sse_event(choices[i], event, req, chunk):
                    yield line
        except Exception as e:  # noqa: BLE001 - never a cut stream: an error event, then [DONE]
            if isinstance(e, RequestError):  # refused mid-turn (the policy guard on the answer)
                error = from_engine_error(e)
            else:
                log.exception("%s: stream failed", request_id)
                error = APIError(500, f"generation failed ({type(e).__name__})", "server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            self._record(choices)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage=usage([c.finished for c in choices if c.finished]))
        yield "data: [DONE]\n\n"
