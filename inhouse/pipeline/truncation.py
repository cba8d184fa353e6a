"""Responses' `truncation: "auto"`: drop the oldest turns of a conversation until it fits.

A conversation is cut only at the start of a user turn, so that a tool call never loses its
result (harmony refuses a result without its call), and the instructions (system and developer
messages) are kept. The smallest cut that fits is found by bisection: a prompt is rendered
O(log turns) times, not once per dropped turn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from inhouse.harmony import ChatMessage, PromptOptions

Renderer = Callable[[list[ChatMessage], PromptOptions], Awaitable[list[int]]]
KEPT = ("system", "developer")


@dataclass(frozen=True)
class Fitted:
    messages: list[ChatMessage]
    num_dropped: int  # conversation messages dropped from the start
    num_prompt_tokens: int


async def fit_to_context(messages: list[ChatMessage], options: PromptOptions, render: Renderer,
                         max_prompt_tokens: int) -> Fitted:
    """The messages with as few of the oldest turns dropped as makes the prompt at most
    `max_prompt_tokens` long; if even the last user turn alone is too long, that (the caller
    refuses it as it would any prompt that does not fit)."""
    cuts = [i for i, m in enumerate(messages) if m.role == "user"] or [0]

    def after(cut: int) -> list[ChatMessage]:  # in their order: a format message may come last
        return [m for i, m in enumerate(messages) if i >= cut or m.role in KEPT]

    async def length(cut: int) -> int:
        return len(await render(after(cut), options))

    def fitted(cut: int, n: int) -> Fitted:
        dropped = sum(1 for m in messages[:cut] if m.role not in KEPT)
        return Fitted(after(cut), dropped, n)

    full = await length(0)
    if full <= max_prompt_tokens:
        return Fitted(messages, 0, full)
    lo, hi = -1, len(cuts) - 1  # cuts[hi] keeps only the last user turn on; lo: nothing cut
    best = await length(cuts[hi])
    if best > max_prompt_tokens:
        return fitted(cuts[hi], best)
    while hi - lo > 1:  # cuts[hi] fits, cuts[lo] does not
        mid = (lo + hi) // 2
        n = await length(cuts[mid])
        if n <= max_prompt_tokens:
            hi, best = mid, n
        else:
            lo = mid
    return fitted(cuts[hi], best)
