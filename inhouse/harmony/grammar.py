"""Grammars that follow harmony (issue 19): the reasoning stays free, the answer is constrained.

llguidance (the grammar engine vLLM, SGLang and llama.cpp can use) runs them over the o200k
harmony vocabulary we ship: `ll_tokenizer` builds its tokenizer offline, and `GrammarBackend`
gives the engine one matcher per constrained sequence (the engine itself never sees harmony:
it takes a `Constraint`, a grammar string, and this backend at construction).

`answer_grammar(schema)`: an optional analysis message (any text), then
`<|channel|>final<|message|>` and JSON matching the schema, then `<|return|>`. Special tokens are
referenced by name (`<|channel|>`), so no text can stand in for them.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from typing import Any

from inhouse.harmony.conversation import ChatMessage, ConversationError
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
RETURN = 200002
# JSON Schema keywords whose meaning the grammar cannot enforce: refused, never loosened
UNENFORCEABLE = ("uniqueItems", "contains", "dependentSchemas", "dependentRequired",
                 "if", "then", "else", "not", "patternProperties", "propertyNames",
                 "unevaluatedProperties", "unevaluatedItems")

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


def _unenforceable(schema: Any, path: str = "schema") -> str | None:
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


def answer_grammar(schema: dict | None, param: str = "response_format") -> str:
    """A lark grammar (llguidance's dialect): free analysis, then a final answer that is JSON
    matching `schema` (None: any JSON object). Refuses, naming the keyword, what it cannot
    enforce; refuses a schema llguidance cannot compile."""
    schema = {"type": "object"} if schema is None else schema
    if not isinstance(schema, dict):
        raise ConversationError("the schema must be a JSON object", param=param)
    bad = _unenforceable(schema)
    if bad:
        raise ConversationError(f"the JSON Schema keyword at {bad} cannot be enforced by the "
                                "grammar; remove it", param=param)
    grammar = "\n".join([
        "start: analysis? final",
        'analysis: <|channel|> "analysis" <|message|> THINK <|end|> <|start|> "assistant"',
        'final: <|channel|> "final" <|message|> answer <|return|>',
        r"THINK: /(.|\n)*/",
        # compact JSON: no whitespace for a model to wander in between the values
        f"answer: %json {json.dumps(schema | {'x-guidance': {'whitespace_flexible': False}})}",
    ])
    check_grammar(grammar, param)
    return grammar


def json_answer(name: str, description: str | None, schema: dict | None,
                param: str) -> tuple[ChatMessage, str]:
    """What a JSON answer format asks of a turn, whichever API it came by: the developer message
    that tells the model the format (harmony's "# Response Formats" section) and the grammar
    that enforces it (`answer_grammar`; refusals name `param`)."""
    grammar = answer_grammar(schema, param)
    lines = ["# Response Formats", "", f"## {name}", ""]
    if description:
        lines.append(f"// {description}")
    lines.append(json.dumps(schema if schema is not None else {"type": "object"},
                            separators=(",", ":")))
    return ChatMessage("developer", "\n".join(lines)), grammar


def check_grammar(grammar: str, param: str) -> None:
    import llguidance

    g = llguidance.LLMatcher.grammar_from_lark(grammar)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(g, ll_tokenizer())
    if is_error:
        raise ConversationError("the schema cannot be compiled into a grammar: "
                                + "; ".join(messages), param=param)


@dataclass
class GrammarMatcher:
    """One sequence's place in its grammar."""

    matcher: Any

    def allowed(self):
        """A boolean numpy array over the vocabulary: the tokens the grammar allows next."""
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        bitmask = allocate_token_bitmask(1, NUM_IDS)  # (1, words) int32, bit i of word w: id 32w+i
        fill_next_token_bitmask(self.matcher, bitmask, 0)
        return np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[:NUM_IDS].astype(bool)

    def consume(self, token: int) -> bool:
        """Advance past the sampled token; False if the grammar refused it (a bug: the mask
        allowed it) or has already finished."""
        return bool(self.matcher.consume_token(token))


class GrammarBackend:
    """What the engine is given to compile a request's grammar (one matcher per sequence)."""

    def new_matcher(self, grammar: str) -> GrammarMatcher:
        import llguidance

        m = llguidance.LLMatcher(ll_tokenizer(), llguidance.LLMatcher.grammar_from_lark(grammar))
        if m.is_error():
            raise ValueError(m.get_error())
        return GrammarMatcher(m)
