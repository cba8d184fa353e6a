"""What a turn's output must look like, as a grammar over harmony (issue 19).

The reasoning (one analysis message) stays free; what follows is constrained:
- a JSON answer format: the final message is JSON matching the schema;
- strict functions, `tool_choice` "required" or a named function: a call's header names only
  the functions allowed, and its arguments match the function's schema (`<|constrain|>json`);
- `tool_choice` "none": no tool header can be written at all.

The model may write a call's recipient after the channel (as gpt-oss usually does) or before it
(`<|start|>assistant to=functions.f<|channel|>commentary`); both are allowed. Special tokens are
referenced by name (`<|channel|>`), so no text can stand in for them. `turn_constraint` is the
one entry both APIs use; it returns the grammar (None: the turn runs free) and the developer
message that tells the model the answer format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from inhouse.harmony.conversation import ChatMessage, ConversationError, FunctionTool
from inhouse.harmony.formats import narrow_formats
from inhouse.harmony.grammar import check_grammar

# JSON Schema keywords whose meaning the grammar cannot enforce: refused, never loosened
UNENFORCEABLE = ("uniqueItems", "contains", "dependentSchemas", "dependentRequired",
                 "if", "then", "else", "not", "patternProperties", "propertyNames",
                 "unevaluatedProperties", "unevaluatedItems")
ANY_OBJECT: dict = {"type": "object"}


@dataclass(frozen=True)
class AnswerFormat:
    """A JSON answer format (chat's response_format, Responses' text.format); `schema` None is
    `json_object`: any JSON object. `param` names where it came from, for refusals."""

    name: str
    schema: dict | None
    param: str
    description: str | None = None


@dataclass(frozen=True)
class ToolChoice:
    """`mode`: "auto", "none" or "required"; `name`: the one function a named choice forces."""

    mode: str = "auto"
    name: str | None = None


@dataclass(frozen=True)
class TurnConstraint:
    grammar: str | None
    instructions: ChatMessage | None  # the "# Response Formats" developer message, if any


def _unenforceable(schema: Any, path: str) -> str | None:
    if isinstance(schema, dict):
        for k, v in schema.items():
            if k in UNENFORCEABLE:
                return f"{path}.{k}"
            found = _unenforceable(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            found = _unenforceable(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _json(schema: dict | None, param: str) -> str:
    """llguidance's `%json{...}` for a schema, compact (no whitespace for a model to wander in)."""
    schema = ANY_OBJECT if schema is None else schema
    if not isinstance(schema, dict):
        raise ConversationError("the schema must be a JSON object", param=param)
    bad = _unenforceable(schema, "schema")
    if bad:
        raise ConversationError(f"the JSON Schema keyword at {bad} cannot be enforced by the "
                                "grammar; remove it", param=param)
    schema = narrow_formats(schema)  # the date and time formats every validator accepts
    return f"%json {json.dumps(schema | {'x-guidance': {'whitespace_flexible': False}})}"


