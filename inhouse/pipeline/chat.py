"""One assistant turn: render the conversation, stream the engine's tokens through the parser."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

from inhouse.engine import EngineClient, SamplingParams, TokenLogprob, check_prompt_length
from inhouse.harmony import (ChatMessage, Event, OutputParser, ParsedOutput, PromptOptions,
                             render_prompt, stop_token_ids)
from inhouse.harmony.parser import CALL


Renderer = Callable[[list[ChatMessage], PromptOptions], Awaitable[list[int]]]


@dataclass(frozen=True)
class ChatTurn:
    messages: tuple[ChatMessage, ...]
    options: PromptOptions = PromptOptions()
    params: SamplingParams = SamplingParams()
    request_id: str = field(default_factory=lambda: f"req_{uuid.uuid4().hex[:16]}")
    # ids after the rendered conversation: a built-in tool loop's earlier steps (the model's own
    # tokens, then each tool's answer), so a continuation reads exactly what was written
    extra_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """Emitted before the harmony events of each generated token."""

    token_id: int
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class Finished:
    """The last event of a turn: why it ended and what it cost."""

    finish_reason: str  # "stop" | "tool_calls" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    seed: int
    time_to_first_token_s: float
    total_s: float
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    error: str | None = None
    queue_wait_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose keys and values the prefix cache gave


def engine_params(turn: ChatTurn) -> SamplingParams:
    """The params the engine runs the turn with: the request's, stopping on harmony's
    `<|return|>`/`<|call|>` (what an audit record must log for replay)."""
    return replace(turn.params, stop_token_ids=tuple(stop_token_ids()))


async def _render_in_thread(messages: list[ChatMessage], options: PromptOptions) -> list[int]:
    return await asyncio.to_thread(render_prompt, messages, options)


async def stream_chat(client: EngineClient, turn: ChatTurn,
                      render: Renderer = _render_in_thread
                      ) -> AsyncIterator[Event | TokenEvent | Finished]:
    """Harmony events as the model produces them, then one `Finished`. Rendering runs off the
    event loop (`render`: a thread by default; the server's `RenderOffload` for large prompts)."""
    prompt_ids = list(await render(list(turn.messages), turn.options)) + list(turn.extra_ids)
    check_prompt_length(len(prompt_ids), client.model_config.max_position_embeddings)
    params = engine_params(turn)
    parser = OutputParser(turn.options.builtin_tools)
    t0 = time.perf_counter()
    first: float | None = None
    out_ids: list[int] = []
    last = None
    async for out in client.generate(turn.request_id, prompt_ids, params):
        last = out
        for i, token in enumerate(out.new_token_ids):
            if first is None:
                first = time.perf_counter() - t0
            out_ids.append(token)
            yield TokenEvent(token, out.new_logprobs[i] if i < len(out.new_logprobs) else None)
            for event in parser.feed(token):
                yield event
    for event in parser.finish():
        yield event
    reason = last.finish_reason if last else "error"
    if reason == "stop" and out_ids and out_ids[-1] == CALL:
        reason = "tool_calls"
    yield Finished(reason or "error", len(prompt_ids), len(out_ids), parser.reasoning_tokens,
                   last.seed if last else 0, first or 0.0, time.perf_counter() - t0,
                   tuple(prompt_ids), tuple(out_ids), last.error if last else None,
                   last.queue_wait_s if last else 0.0, last.num_cached_tokens if last else 0)


@dataclass
class ChatResult:
    output: ParsedOutput
    finished: Finished


async def run_chat(client: EngineClient, turn: ChatTurn) -> ChatResult:
    parsed, done = ParsedOutput(), None
    async for event in stream_chat(client, turn):
        if isinstance(event, Finished):
            done = event
        elif not isinstance(event, TokenEvent):
            parsed.add([event])
    assert done is not None
    return ChatResult(parsed, done)
