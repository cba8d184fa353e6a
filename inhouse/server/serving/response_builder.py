"""Harmony events -> the Responses API's stream events and output items (the official event
sequence), with each output token's logprobs when asked for."""

from __future__ import annotations

import json
import time

from inhouse.harmony import (BuiltinCallDelta, BuiltinCallDone, ContentDelta, MessageDone,
                             ReasoningDelta, ToolCallDelta, ToolCallDone)
from inhouse.pipeline import Finished, TokenEvent
from inhouse.pipeline.tools import AnswerCitations, ToolCallFinished, ToolCallStarted
from inhouse.server.serving.common import logprob_entry, new_id, url_citations


def _action(recipient: str, arguments: str) -> dict:
    """A browser call as web_search_call's action (search, open_page, find_in_page)."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = {}
    args = args if isinstance(args, dict) else {}
    function = recipient.partition(".")[2]
    if function == "search":
        return {"type": "search", "query": str(args.get("query", ""))}
    target = args.get("id")
    url = target if isinstance(target, str) else None
    if function == "find":
        return {"type": "find_in_page", "pattern": str(args.get("pattern", "")), "url": url or ""}
    return {"type": "open_page", "url": url}


class ResponseBuilder:
    """Harmony events -> Responses stream events and output items."""

    def __init__(self, skeleton: dict, with_logprobs: bool = False,
                 num_dropped_items: int = 0) -> None:
        self.response = skeleton
        self.output: list[dict] = self.response["output"]
        self.seq = 0
        self.item: dict | None = None  # the item being written
        self.with_logprobs = with_logprobs
        self.pending: TokenEvent | None = None  # the token whose text comes next
        self.num_dropped_items = num_dropped_items  # by truncation "auto"
        self.container_id: str | None = None  # python's, when the turn has it
        self.tool_item: dict | None = None  # a built-in call: written, then run, then done
        self.with_sources = False  # include "web_search_call.action.sources"

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
        if item["type"] in ("code_interpreter_call", "web_search_call"):
            return []  # done when the server has run it (`ToolCallFinished`)
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
                                  logprobs=list(part["logprobs"])),
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
        if isinstance(ev, TokenEvent):
            self.pending = ev
        elif isinstance(ev, ReasoningDelta):
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
            part = self.item["content"][0]
            part["text"] += ev.text
            new = self._logprobs()
            part["logprobs"] += new
            events.append(self.event("response.output_text.delta", item_id=self.item["id"],
                                     output_index=len(self.output) - 1, content_index=0,
                                     delta=ev.text, logprobs=new))
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
        elif isinstance(ev, (BuiltinCallDelta, BuiltinCallDone, ToolCallStarted,
                             ToolCallFinished)):
            events += self._builtin(ev)
        elif isinstance(ev, AnswerCitations):
            events += self._annotate(ev)
        elif isinstance(ev, MessageDone):
            events += self.close()
        return events

    # ---- built-in tools: code_interpreter_call and web_search_call items ----------------------
    def _builtin(self, ev) -> list[dict]:
        events: list[dict] = []
        python = ev.recipient == "python"
        if isinstance(ev, BuiltinCallDelta) or (isinstance(ev, BuiltinCallDone)
                                                 and self.tool_item is None):
            if self.tool_item is None:
                events += self.close()
                if python:
                    item = {"id": new_id("ci"), "type": "code_interpreter_call",
                            "status": "in_progress", "code": "",
                            "container_id": self.container_id or "", "outputs": None}
                else:
                    item = {"id": new_id("ws"), "type": "web_search_call",
                            "status": "in_progress", "action": {"type": "search", "query": ""}}
                events += self._open(item, None)
                self.tool_item = item
                kind = "code_interpreter_call" if python else "web_search_call"
                events.append(self._tool_event(f"response.{kind}.in_progress"))
            if python and isinstance(ev, BuiltinCallDelta):
                self.tool_item["code"] += ev.text
                events.append(self._tool_event("response.code_interpreter_call_code.delta",
                                               delta=ev.text))
        if self.tool_item is None:
            return events
        item = self.tool_item
        if isinstance(ev, BuiltinCallDone) and python:
            item["code"] = ev.text
            events.append(self._tool_event("response.code_interpreter_call_code.done",
                                           code=ev.text))
        elif isinstance(ev, ToolCallStarted):
            if python:
                item["status"] = "interpreting"
                events.append(self._tool_event("response.code_interpreter_call.interpreting"))
            else:
                item["action"] = _action(ev.recipient, ev.arguments)
                item["status"] = "searching"
                events.append(self._tool_event("response.web_search_call.searching"))
        elif isinstance(ev, ToolCallFinished):
            if self.with_sources and ev.sources and item["action"].get("type") == "search":
                item["action"]["sources"] = [{"type": "url", "url": u} for u in ev.sources]
            events += self._tool_done(ev.status,
                                      [{"type": "logs", "logs": ev.output}] if python else None)
        return events

    def _tool_event(self, type_: str, **fields) -> dict:
        return self.event(type_, item_id=self.tool_item["id"],
                          output_index=self.output.index(self.tool_item), **fields)

    def _tool_done(self, status: str, outputs: list | None) -> list[dict]:
        item = self.tool_item
        item["status"] = status  # completed, failed or incomplete: valid for both item types
        if item["type"] == "code_interpreter_call":
            item["outputs"] = outputs
            kind = "code_interpreter_call"
        else:
            kind = "web_search_call"
        events = []
        if status == "completed":
            events.append(self._tool_event(f"response.{kind}.completed"))
        events.append(self.event("response.output_item.done",
                                 output_index=self.output.index(item),
                                 item=json.loads(json.dumps(item))))
        self.tool_item = None
        if self.item is item:
            self.item = None
        return events

    def _annotate(self, ev: AnswerCitations) -> list[dict]:
        """url_citation annotations on the answer's citation marks (on the last message)."""
        events: list[dict] = []
        message = next((o for o in reversed(self.output) if o["type"] == "message"), None)
        if message is None or not message["content"]:
            return events
        part = message["content"][0]
        for span in url_citations(part["text"], ev.citations):
            note = {"type": "url_citation"} | span
            part["annotations"].append(note)
            events.append(self.event("response.output_text.annotation.added",
                                     item_id=message["id"],
                                     output_index=self.output.index(message), content_index=0,
                                     annotation_index=len(part["annotations"]) - 1,
                                     annotation=dict(note)))
        return events

    def _logprobs(self) -> list[dict]:
        """The pending token's entry (once: a token's text may come in more than one delta)."""
        tok, self.pending = self.pending, None
        if not self.with_logprobs or tok is None or tok.logprob is None:
            return []
        return [logprob_entry(tok.logprob)]

    def finish(self, f: Finished) -> list[dict]:
        events = self.close()
        if self.tool_item is not None:  # written but never run (the turn's limits)
            events += self._tool_done("incomplete", None)
        r = self.response
        r["status"] = "incomplete" if f.finish_reason == "length" else "completed"
        if f.finish_reason == "length":
            r["incomplete_details"] = {"reason": "max_output_tokens"}
        if f.finish_reason == "error":
            r["status"] = "failed"
            r["error"] = {"code": "server_error", "message": f"generation failed: {f.error}"}
        r["completed_at"] = time.time()
        r["usage"] = {"input_tokens": f.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": f.cached_tokens,
                                               "cache_write_tokens": 0,
                                               # truncation "auto": conversation items dropped
                                               "truncated_items": self.num_dropped_items},
                      "output_tokens": f.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": f.reasoning_tokens},
                      "total_tokens": f.prompt_tokens + f.completion_tokens}
        kind = {"completed": "response.completed", "incomplete": "response.incomplete",
                "failed": "response.failed"}[r["status"]]
        return events + [self.event(kind, response=json.loads(json.dumps(r)))]
