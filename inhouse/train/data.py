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
from inhouse.harmony.conversation import EFFORTS, ChatMessage, ConversationError, PromptOptions
from inhouse.harmony.openai_shapes import function_tools, messages_from_chat, messages_from_items
from inhouse.harmony.training import TrainingSequence, render_for_training

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
        messages = messages_from_chat(obj["messages"])
    elif "input" in obj:
        messages = messages_from_items(obj["input"], obj.get("instructions"))
    else:
        raise ValueError('expected a "messages" (chat) or "input" (responses) field')
    _check_arguments(messages)
    effort = obj.get("reasoning_effort") or (obj.get("reasoning") or {}).get("effort") or "medium"
    if effort not in EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(EFFORTS)}, not {effort!r}")
    tools = function_tools(obj.get("tools"))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    return Example(tuple(messages), PromptOptions(reasoning_effort=effort, tools=tools), line)


def _check_arguments(messages: list[ChatMessage]) -> None:
    """Training teaches what the model writes: its tool calls' arguments must be JSON."""
    for i, m in enumerate(messages):
        for j, c in enumerate(m.tool_calls):
            try:
                json.loads(c.arguments)
            except json.JSONDecodeError:
                raise ValueError(f"message {i}: tool_calls[{j}]: arguments are not valid JSON") from None
