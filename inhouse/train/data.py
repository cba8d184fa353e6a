"""Training data: JSONL files of conversations, validated line by line, rendered to harmony.

One JSON object per line, in either of OpenAI's shapes:
  chat:      {"messages": [{"role": "system"|"developer"|"user"|"assistant"|"tool", ...}],
              "tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
              "reasoning_effort": "low"|"medium"|"high"}
             assistant messages may carry "reasoning" (or "reasoning_content"/"thinking") and
             "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}];
             tool messages carry "tool_call_id" (and optionally "name").
  responses: {"input": [items], "tools": [{"type": "function", "name", ...}], ...} with items
             {"role", "content"} messages (content a string or parts with "text"),
             {"type": "reasoning", "content"|"summary": [{"text"}]},
             {"type": "function_call", "call_id", "name", "arguments"},
             {"type": "function_call_output", "call_id", "output"}.
Every error names the file and line: a fine-tune never starts on data it cannot read exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inhouse.errors import InhouseError
from inhouse.harmony.conversation import (EFFORTS, ChatMessage, ConversationError,
                                          FunctionTool, PromptOptions, ToolCall)
from inhouse.harmony.training import TrainingSequence, render_for_training

ROLES = ("system", "developer", "user", "assistant", "tool")


class DataError(InhouseError):
    """Training data that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    messages: tuple[ChatMessage, ...]
    options: PromptOptions
    line: int


def load_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    examples = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
        try:
            examples.append(parse_example(obj, n))
        except (ConversationError, ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path} line {n}: {_message(e)}") from None
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def _message(e: Exception) -> str:
    return f"missing field {e}" if isinstance(e, KeyError) else str(e)


def render_examples(examples: list[Example], path: str | Path,
                    max_len: int | None = None) -> list[TrainingSequence]:
    """Harmony training sequences of all examples; errors name the example's line."""
    out = []
    for ex in examples:
        try:
            seqs = render_for_training(list(ex.messages), ex.options)
        except ConversationError as e:
            raise DataError(f"{path} line {ex.line}: {e}") from None
        for s in seqs:
            if max_len is not None and len(s.ids) > max_len:
                raise DataError(f"{path} line {ex.line}: conversation renders to {len(s.ids)} "
                                f"tokens, over --max-len {max_len}")
            out.append(s)
    return out


def parse_example(obj: Any, line: int = 0) -> Example:
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in obj:
        messages = _chat_messages(obj["messages"])
    elif "input" in obj:
        messages = _responses_items(obj["input"])
    else:
        raise ValueError('expected a "messages" (chat) or "input" (responses) field')
    effort = obj.get("reasoning_effort") or (obj.get("reasoning") or {}).get("effort") or "medium"
    if effort not in EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(EFFORTS)}, not {effort!r}")
    tools = tuple(_tool(t, i) for i, t in enumerate(obj.get("tools") or []))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    return Example(tuple(messages), PromptOptions(reasoning_effort=effort, tools=tools), line)


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or not isinstance(p.get("text"), str):
                raise ValueError(f"{where}: content parts must be objects with a \"text\" string")
            parts.append(p["text"])
        return "".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def _arguments(args: Any, where: str) -> str:
    if isinstance(args, (dict, list)):
        return json.dumps(args)
    if not isinstance(args, str):
        raise ValueError(f"{where}: arguments must be a JSON string")
    try:
        json.loads(args)
    except json.JSONDecodeError:
        raise ValueError(f"{where}: arguments are not valid JSON") from None
    return args


def _chat_messages(raw: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise ValueError('"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(raw):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _text(m.get("content"), where)
        if role == "assistant":
            reasoning = m.get("reasoning") or m.get("reasoning_content") or m.get("thinking")
            calls = []
            for j, c in enumerate(m.get("tool_calls") or []):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ValueError(f"{where}: tool_calls[{j}] needs function.name")
                calls.append(ToolCall(fn["name"], _arguments(fn.get("arguments", "{}"),
                                                             f"{where}: tool_calls[{j}]"),
                                      str(c.get("id") or "")))
            if not (content or reasoning or calls):
                raise ValueError(f"{where}: assistant message is empty")
            out.append(ChatMessage("assistant", content, reasoning=reasoning or None,
                                   tool_calls=tuple(calls)))
        elif role == "tool":
            out.append(ChatMessage("tool", content, name=m.get("name"),
                                   tool_call_id=m.get("tool_call_id")))
        else:
            out.append(ChatMessage(role, content))
    _check_tool_results(out)
    return out


def _responses_items(raw: Any) -> list[ChatMessage]:
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise ValueError('"input" must be a string or a non-empty list of items')
    out: list[ChatMessage] = []
    reasoning: str | None = None

    def assistant(**kw) -> None:
        nonlocal reasoning
        out.append(ChatMessage("assistant", reasoning=reasoning, **kw))
        reasoning = None

    for i, item in enumerate(raw):
        where = f"item {i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise ValueError(f"{where}: unknown role {role!r}")
            text = _text(item.get("content"), where)
            if role == "assistant":
                if not text:
                    raise ValueError(f"{where}: assistant message is empty")
                assistant(content=text)
            else:
                out.append(ChatMessage(role, text))
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = _text(parts, where) or None
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str):
                raise ValueError(f"{where}: function_call needs a name")
            call = ToolCall(name, _arguments(item.get("arguments", "{}"), where),
                            str(item.get("call_id") or ""))
            if out and out[-1].role == "assistant" and not out[-1].content and reasoning is None:
                prev = out.pop()  # several calls of one turn: one assistant message
                out.append(ChatMessage("assistant", reasoning=prev.reasoning,
                                       tool_calls=prev.tool_calls + (call,)))
            else:
                assistant(tool_calls=(call,))
        elif kind == "function_call_output":
            output = item.get("output")
            out.append(ChatMessage("tool", output if isinstance(output, str) else json.dumps(output),
                                   tool_call_id=item.get("call_id")))
        else:
            raise ValueError(f"{where}: unknown item type {kind!r}")
    if reasoning is not None:
        raise ValueError("reasoning item is not followed by an assistant message or call")
    _check_tool_results(out)
    return out


def _check_tool_results(messages: list[ChatMessage]) -> None:
    """Every tool result answers an earlier, still unanswered call (by id when ids are given)."""
    open_ids: list[str] = []
    open_calls = 0
    for i, m in enumerate(messages):
        if m.role == "assistant":
            open_ids += [c.id for c in m.tool_calls if c.id]
            open_calls += len(m.tool_calls)
        elif m.role == "tool":
            if open_calls == 0 or (m.tool_call_id and m.tool_call_id not in open_ids):
                raise ValueError(f"message {i}: tool result without a preceding tool call")
            if m.tool_call_id:
                open_ids.remove(m.tool_call_id)
            open_calls -= 1


def _tool(t: Any, i: int) -> FunctionTool:
    if not isinstance(t, dict):
        raise ValueError(f"tools[{i}]: must be an object")
    fn = t.get("function", t)  # chat shape nests under "function"; responses shape does not
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tools[{i}]: a function tool needs a name")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"tools[{i}]: parameters must be a JSON schema object")
    return FunctionTool(fn["name"], fn.get("description") or "", params)
