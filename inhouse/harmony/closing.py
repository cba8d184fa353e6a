"""Finishing a constrained output inside its token budget.

A grammar makes every token the model may sample a step towards a valid answer, but it cannot
make the model stop: a weak model (the demo) writes an unbounded string or number until
max_tokens cuts it, and the JSON does not parse. `closing_path` finds a way to finish from the
matcher's present state, spelled in single-byte tokens and harmony's special tokens; the
matcher (grammar.GrammarMatcher) forces that path when the budget left would not fit it
otherwise, and reports the turn as cut ("length"), since the model did not finish by itself.

The walk is greedy, not a search: every token the grammar allows leads to a state that can still
be completed (llguidance only allows viable prefixes), so the walk never dead-ends; it only has
to avoid going round in circles. It prefers the moves that close things (the stop tokens, `"`,
`}`, `]`, `,`), then short values; once it has stayed at the same allowed set a few steps in a
row it takes there what it has not yet taken, so a regex like an e-mail address's local part is
eventually left by its `@` (a free string met again elsewhere is still closed at once). A
forced stretch (a required key's name) is taken as llguidance spells it, since it allows no
other spelling there. The path is not always the shortest, only a valid one whose length is
known; it is deterministic, so replay forces the same bytes.
"""

from __future__ import annotations

import base64
from functools import cache

import numpy as np

from inhouse.harmony.vocab import VOCAB_FILE, ensure_vocab

RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = (200002, 200003, 200005, 200006, 200007,
                                                        200008, 200012)
# closing moves first (a time's `Z` among them), then the shortest values, then what patterns
# and formats need
_BYTE_ORDER = b'"}],:Z1' + b"023456789" + b"@.-/+_ Te" + bytes(range(97, 123)) + \
    bytes(range(65, 91)) + bytes(b for b in range(32, 127) if not chr(b).isalnum())
# after this many steps in a row at the same allowed set (or this many visits in all, for a
# longer loop), the walk takes there what it has not taken yet
_PATIENCE, _LOOP = 4, 64
_SPECIAL_ORDER = (RETURN, CALL, END, START, CHANNEL, MESSAGE, CONSTRAIN)


@cache
def candidates() -> np.ndarray:
    """The ids a closing path is spelled in, best first: harmony's specials, then the single
    bytes of printable ASCII and ASCII whitespace (a lone byte of a multi-byte character would
    leave the text invalid UTF-8 if the walk then closed the string)."""
    ranks = {}
    for line in (ensure_vocab() / VOCAB_FILE).read_text().splitlines():
        token, rank = line.split()
        if len(token) <= 4:  # a single byte is at most 4 base64 characters
            raw = base64.b64decode(token)
            if len(raw) == 1:
                ranks[raw[0]] = int(rank)
    seen: set[int] = set()
    ordered = [b for b in _BYTE_ORDER + b"\n\t" if not (b in seen or seen.add(b))]
    return np.array(list(_SPECIAL_ORDER) + [ranks[b] for b in ordered], dtype=np.int64)


def _allowed_candidates(matcher, bitmask, fill) -> np.ndarray:
    fill(matcher, bitmask, 0)
    ids = candidates()
    return ((bitmask[0][ids >> 5] >> (ids & 31)) & 1).astype(bool)


def closing_path(matcher, limit: int, bitmask, fill) -> list[int] | None:
    """Token ids that take `matcher` from where it is to the end of its grammar, at most `limit`
    of them (None: no such walk found). The matcher is left where it was. `bitmask` and `fill`:
    llguidance's numpy bitmask for one row and the function that fills it."""
    if matcher.is_stopped():
        return []
    ids = candidates()
    taken: dict[bytes, set[int]] = {}  # allowed set -> candidate indices already taken there
    visits: dict[bytes, int] = {}
    last, run = b"", 0  # the allowed set of the step before, and how many steps in a row
    path: list[int] = []
    # NOTE: a stop token ends the path unconsumed: llguidance cannot roll a stopped matcher back
    # more than one token, and the engine stops on it anyway
    try:
        while len(path) < limit - 1:
            forced = matcher.compute_ff_tokens()
            if forced:  # a forced stretch (a key's name) is allowed only as llguidance spells it
                for token in forced[:limit - len(path)]:
                    if token in (RETURN, CALL):
                        return path + [token]
                    if not matcher.consume_token(token):
                        return None
                    path.append(token)
                continue
            ok = _allowed_candidates(matcher, bitmask, fill)
            if ok[0] or ok[1]:
                return path + [int(ids[0 if ok[0] else 1])]
            choices = np.flatnonzero(ok)
            if choices.size == 0:  # only longer tokens fit here: the first of them, by id
                allowed = np.flatnonzero(np.unpackbits(bitmask[0].view(np.uint8),
                                                       bitorder="little"))
                if allowed.size == 0 or not matcher.consume_token(int(allowed[0])):
                    return None
                path.append(int(allowed[0]))
                continue
            key = np.packbits(ok).tobytes()
            run = run + 1 if key == last else 1
            last = key
            visits[key] = visits.get(key, 0) + 1
            used = taken.setdefault(key, set())
            fresh = [int(c) for c in choices if int(c) not in used]
            if (run <= _PATIENCE and visits[key] <= _LOOP) or not fresh:
                pick = int(choices[0])
            else:
                pick = fresh[0]
            used.add(pick)
            token = int(ids[pick])
            if not matcher.consume_token(token):
                return None
            path.append(token)
        return None
    finally:
        if path:
            matcher.rollback(len(path))
