"""Running a turn's grammar (built by constraints.py) over harmony's vocabulary, with llguidance.

llguidance (the grammar engine vLLM, SGLang and llama.cpp can use) runs over the o200k harmony
vocabulary we ship: `ll_tokenizer` builds its tokenizer offline, and `GrammarBackend` gives the
engine one matcher per constrained sequence (the engine itself never sees harmony: it takes a
grammar string in `SamplingParams.grammar`, and this backend at construction). A matcher also
finishes the output inside its token budget when the model would not (closing.py).
"""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from inhouse.harmony.closing import RETURN, closing_path
from inhouse.harmony.conversation import ConversationError
from inhouse.harmony.vocab import VOCAB_FILE, ensure_vocab, load_encoding

# o200k_base's pre-tokenisation pattern (as tiktoken defines it), for llguidance's tokenizer
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_IDS = 201088  # the checkpoints' vocabulary: o200k's 199998 ranks and harmony's specials
_lock = threading.Lock()
_tokenizer = None


def ll_tokenizer():
    """llguidance's tokenizer for o200k_harmony, built once per process (about 1.5 s)."""
    global _tokenizer
    if _tokenizer is None:
        with _lock:
            if _tokenizer is None:
                import llguidance

                ranks = {}
                for line in (ensure_vocab() / VOCAB_FILE).read_text().splitlines():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                enc = load_encoding()
                specials = {enc.decode([i]): i for i in range(len(ranks), NUM_IDS)}
                _tokenizer = llguidance.LLTokenizer.from_tiktoken(
                    encoder=ranks, special_tokens=specials, pattern=O200K_PATTERN,
                    eos_token=RETURN, n_vocab=NUM_IDS)
    return _tokenizer


_compiled: OrderedDict[str, Any] = OrderedDict()  # grammar text -> a fresh matcher, newest last
COMPILED_KEPT = 64


def _compile(grammar: str):
    """A fresh llguidance matcher for `grammar`, compiled once and kept (a few of the latest):
    compiling a large schema takes long (half a second for 400 kB), copying a fresh matcher a
    tenth of a millisecond. Raises ValueError with llguidance's message."""
    import llguidance

    with _lock:
        fresh = _compiled.get(grammar)
        if fresh is not None:
            _compiled.move_to_end(grammar)
            return fresh.deep_copy()
    m = llguidance.LLMatcher(ll_tokenizer(), llguidance.LLMatcher.grammar_from_lark(grammar))
    if m.is_error():
        raise ValueError(m.get_error())
    with _lock:
        _compiled[grammar] = m
        while len(_compiled) > COMPILED_KEPT:
            _compiled.popitem(last=False)
    return m.deep_copy()


def check_grammar(grammar: str, param: str) -> None:
    """Compile `grammar` (a request's, before it reaches the engine: call it off the event loop)
    or refuse it naming `param`. The engine's matchers are then copies, not compilations, so a
    large schema never stalls the engine's thread."""
    try:
        _compile(grammar)
    except ValueError as e:
        raise ConversationError(f"the schema cannot be compiled into a grammar: {e}",
                                param=param) from None


# the budget closing watches (closing.py): it re-plans the way out every step once the tokens
# left come within ZONE of it, every EVERY steps before, and forces it with SLACK tokens to spare
# (a walk longer than WALK_MAX is not looked for: a schema whose shortest answer is that long is
# left to the model)
ZONE, EVERY, SLACK, WALK_MAX = 32, 8, 8, 512


@dataclass
class GrammarMatcher:
    """One sequence's place in its grammar, and the way out of it when the budget runs short."""

    matcher: Any
    is_cut: bool = False  # a closing path was forced: the model did not finish by itself
    forced: list[int] = field(default_factory=list)  # the closing path left to force
    _bitmask: Any = None
    _close_len: int | None = None
    _since_plan: int = 0

    def allowed(self, remaining: int):
        """A boolean numpy array over the vocabulary: the tokens the grammar allows next, when
        `remaining` tokens (this one included) are left to the sequence."""
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        if self._bitmask is None:
            self._bitmask = allocate_token_bitmask(1, NUM_IDS)  # (1, words): bit i of word w is id 32w+i
        if not self.forced:
            self._plan(remaining, fill_next_token_bitmask)
        if self.forced:
            mask = np.zeros(NUM_IDS, dtype=bool)
            mask[self.forced[0]] = True
            return mask
        fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        return np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")[:NUM_IDS].astype(bool)

    def _plan(self, remaining: int, fill) -> None:
        due = (self._close_len is None or remaining <= self._close_len + ZONE
               or self._since_plan >= EVERY)
        if not due:
            self._since_plan += 1
            return
        self._since_plan = 0
        path = closing_path(self.matcher, min(remaining, WALK_MAX), self._bitmask, fill)
        self._close_len = len(path) if path is not None else min(remaining, WALK_MAX)
        if path and len(path) + SLACK >= remaining:
            self.forced = path
            self.is_cut = len(path) > 1  # more than the stop token: the answer was unfinished

    def consume(self, token: int) -> bool:
        """Advance past the sampled token; False if the grammar refused it (a bug: the mask
        allowed it) or has already finished."""
        if self.forced:
            if token != self.forced[0]:
                return False
            self.forced.pop(0)
        return bool(self.matcher.consume_token(token))


class GrammarBackend:
    """What the engine is given to compile a request's grammar (one matcher per sequence)."""

    def new_matcher(self, grammar: str) -> GrammarMatcher:
        return GrammarMatcher(_compile(grammar))
