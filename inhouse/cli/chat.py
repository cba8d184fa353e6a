"""The terminal chat: streams reasoning (dimmed, optional) and the answer; commands start with /."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from inhouse.cli.common import err, out
from inhouse.engine import EngineClient, SamplingParams
from inhouse.harmony import (ChatMessage, ContentDelta, ParseWarning, PromptOptions,
                             ReasoningDelta, ToolCall, ToolCallDone)
from inhouse.harmony.conversation import EFFORTS
from inhouse.pipeline import ChatResult, ChatTurn, Finished, TokenEvent, stream_chat
from inhouse.harmony.parser import ParsedOutput

HELP = "commands: /reset  /effort low|medium|high  /reasoning on|off  /help  /quit"


@dataclass
class ChatSettings:
    system: str | None
    effort: str
    show_reasoning: bool
    max_tokens: int
    temperature: float
    seed: int | None


def one_turn(client: EngineClient, messages: list[ChatMessage], options: PromptOptions,
             params: SamplingParams, show_reasoning: bool, stream: bool = True) -> ChatResult:
    """Run one assistant turn; stream it to the terminal unless `stream` is False.
    Ctrl-C cancels the request (its KV memory is freed) and returns what came so far."""
    turn = ChatTurn(tuple(messages), options, params)
    parsed = ParsedOutput()
    state = {"finished": None, "in_reasoning": False}

    async def consume() -> None:
        async for event in stream_chat(client, turn):
            if isinstance(event, Finished):
                state["finished"] = event
                continue
            if isinstance(event, TokenEvent):
                continue
            parsed.add([event])
            if stream:
                _show(event, show_reasoning, state)

    try:
        asyncio.run(consume())
    except KeyboardInterrupt:
        if stream:
            out.print()
            err.print("[yellow]stopped[/yellow]")
    finished = state["finished"] or Finished("abort", 0, 0, 0, 0, 0.0, 0.0, (), ())
    if stream:
        out.print()
    return ChatResult(parsed, finished)


def _show(event, show_reasoning: bool, state: dict) -> None:
    if isinstance(event, ReasoningDelta):
        if show_reasoning:
            out.print(event.text, end="", style="dim", markup=False, soft_wrap=True)
            state["in_reasoning"] = True
    elif isinstance(event, ContentDelta):
        if state["in_reasoning"]:
            out.print()
            state["in_reasoning"] = False
        out.print(event.text, end="", markup=False, soft_wrap=True)
    elif isinstance(event, ToolCallDone):
        out.print(f"\n[cyan]tool call[/cyan] {event.name}({event.arguments})", markup=True,
                  soft_wrap=True)
    elif isinstance(event, ParseWarning):
        err.print(f"\n[dim yellow]warning: {event.message}[/dim yellow]", soft_wrap=True)


def repl(client: EngineClient, label: str, settings: ChatSettings) -> None:
    out.print(f"[bold]inhouse chat[/bold] with {label}. {HELP}")
    history: list[ChatMessage] = [ChatMessage("system", settings.system)] if settings.system else []
    turn_no = 0
    while True:
        try:
            line = out.input("[bold green]you>[/bold green] ")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(text, settings, history):
                return
            continue
        history.append(ChatMessage("user", text))
        seed = None if settings.seed is None else settings.seed + turn_no
        params = SamplingParams(max_tokens=settings.max_tokens, temperature=settings.temperature,
                                seed=seed)
        try:
            out.print("[bold blue]assistant>[/bold blue] ", end="")
            result = one_turn(client, history, PromptOptions(settings.effort), params,
                              settings.show_reasoning)
        except KeyboardInterrupt:  # Ctrl-C before the answer started streaming
            out.print()
            err.print("[yellow]stopped[/yellow]")
            history.pop()
            continue
        turn_no += 1
        f = result.finished
        o = result.output
        if o.content or o.tool_calls or o.reasoning:
            history.append(ChatMessage("assistant", o.content, o.reasoning or None,
                                       tuple(ToolCall(c.name, c.arguments) for c in o.tool_calls)))
        rate = f.completion_tokens / f.total_s if f.total_s else 0.0
        out.print(f"[dim]{f.completion_tokens} tokens ({f.reasoning_tokens} reasoning) in "
                  f"{f.total_s:.2f} s, {rate:.1f} tokens/s, first token after "
                  f"{f.time_to_first_token_s:.2f} s; {f.finish_reason}[/dim]")


def _command(text: str, settings: ChatSettings, history: list[ChatMessage]) -> bool:
    """Handle a /command; True means quit."""
    cmd, _, arg = text.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return True
    if cmd == "/reset":
        del history[:]
        if settings.system:
            history.append(ChatMessage("system", settings.system))
        out.print("[dim]conversation reset[/dim]")
    elif cmd == "/effort" and arg in EFFORTS:
        settings.effort = arg
        out.print(f"[dim]reasoning effort: {arg}[/dim]")
    elif cmd == "/reasoning" and arg in ("on", "off"):
        settings.show_reasoning = arg == "on"
        out.print(f"[dim]reasoning shown: {arg}[/dim]")
    else:
        out.print(f"[dim]{HELP}[/dim]")
    return False
