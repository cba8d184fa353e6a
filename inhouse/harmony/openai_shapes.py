"""The one converter from OpenAI's shapes (chat messages, Responses input items, function tools)
to `ChatMessage`/`FunctionTool`: the server's two APIs and fine-tuning data use it, so a
conversation means the same thing wherever it comes from.

Input is plain JSON (dicts and lists, as parsed). Every refusal is a `ConversationError` whose
`param` names the place (`messages[2].content`, `input[3].call_id`, `tools[0]`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from inhouse.harmony.conversation import ChatMessage, ConversationError, FunctionTool, ToolCall

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
ROLES = ("system", "developer", "user", "assistant", "tool")
ITEM_ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("text", "input_text", "output_text", "reasoning_text", "summary_text")


def _fail(message: str, param: str) -> ConversationError:
    return ConversationError(f"{param}: {message}", param=param)


def text_of(content: Any, param: str) -> str:
    """A string, null, or a list of text parts -> the text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or not isinstance(p.get("text"), str) \
                    or p.get("type", "text") not in TEXT_PARTS:
                raise _fail("only text content parts ({\"type\": \"text\", \"text\": ...}) are "
                            "supported", f"{param}[{j}]")
            parts.append(p["text"])
        return "".join(parts)
    raise _fail("content must be a string or a list of text parts", param)


def _arguments(args: Any, param: str) -> str:
    if isinstance(args, (dict, list)):
        return json.dumps(args, ensure_ascii=False)
    if not isinstance(args, str):
        raise _fail("arguments must be a JSON string", param)
    return args  # as the model wrote it, valid JSON or not: a conversation is replayed as it was


def messages_from_chat(raw: Any, param: str = "messages") -> list[ChatMessage]:
    """Chat Completions `messages` -> ChatMessages."""
    if not isinstance(raw, list) or not raw:
        raise _fail("must be a non-empty list of messages", param)
    out = []
    for i, m in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise _fail("a message must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise _fail(f"unknown role {role!r} (expected one of {', '.join(ROLES)})",
                        f"{where}.role")
        content = text_of(m.get("content"), f"{where}.content")
        reasoning = m.get("reasoning") or m.get("reasoning_content") or m.get("thinking")
        if role != "assistant" and (m.get("tool_calls") or reasoning):
            raise _fail("only assistant messages carry tool_calls or reasoning", where)
        if role == "assistant":
            calls = tuple(_chat_call(c, f"{where}.tool_calls[{j}]")
                          for j, c in enumerate(m.get("tool_calls") or []))
            if reasoning is not None and not isinstance(reasoning, str):
                raise _fail("reasoning must be a string", f"{where}.reasoning")
            if not (content or reasoning or calls):
                raise _fail("an assistant message needs content, tool_calls or reasoning", where)
            out.append(ChatMessage("assistant", content, reasoning or None, calls))
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _fail("a tool message needs 'tool_call_id'", f"{where}.tool_call_id")
            out.append(ChatMessage("tool", content, name=m.get("name"), tool_call_id=call_id))
        else:
            if role == "user" and not content:
                raise _fail("the user message is empty", f"{where}.content")
            out.append(ChatMessage(role, content))
    check_tool_results(out, param)
    return out


def _chat_call(c: Any, where: str) -> ToolCall:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _fail("a tool call needs function.name", where)
    return ToolCall(fn["name"], _arguments(fn.get("arguments", "{}"), f"{where}.function.arguments"),
                    str(c.get("id") or ""))


BUILTIN_CALL_ITEMS = ("web_search_call", "code_interpreter_call")


