"""Draft tokens for speculative decoding, from the sequence's own tokens (prompt lookup).

A draft is a guess of the next tokens; the engine verifies it in one step (each draft token a row
of its own, computed as that token decoded alone would be) and keeps a draft token only where it
equals what the sequence's own generator samples there, so drafts change the speed, never the
output. Repetitive work pays: rewriting or quoting a text, code edits, structured answers that
repeat keys. A draft model would plug in behind the same `Drafter` seam.
"""

from __future__ import annotations

from typing import Protocol


class Drafter(Protocol):
    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens guessed to follow token_ids (the sequence so far); [] for none."""


class PromptLookup:
    """The tokens that followed the latest earlier occurrence of the sequence's last n tokens,
    for the longest n from `max_n` down to `min_n` that occurred before. One per sequence: it
    indexes the n-grams of the tokens it has seen, so a step costs the new tokens, not the
    whole sequence."""

    def __init__(self, max_n: int = 3, min_n: int = 2) -> None:
        self.sizes = range(max_n, min_n - 1, -1)
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self._seen = 0  # n-grams ending before this index are indexed

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        # index every n-gram that a later token follows (the last token's have none yet)
        for end in range(self._seen, len(token_ids) - 1):
            for n, index in self._index.items():
                if end + 1 >= n:
                    index[tuple(token_ids[end + 1 - n:end + 1])] = end
        self._seen = max(self._seen, len(token_ids) - 1)
        for n in self.sizes:
            if len(token_ids) < n:
                continue
            end = self._index[n].get(tuple(token_ids[-n:]))
            if end is not None:
                return token_ids[end + 1:end + 1 + k]
        return []