def _call_rules(tools: tuple[FunctionTool, ...], param: str) -> list[str]:
    rules = ["call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, t in enumerate(tools):
        args = _json(t.parameters if t.strict else None, f"{param}[{i}].parameters")
        after, before = json.dumps(f"commentary to=functions.{t.name} "), \
            json.dumps(f" to=functions.{t.name}")
        rules += [f"call_{i}: <|channel|> {after} <|constrain|> \"json\" <|message|> args_{i} <|call|>"
                  f" | {before} <|channel|> \"commentary \" <|constrain|> \"json\" <|message|> "
                  f"args_{i} <|call|>",
                  f"args_{i}: {args}"]
    return rules


def _builtin_rules(builtin: tuple[str, ...]) -> list[str]:
    """Calls to the built-in tools, recipient after the channel or before it: python's code is
    free text, the browser's arguments any JSON object (the tool reads and checks them)."""
    alts = []
    for name, body in (("python", "CODE"), ("browser", "args_browser")):
        if name not in builtin:
            continue
        target = '"python"' if name == "python" else '"browser." FN'
        alts += [f'<|channel|> "analysis to=" {target} " code"? <|message|> {body} <|call|>',
                 f'" to=" {target} <|channel|> "analysis" " code"? <|message|> {body} <|call|>']
    return ["builtin: " + " | ".join(alts), r"CODE: /(.|\n)*/", 'FN: "search" | "open" | "find"',
            f"args_browser: {_json(None, 'tools')}"]


def build_grammar(answer: AnswerFormat | None, calls: tuple[FunctionTool, ...],
                  must_call: bool, param: str = "tools", builtin: tuple[str, ...] = ()) -> str:
    """The lark grammar (llguidance's dialect) of a turn: free analysis, then a final answer (JSON
    if `answer`, else free text) or, if `calls`, a call to one of them (and only a call if
    `must_call`). Refuses what it cannot enforce, naming the keyword and the parameter."""
    ends = [] if must_call else ["final"]
    rules = []
    if calls:
        ends.append("call")
        rules += _call_rules(calls, param)
    if builtin and not must_call:
        ends.append("builtin")
        rules += _builtin_rules(builtin)
    if not must_call:
        body = _json(answer.schema, answer.param) if answer is not None else "TEXT"
        rules += ['final: <|channel|> "final" <|message|> answer <|return|>', f"answer: {body}",
                  r"TEXT: /(.|\n)*/"]
    grammar = "\n".join([
        f"start: analysis? ({' | '.join(ends)})",
        'analysis: <|channel|> "analysis" <|message|> THINK <|end|> <|start|> "assistant"',
        r"THINK: /(.|\n)*/", *rules])
    check_grammar(grammar, answer.param if answer is not None and not calls else param)
    return grammar


def answer_grammar(schema: dict | None, param: str = "response_format") -> str:
    """Free analysis, then a final answer that is JSON matching `schema` (None: any object)."""
    return build_grammar(AnswerFormat("answer", schema, param), (), False)


def _instructions(answer: AnswerFormat) -> ChatMessage:
    lines = ["# Response Formats", "", f"## {answer.name}", ""]
    if answer.description:
        lines.append(f"// {answer.description}")
    lines.append(json.dumps(answer.schema if answer.schema is not None else ANY_OBJECT,
                            separators=(",", ":")))
    return ChatMessage("developer", "\n".join(lines))


def turn_constraint(answer: AnswerFormat | None, tools: tuple[FunctionTool, ...],
                    choice: ToolChoice, param: str = "tools",
                    builtin: tuple[str, ...] = ()) -> TurnConstraint:
    """What the request's answer format, tools and tool_choice ask of the turn. No grammar when
    nothing is asked that the model could get wrong (no format, no strict function, "auto").
    `builtin`: the built-in tools the turn declares; where a grammar is on, their calls stay
    allowed (unless tool_choice forces or forbids calls)."""
    if choice.mode == "required" and not tools:
        raise ConversationError("tool_choice is 'required' but no tools were given",
                                param="tool_choice")
    if choice.name is not None:
        tools = tuple(t for t in tools if t.name == choice.name)
        if not tools:
            raise ConversationError(f"tool_choice names {choice.name!r}, which is not among the "
                                    "tools", param="tool_choice")
    calls = () if choice.mode == "none" else tools
    must_call = choice.mode == "required" or choice.name is not None
    free = (answer is None and choice.mode == "auto" and choice.name is None
            and not any(t.strict for t in tools))
    grammar = None if free else build_grammar(answer, calls, must_call, param,
                                              () if choice.mode == "none" else builtin)
    return TurnConstraint(grammar, _instructions(answer) if answer is not None else None)


def verdict_constraint(schema: dict) -> TurnConstraint:
    """A classifier's answer held to `schema` (no calls): compile it once, use it per request."""
    return turn_constraint(AnswerFormat("verdict", schema, "policy"), (), ToolChoice("none"))


def verdict_messages(instructions: str, content: str,
                     constraint: TurnConstraint) -> tuple[ChatMessage, ...]:
    """A classifier's conversation, safeguard style: the policy as the developer message, the
    content as the user message, then the answer format. The policy guard sends it and the
    demo trains on it, so both read the same tokens."""
    messages = (ChatMessage("developer", instructions), ChatMessage("user", content))
    if constraint.instructions is not None:
        messages += (constraint.instructions,)
    return messages
