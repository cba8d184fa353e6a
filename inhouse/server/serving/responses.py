"""POST /v1/responses: items in, output items out (reasoning, function_call, message), streamed
with the official event sequence; `store` and `previous_response_id` through `ResponseStore`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from inhouse.config import ServerSettings
from inhouse.engine import EngineClient, SamplingParams
from inhouse.harmony import (ChatMessage, ContentDelta, ConversationError, FunctionTool,
                             MessageDone, PromptOptions, ReasoningDelta, ToolCall, ToolCallDelta,
                             ToolCallDone, tool_call_prefix)
from inhouse.pipeline import ChatTurn, Finished, TokenEvent, stream_chat
from inhouse.server.errors import APIError
from inhouse.server.audit import Auditor
from inhouse.server.pii import EventRestorer, apply_pii_policy
from inhouse.server.metrics import Metrics
from inhouse.server.protocol.responses import (FunctionCallItem, FunctionCallOutputItem,
                                               MessageItem, NamedFunction, ReasoningItem,
                                               ResponsesRequest)
from inhouse.server.serving.common import (EFFORT, check_model, max_tokens_for, new_id,
                                           seed_for, start_streams)
from inhouse.server.store import ResponseStore


class ResponseBuilder:
    """Harmony events -> Responses stream events and output items."""

    def __init__(self, skeleton: dict) -> None:
        self.response = skeleton
        self.output: list[dict] = self.response["output"]
        self.seq = 0
        self.item: dict | None = None  # the item being written

    def event(self, type_: str, **fields) -> dict:
        e = {"type": type_, "sequence_number": self.seq} | fields
        self.seq += 1
        return e

    def start(self) -> list[dict]:
        snapshot = json.loads(json.dumps(self.response))
        return [self.event("response.created", response=snapshot),
                self.event("response.in_progress", response=snapshot)]

    def _open(self, item: dict, part: dict | None) -> list[dict]:
        self.item = item
        self.output.append(item)
        idx = len(self.output) - 1
        events = [self.event("response.output_item.added", output_index=idx,
                             item=json.loads(json.dumps(item)))]
        if part is not None:
            item["content"].append(part)
            events.append(self.event("response.content_part.added", item_id=item["id"],
                                     output_index=idx, content_index=0, part=dict(part)))
        return events

    def close(self) -> list[dict]:
        item, self.item = self.item, None
        if item is None:
            return []
        idx = self.output.index(item)
        item["status"] = "completed"
        events = []
        if item["type"] == "reasoning":
            part = item["content"][0]
            events += [self.event("response.reasoning_text.done", item_id=item["id"],
                                  output_index=idx, content_index=0, text=part["text"]),
                       self.event("response.content_part.done", item_id=item["id"],
                                  output_index=idx, content_index=0, part=dict(part))]
        elif item["type"] == "message":
            part = item["content"][0]
            events += [self.event("response.output_text.done", item_id=item["id"],
                                  output_index=idx, content_index=0, text=part["text"],
                                  logprobs=[]),
                       self.event("response.content_part.done", item_id=item["id"],
                                  output_index=idx, content_index=0, part=dict(part))]
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=idx, arguments=item["arguments"]))
        events.append(self.event("response.output_item.done", output_index=idx,
                                 item=json.loads(json.dumps(item))))
        return events

    def on(self, ev) -> list[dict]:
        events: list[dict] = []
        if isinstance(ev, ReasoningDelta):
            if self.item is None or self.item["type"] != "reasoning":
                events += self.close()
                events += self._open({"id": new_id("rs"), "type": "reasoning", "summary": [],
                                      "content": [], "status": "in_progress"},
                                     {"type": "reasoning_text", "text": ""})
            self.item["content"][0]["text"] += ev.text
            events.append(self.event("response.reasoning_text.delta", item_id=self.item["id"],
                                     output_index=len(self.output) - 1, content_index=0,
                                     delta=ev.text))
        elif isinstance(ev, ContentDelta):
            if self.item is None or self.item["type"] != "message":
                events += self.close()
                events += self._open({"id": new_id("msg"), "type": "message", "role": "assistant",
                                      "status": "in_progress", "content": []},
                                     {"type": "output_text", "text": "", "annotations": [],
                                      "logprobs": []})
            self.item["content"][0]["text"] += ev.text
            events.append(self.event("response.output_text.delta", item_id=self.item["id"],
                                     output_index=len(self.output) - 1, content_index=0,
                                     delta=ev.text, logprobs=[]))
        elif isinstance(ev, ToolCallDelta):
            if ev.name is not None:
                events += self.close()
                events += self._open({"id": new_id("fc"), "type": "function_call",
                                      "call_id": new_id("call"), "name": ev.name,
                                      "arguments": "", "status": "in_progress"}, None)
            if self.item is not None and self.item["type"] == "function_call":
                self.item["arguments"] += ev.arguments
                events.append(self.event("response.function_call_arguments.delta",
                                         item_id=self.item["id"],
                                         output_index=len(self.output) - 1, delta=ev.arguments))
        elif isinstance(ev, ToolCallDone):
            if self.item is not None and self.item["type"] == "function_call":
                self.item["arguments"] = ev.arguments
        elif isinstance(ev, MessageDone):
            events += self.close()
        return events

    def finish(self, f: Finished) -> list[dict]:
        events = self.close()
        r = self.response
        r["status"] = "incomplete" if f.finish_reason == "length" else "completed"
        if f.finish_reason == "length":
            r["incomplete_details"] = {"reason": "max_output_tokens"}
        if f.finish_reason == "error":
            r["status"] = "failed"
            r["error"] = {"code": "server_error", "message": f"generation failed: {f.error}"}
        r["completed_at"] = time.time()
        r["usage"] = {"input_tokens": f.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": f.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": f.reasoning_tokens},
                      "total_tokens": f.prompt_tokens + f.completion_tokens}
        kind = {"completed": "response.completed", "incomplete": "response.incomplete",
                "failed": "response.failed"}[r["status"]]
        return events + [self.event(kind, response=json.loads(json.dumps(r)))]


async def _unmasked(stream, unmask: EventRestorer):
    try:
        async for raw in stream:
            for ev in unmask(raw):
                yield ev
    finally:
        await stream.aclose()


class Responses:
    def __init__(self, client: EngineClient, settings: ServerSettings, metrics: Metrics,
                 store: ResponseStore, auditor: Auditor) -> None:
        self.client, self.settings, self.metrics, self.store = client, settings, metrics, store
        self.auditor = auditor

    # ---- request -> turn ---------------------------------------------------------------------
    async def _history(self, req: ResponsesRequest) -> list[dict]:
        """All input items: the stored conversation of previous_response_id, then this input."""
        items: list[dict] = []
        if req.previous_response_id:
            found = await asyncio.to_thread(self.store.get, req.previous_response_id)
            if found is None:
                raise APIError(404, f"no stored response '{req.previous_response_id}'",
                               param="previous_response_id", code="response_not_found")
            previous, previous_input = found
            items += previous_input + [o for o in previous["output"]]
        if isinstance(req.input, str):
            items.append({"type": "message", "role": "user", "content": req.input})
        else:
            items += [i.model_dump(exclude_none=True) for i in req.input]
        return items

    @staticmethod
    def _messages(items: list[dict], instructions: str | None) -> list[ChatMessage]:
        msgs = [ChatMessage("developer", instructions)] if instructions else []
        names: dict[str, str] = {}
        for n, raw in enumerate(items):
            kind = raw.get("type", "message")
            if kind == "message":
                m = MessageItem.model_validate(raw)
                msgs.append(ChatMessage(m.role, m.text()))
            elif kind == "reasoning":
                r = ReasoningItem.model_validate(raw)
                text = "".join(c.text for c in (r.content or [])) or "".join(s.text for s in r.summary)
                if text:
                    msgs.append(ChatMessage("assistant", reasoning=text))
            elif kind == "function_call":
                c = FunctionCallItem.model_validate({k: v for k, v in raw.items()})
                names[c.call_id] = c.name
                msgs.append(ChatMessage("assistant", tool_calls=(ToolCall(c.name, c.arguments, c.call_id),)))
            elif kind == "function_call_output":
                o = FunctionCallOutputItem.model_validate(raw)
                if o.call_id not in names:
                    raise APIError(400, f"input[{n}]: function_call_output for unknown call_id "
                                        f"'{o.call_id}'", param=f"input[{n}].call_id")
                msgs.append(ChatMessage("tool", o.output, name=names[o.call_id], tool_call_id=o.call_id))
        return msgs

    async def _turn(self, req: ResponsesRequest, response_id: str):
        adapter = check_model(req.model, self.settings)
        if req.background:
            raise APIError(400, "background responses are not supported", param="background")
        items = await self._history(req)
        tools = tuple(FunctionTool(t.name, t.description or "", t.parameters) for t in (req.tools or []))
        prefix: list[int] = []
        if req.tool_choice == "none":
            tools = ()
        elif req.tool_choice == "required":
            if not tools:
                raise APIError(400, "tool_choice is 'required' but no tools were given",
                               param="tool_choice")
            prefix = tool_call_prefix(None)
        elif isinstance(req.tool_choice, NamedFunction):
            if req.tool_choice.name not in {t.name for t in tools}:
                raise APIError(400, f"tool_choice names '{req.tool_choice.name}', which is not "
                                    "among the tools", param="tool_choice")
            prefix = tool_call_prefix(req.tool_choice.name)
        effort = EFFORT[(req.reasoning.effort if req.reasoning else None) or "medium"]
        params = SamplingParams(
            max_tokens=max_tokens_for(req.max_output_tokens, self.client, self.settings,
                                      "max_output_tokens"),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, seed=seed_for(req.seed, 0),
            adapter=adapter)
        try:
            messages = self._messages(items, req.instructions)
            options = PromptOptions(effort, time.strftime("%Y-%m-%d"), tools=tools)
        except ConversationError as e:
            raise APIError(400, str(e), param="input") from None
        messages, masker, labels = apply_pii_policy(self.settings, messages)
        turn = ChatTurn(tuple(messages), options, params, response_id, tuple(prefix))
        return turn, items, labels, EventRestorer(masker)

    def _skeleton(self, req: ResponsesRequest, response_id: str) -> dict:
        effort = (req.reasoning.effort if req.reasoning else None) or "medium"
        tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) \
            else (req.tool_choice or "auto")
        return {
            "id": response_id, "object": "response", "created_at": time.time(),
            "status": "in_progress", "completed_at": None, "error": None,
            "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "model": req.model,
            "output": [], "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": effort, "summary": None}, "store": req.store,
            "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": {"type": "text"}}, "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in (req.tools or [])],
            "truncation": req.truncation or "disabled", "usage": None, "user": req.user,
            "metadata": req.metadata or {},
        }

    async def _start(self, req: ResponsesRequest, subject: str | None, key_id: str | None = None):
        response_id = new_id("resp")
        turn, items, labels, unmask = await self._turn(req, response_id)
        await self.auditor.start(response_id, "/v1/responses", subject, turn, key_id, labels)
        try:
            (stream,) = await start_streams([stream_chat(self.client, turn)])
        except APIError as e:
            await self.auditor.refused(response_id, subject, e.status)
            raise
        return ResponseBuilder(self._skeleton(req, response_id)), _unmasked(stream, unmask), items

    async def _finish(self, req, builder: ResponseBuilder, items, f: Finished,
                      subject: str | None) -> list[dict]:
        events = builder.finish(f)
        self.metrics.observe_turn(f)
        text = "".join(p["text"] for o in builder.output if o["type"] == "message"
                       for p in o["content"])
        await self.auditor.complete(builder.response["id"], subject, f, text)
        if req.store:
            await asyncio.to_thread(self.store.save, builder.response, items)
        return events

    # ---- API ------------------------------------------------------------------------------------
    async def create(self, req: ResponsesRequest, subject: str | None = None,
                     key_id: str | None = None) -> dict:
        builder, stream, items = await self._start(req, subject, key_id)
        async for ev in stream:
            if isinstance(ev, Finished):
                await self._finish(req, builder, items, ev, subject)
            elif not isinstance(ev, TokenEvent):
                builder.on(ev)
        return builder.response

    async def stream(self, req: ResponsesRequest, subject: str | None = None,
                     key_id: str | None = None) -> AsyncIterator[str]:
        builder, stream, items = await self._start(req, subject, key_id)  # may raise
        return self._sse(req, builder, stream, items, subject)

    async def _sse(self, req, builder, stream, items, subject) -> AsyncIterator[str]:
        def sse(e: dict) -> str:
            return f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n"

        for e in builder.start():
            yield sse(e)
        try:
            async for ev in stream:
                if isinstance(ev, Finished):
                    events = await self._finish(req, builder, items, ev, subject)
                elif isinstance(ev, TokenEvent):
                    continue
                else:
                    events = builder.on(ev)
                for e in events:
                    yield sse(e)
        finally:
            await stream.aclose()

    async def get(self, response_id: str) -> dict:
        found = await asyncio.to_thread(self.store.get, response_id)
        if found is None:
            raise APIError(404, f"no stored response '{response_id}'", code="response_not_found")
        return found[0]

    async def delete(self, response_id: str) -> dict:
        if not await asyncio.to_thread(self.store.delete, response_id):
            raise APIError(404, f"no stored response '{response_id}'", code="response_not_found")
        return {"id": response_id, "object": "response", "deleted": True}
