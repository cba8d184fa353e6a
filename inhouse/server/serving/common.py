"""Shared by the two APIs: ids, effort names, stop strings, usage, merging choices' streams."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Coroutine

from starlette.requests import Request

from inhouse.config import ServerSettings
from inhouse.engine import EngineClient, TokenLogprob
from inhouse.harmony import decode
from inhouse.server.errors import APIError

EFFORT = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high",
          "xhigh": "high"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def check_model(requested: str, settings: ServerSettings) -> str | None:
    """The adapter a request's `model` names: "BASE" -> None, "BASE:NAME" -> NAME."""
    base, _, adapter = requested.partition(":")
    if base == settings.model_name and (not adapter or adapter in dict(settings.adapters)):
        return adapter or None
    served = ", ".join(f"'{m}'" for m in model_ids(settings))
    raise APIError(404, f"the model '{requested}' does not exist; this server serves {served}",
                   param="model", code="model_not_found")


def model_ids(settings: ServerSettings) -> list[str]:
    return [settings.model_name] + [f"{settings.model_name}:{n}" for n, _ in settings.adapters]


def max_tokens_for(requested: int | None, client: EngineClient, settings: ServerSettings,
                   param: str) -> int:
    context = client.model_config.max_position_embeddings
    if requested is None:
        return min(settings.default_max_tokens, context)
    if requested > context:
        raise APIError(400, f"'{param}' is {requested}; the model's context window is {context} "
                            "tokens", param=param)
    return requested


def logprob_entry(lp: TokenLogprob) -> dict:
    """A token's logprob in OpenAI's shape (chat's and Responses' agree), with its alternatives."""
    def entry(token_id: int, value: float) -> dict:
        text = decode([token_id])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}


def url_citations(text: str, citations) -> list[dict]:
    """The citation marks found in `text`, in order, as url_citation spans
    {start_index, end_index, title, url}; a mark no longer in the text (cut by a stop string, or
    written outside this message) is skipped. Chat nests a span under "url_citation",
    Responses does not."""
    spans, start = [], 0
    for cite in citations:
        at = text.find(cite.mark, start)
        if at < 0:
            continue
        start = at + len(cite.mark)
        spans.append({"start_index": at, "end_index": start, "title": cite.title,
                      "url": cite.url})
    return spans


def seed_for(seed: int | None, index: int) -> int | None:
    """OpenAI accepts any integer; ours are in [0, 2**63). Choice i of n gets seed + i."""
    return None if seed is None else (seed + index) % (2**63)


class StopMatcher:
    """Cuts the answer at the first stop string; holds back text that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        if self.stopped:
            return ""
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        safe = len(self.buffer) - self.hold
        if safe <= 0:
            return ""
        out, self.buffer = self.buffer[:safe], self.buffer[safe:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def usage(finished: list, include_details: bool = True) -> dict:
    prompt = sum(f.prompt_tokens for f in finished)
    completion = sum(f.completion_tokens for f in finished)
    reasoning = sum(f.reasoning_tokens for f in finished)
    body = {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
    if include_details:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        body["prompt_tokens_details"] = {"cached_tokens": sum(f.cached_tokens for f in finished)}
    return body


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index, item) from several streams as they come; closing the merge closes them all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, s):
        try:
            async for item in s:
                await queue.put((i, item))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()


async def unless_disconnected(request: Request, work: Coroutine, poll_s: float = 0.25):
    """Run a non-streaming request's work; if its client goes away first, cancel it (the
    governed turn aborts the generation and records "disconnect") and answer 499."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "the client closed the connection", code="client_closed")
    finally:
        if not task.done():
            task.cancel()
