"""POST /v1/responses: items in, output items out (reasoning, function_call, message), streamed
with the official event sequence; `store` and `previous_response_id` through `ResponseStore`;
a stored response read back, its input items listed, deleted."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from inhouse.config import ServerSettings
from inhouse.engine import EngineClient, SamplingParams
from inhouse.errors import RequestError
from inhouse.governance.responses_store import ResponseStore
from inhouse.governance.tenancy import Caller
from inhouse.harmony import ConversationError, PromptOptions
from inhouse.harmony.constraints import AnswerFormat, ToolChoice, turn_constraint
from inhouse.harmony.openai_shapes import function_tools, messages_from_items
from inhouse.pipeline import Finished, GovernedTurns, TurnRequest
from inhouse.pipeline.truncation import fit_to_context
from inhouse.server.errors import APIError
from inhouse.server.protocol.responses import NamedFunction, ResponsesRequest
from inhouse.server.serving.common import EFFORT, check_model, max_tokens_for, new_id, seed_for
from inhouse.server.serving.builtin import builtin_from_responses
from inhouse.server.serving.input_items import new_item_id, page
from inhouse.server.serving.response_builder import ResponseBuilder

# what `include` can ask for that we serve: every other value is refused, never ignored
INCLUDABLE = ("message.output_text.logprobs",
              "code_interpreter_call.outputs",  # always included: asking for them is fine
              "web_search_call.action.sources")


class Responses:
    def __init__(self, client: EngineClient, settings: ServerSettings,
                 governed: GovernedTurns) -> None:
        self.client, self.settings, self.governed = client, settings, governed

    @property
    def store(self) -> ResponseStore | None:
        return self.governed.store

    # ---- request -> turn ---------------------------------------------------------------------
    async def _history(self, req: ResponsesRequest, caller: Caller) -> list[dict]:
        """All input items: the stored conversation of previous_response_id (the caller's
        tenant's alone), then this input."""
        items: list[dict] = []
        if req.previous_response_id:
            found = await self._stored(req.previous_response_id, caller, "previous_response_id")
            previous, previous_input = found
            items += previous_input + [o for o in previous["output"]]
        if isinstance(req.input, str):
            new = [{"type": "message", "role": "user", "content": req.input}]
        else:
            new = [i.model_dump(exclude_none=True) for i in req.input]
        for item in new:  # stored with an id of its own, which input_items lists
            item.setdefault("id", new_item_id(item, new_id))
        return items + new

    async def _stored(self, response_id: str, caller: Caller, param: str | None = None):
        found = None
        if self.store is not None:
            found = await asyncio.to_thread(self.store.get, response_id, caller)
        if found is None:  # another tenant's response does not exist for this caller
            raise APIError(404, f"no stored response '{response_id}'", param=param,
                           code="response_not_found")
        return found

    async def _plan(self, req: ResponsesRequest, response_id: str,
                    caller: Caller) -> tuple[TurnRequest, list[dict]]:
        adapter = check_model(req.model, self.settings)
        if req.background:
            raise APIError(400, "background responses are not supported", param="background")
        # nothing a client sends is silently ignored: what is not served is refused
        for value in req.include or ():
            if value not in INCLUDABLE:
                raise APIError(400, f"'include' value {value!r} is not supported; this server "
                                    f"serves {', '.join(INCLUDABLE)}", param="include")
        items = await self._history(req, caller)
        tools = function_tools([t.model_dump() for t in (req.tools or []) if t.type == "function"])
        builtin = builtin_from_responses(req.tools, self.settings)
        builtin_names = builtin.names if builtin is not None else ()
        effort = EFFORT[(req.reasoning.effort if req.reasoning else None) or "medium"]
        messages = messages_from_items(items, req.instructions)
        answer = None
        fmt = req.text.format if req.text is not None else None
        if fmt is not None and fmt.type == "json_schema":
            answer = AnswerFormat(fmt.name, fmt.schema_, "text.format.schema", fmt.description)
        elif fmt is not None and fmt.type == "json_object":
            answer = AnswerFormat("json_object", None, "text.format")
        choice = req.tool_choice
        constraint = await asyncio.to_thread(  # off the event loop: a large schema takes a while
            turn_constraint, answer, tools, ToolChoice(name=choice.name)
            if isinstance(choice, NamedFunction) else ToolChoice(choice or "auto"), "tools",
            builtin_names)
        if constraint.instructions is not None:
            messages.append(constraint.instructions)
        params = SamplingParams(
            max_tokens=max_tokens_for(req.max_output_tokens, self.client, self.settings,
                                      "max_output_tokens"),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, seed=seed_for(req.seed, 0),
            logprobs=(req.top_logprobs or 0) if self._with_logprobs(req) else None,
            adapter=adapter, grammar=constraint.grammar)
        try:
            options = PromptOptions(effort, time.strftime("%Y-%m-%d"), tools=tools,
                                    builtin_tools=builtin_names,
                                    python_timeout_s=self.settings.python_timeout_s)
        except ConversationError as e:
            raise APIError(400, str(e), param="input") from None
        dropped = 0
        if req.truncation == "auto":
            context = self.client.model_config.max_position_embeddings
            room = params.max_tokens if params.max_tokens < context else 1
            fitted = await fit_to_context(messages, options, self.governed.offload.render,
                                          context - room)
            messages, dropped = fitted.messages, fitted.num_dropped
        plan = TurnRequest("/v1/responses", caller, tuple(messages), options, (params,),
                           (response_id,), {"truncated_items": dropped} if dropped else {},
                           builtin)
        return plan, items

    @staticmethod
    def _with_logprobs(req: ResponsesRequest) -> bool:
        return "message.output_text.logprobs" in (req.include or ()) or req.top_logprobs is not None

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
            "temperature": req.temperature, "top_p": req.top_p, "top_logprobs": req.top_logprobs,
            "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                     if req.text is not None and req.text.format is not None
                     else {"type": "text"}}, "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in (req.tools or [])],
            "truncation": req.truncation or "disabled", "usage": None, "user": req.user,
            "metadata": req.metadata or {},
        }

    async def _start(self, req: ResponsesRequest, caller: Caller):
        response_id = new_id("resp")
        plan, items = await self._plan(req, response_id, caller)
        turn = await self.governed.start(plan)
        builder = ResponseBuilder(self._skeleton(req, response_id), self._with_logprobs(req),
                                  plan.audit_extra.get("truncated_items", 0))
        if turn.tools and turn.tools[0] is not None:
            builder.container_id = turn.tools[0].container_id
        builder.with_sources = "web_search_call.action.sources" in (req.include or ())
        return builder, turn, items

    async def _finish(self, req, builder: ResponseBuilder, turn, items, f: Finished) -> list[dict]:
        events = builder.finish(f)
        if self.governed.should_store(req.store if "store" in req.model_fields_set else None):
            await self.governed.save(turn, builder.response, items)
        return events

    # ---- API ------------------------------------------------------------------------------------
    async def create(self, req: ResponsesRequest, caller: Caller) -> dict:
        builder, turn, items = await self._start(req, caller)
        (stream,) = turn.streams
        try:
            async for ev in stream:
                if isinstance(ev, Finished):
                    await self._finish(req, builder, turn, items, ev)
                else:
                    builder.on(ev)
        finally:
            await stream.aclose()
        return builder.response

    async def stream(self, req: ResponsesRequest, caller: Caller) -> AsyncIterator[str]:
        builder, turn, items = await self._start(req, caller)  # may raise
        return self._sse(req, builder, turn, items)

    async def _sse(self, req, builder, turn, items) -> AsyncIterator[str]:
        def sse(e: dict) -> str:
            return f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n"

        (stream,) = turn.streams
        try:
            for e in builder.start():
                yield sse(e)
            async for ev in stream:
                if isinstance(ev, Finished):
                    events = await self._finish(req, builder, turn, items, ev)
                else:
                    events = builder.on(ev)
                for e in events:
                    yield sse(e)
        except RequestError as e:  # refused mid-turn (the policy guard on the answer)
            yield sse(builder.event("error", code=e.code or "invalid_request_error",
                                    param=e.param, message=str(e)))
        except Exception as e:  # noqa: BLE001 - never a cut stream: the official error event
            logging.getLogger("inhouse.server").exception("%s: stream failed",
                                                          builder.response["id"])
            yield sse(builder.event("error", code="server_error", param=None,
                                    message=f"generation failed ({type(e).__name__})"))
        finally:
            await stream.aclose()

    async def get(self, response_id: str, caller: Caller) -> dict:
        return (await self._stored(response_id, caller))[0]

    async def input_items(self, response_id: str, caller: Caller, after: str | None, limit: int,
                          order: str, include: list[str]) -> dict:
        if include:  # nothing a client asks for is silently ignored
            raise APIError(400, f"'include' is not supported for input items: {include[0]!r}",
                           param="include")
        _, items = await self._stored(response_id, caller)
        return page(items, response_id, after, limit, order)

    async def delete(self, response_id: str, caller: Caller) -> dict:
        deleted = self.store is not None and await asyncio.to_thread(self.store.delete,
                                                                     response_id, caller)
        if not deleted:
            raise APIError(404, f"no stored response '{response_id}'", code="response_not_found")
        return {"id": response_id, "object": "response", "deleted": True}