def messages_from_items(raw: Any, instructions: str | None = None,
                        param: str = "input") -> list[ChatMessage]:
    """Responses `input` (a string or items) and `instructions` -> ChatMessages. A reasoning item
    belongs to the assistant message or call after it; several calls in a row are one turn."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise _fail("must be a string or a list of items", param)
    out: list[ChatMessage] = [ChatMessage("developer", instructions)] if instructions else []
    reasoning: str | None = None
    open_calls: list[str] = []  # call ids not yet answered

    def assistant(**kw) -> None:
        nonlocal reasoning
        out.append(ChatMessage("assistant", reasoning=reasoning, **kw))
        reasoning = None

    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise _fail("an item must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ITEM_ROLES:
                raise _fail(f"unknown role {role!r}", f"{where}.role")
            text = text_of(item.get("content"), f"{where}.content")
            if role == "assistant":
                if text or reasoning is not None:
                    assistant(content=text)
            elif role == "user" and not text:
                raise _fail("the user message is empty", f"{where}.content")
            else:
                out.append(ChatMessage(role, text))
        elif kind == "reasoning":
            text = text_of(item.get("content") or item.get("summary") or [], f"{where}.content")
            reasoning = (reasoning or "") + text if text else reasoning
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise _fail("a function_call needs a name", f"{where}.name")
            call = ToolCall(name, _arguments(item.get("arguments", "{}"), f"{where}.arguments"),
                            str(item.get("call_id") or ""))
            open_calls.append(call.id)
            prev = out[-1] if out else None
            if prev is not None and prev.role == "assistant" and not prev.content \
                    and prev.tool_calls and reasoning is None:
                out[-1] = ChatMessage("assistant", reasoning=prev.reasoning,
                                      tool_calls=prev.tool_calls + (call,))
            else:
                assistant(tool_calls=(call,))
        elif kind == "function_call_output":
            output = item.get("output")
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _fail("a function_call_output needs 'call_id'", f"{where}.call_id")
            if call_id not in open_calls:
                raise _fail(f"function_call_output for unknown call_id {call_id!r}: it answers "
                            "no earlier, unanswered function_call", f"{where}.call_id")
            open_calls.remove(call_id)
            out.append(ChatMessage("tool", output if isinstance(output, str)
                                   else json.dumps(output, ensure_ascii=False),
                                   tool_call_id=call_id))
        elif kind in BUILTIN_CALL_ITEMS:
            # an earlier turn's built-in calls ran in its analysis, which harmony drops once that
            # turn has answered: they are history the model does not read again
            continue
        else:
            raise _fail(f"unknown item type {kind!r}", f"{where}.type")
    if reasoning is not None:  # a turn cut off after its reasoning (max_output_tokens)
        assistant()
    return out


def check_tool_results(messages: list[ChatMessage], param: str) -> None:
    """Every tool result answers an earlier, still unanswered call (by id when ids are given)."""
    open_ids: list[str] = []
    open_calls = 0
    for i, m in enumerate(messages):
        if m.role == "assistant":
            open_ids += [c.id for c in m.tool_calls if c.id]
            open_calls += len(m.tool_calls)
        elif m.role == "tool":
            if open_calls == 0 or (m.tool_call_id and open_ids and m.tool_call_id not in open_ids):
                raise _fail(f"tool result without a preceding tool call (call id "
                            f"{m.tool_call_id!r} answers no earlier, unanswered call)",
                            f"{param}[{i}]")
            if m.tool_call_id in open_ids:
                open_ids.remove(m.tool_call_id)
            open_calls -= 1


def function_tools(raw: Any, param: str = "tools") -> tuple[FunctionTool, ...]:
    """Function tools in either shape: chat nests them under "function", Responses does not."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail("must be a list of tools", param)
    tools = []
    for i, t in enumerate(raw):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _fail("a function tool needs a name", f"{param}[{i}]")
        if not FUNCTION_NAME.fullmatch(fn["name"]):  # it goes into harmony's header as is
            raise _fail("a function name must be 1 to 64 letters, digits, '_' or '-'",
                        f"{param}[{i}].name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _fail("parameters must be a JSON schema object", f"{param}[{i}].parameters")
        tools.append(FunctionTool(fn["name"], fn.get("description") or "", params,
                                  fn.get("strict") is True))
    return tuple(tools)
