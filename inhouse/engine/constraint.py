"""The engine's seam to a grammar: it never sees harmony or the vocabulary, only these."""

from __future__ import annotations

from typing import Protocol


class GrammarMatcher(Protocol):
    """One sequence's grammar state. `is_cut`: the matcher forced the output to an end because
    the tokens left would not have fitted the rest (the turn finishes as "length")."""

    is_cut: bool

    def allowed(self, remaining: int):
        """A boolean numpy array over the vocabulary: the tokens the grammar allows next, with
        `remaining` tokens (this one included) left to the sequence."""

    def consume(self, token: int) -> bool:
        """Advance past the sampled token; False if the grammar refused it."""


class GrammarCompiler(Protocol):
    """Compiles a request's grammar (`SamplingParams.grammar`) into a matcher; given to the
    engine at construction (harmony.grammar.GrammarBackend)."""

    def new_matcher(self, grammar: str) -> GrammarMatcher: ...
