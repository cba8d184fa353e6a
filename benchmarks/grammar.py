"""What a JSON Schema costs decode: batch 1 on the exact gpt-oss-20b shape, with and without.

    python benchmarks/grammar.py [--model gpt-oss-20b] [--tokens 48] [--rounds 3]

Random weights (the 20b shape, built once and cached). The constrained run starts inside the
final message (`<|channel|>final<|message|>` ends the prompt), so every token is masked by the
JSON grammar, the most expensive part, and the budget closing plans its way out at the end;
the free run decodes the same prompt. Rounds alternate (free, constrained, free, ...) so that a
noisy machine hits both alike. Also reported: the grammar's own time per token (mask, consume
and closing walks). Writes benchmarks/results/grammar.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cache_dir, ensure_random_checkpoint, machine, memory, report  # noqa: E402
from inhouse.config import EngineConfig  # noqa: E402
from inhouse.engine import LLMEngine, SamplingParams  # noqa: E402
from inhouse.harmony import ChatMessage, load_encoding, render_prompt  # noqa: E402
from inhouse.harmony.grammar import GrammarBackend, GrammarMatcher  # noqa: E402
from inhouse.model import load_model  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "email", "tags", "address"],
          "properties": {
              "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
              "email": {"type": "string", "format": "email"},
              "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
              "address": {"type": "object", "required": ["city", "zip"],
                          "additionalProperties": False,
                          "properties": {"city": {"type": "string"},
                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
GRAMMAR = "\n".join([
    "start: answer <|return|>",
    f"answer: %json {json.dumps(SCHEMA | {'x-guidance': {'whitespace_flexible': False}})}"])


class TimedBackend(GrammarBackend):
    """The real backend, timing its matchers' work."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def new_matcher(self, grammar: str) -> GrammarMatcher:
        m = super().new_matcher(grammar)
        backend = self
        allowed, consume = m.allowed, m.consume

        def timed(fn):
            def call(*a):
                t0 = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    backend.seconds += time.perf_counter() - t0
            return call

        m.allowed, m.consume = timed(allowed), timed(consume)
        return m


def decode_rate(engine: LLMEngine, prompt: list[int], tokens: int, grammar: str | None) -> tuple[float, int]:
    engine.add_request("r", prompt, SamplingParams(max_tokens=tokens, seed=1, grammar=grammar,
                                                   stop_token_ids=(200002,)))
    decode_s, n, first = 0.0, 0, True
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outs = engine.step()
        if not first:  # the first step is the prefill
            decode_s += time.perf_counter() - t0
            n += sum(len(o.new_token_ids) for o in outs)
        first = False
    return n / decode_s, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path = cache_dir() / f"{args.model}-random-hf-sharded"
    ensure_random_checkpoint(path, args.model, "hf-sharded")
    backend = TimedBackend()
    engine = LLMEngine(load_model(path), EngineConfig(), grammars=backend)
    prompt = render_prompt([ChatMessage("user", "Who is the customer?")]) + \
        load_encoding().encode("<|channel|>final<|message|>", allowed_special="all")
    decode_rate(engine, prompt, 2, None)  # warm-up
    free, held, tokens = [], [], 0
    for r in range(args.rounds):
        free.append(decode_rate(engine, prompt, args.tokens, None)[0])
        before = backend.seconds
        rate, n = decode_rate(engine, prompt, args.tokens, GRAMMAR)
        held.append(rate)
        tokens += n
        print(f"round {r}: free {free[-1]:.2f} tok/s, schema {held[-1]:.2f} tok/s "
              f"({n} tokens, grammar {1000 * (backend.seconds - before) / max(n, 1):.2f} ms/token)",
              flush=True)
    best_free, best_held = max(free), max(held)
    grammar_ms = 1000 * backend.seconds / max(tokens, 1)
    rows = [(f"{args.model} batch 1, free", f"{best_free:.2f} tok/s"),
            (f"{args.model} batch 1, JSON Schema", f"{best_held:.2f} tok/s"),
            ("slowdown (best of rounds)", f"{100 * (1 - best_held / best_free):.1f}%"),
            ("grammar time per token", f"{grammar_ms:.2f} ms"),
            ("grammar share of a token", f"{grammar_ms / (1000 / best_held) * 100:.1f}%")]
    data = {"model": args.model, "tokens": args.tokens, "free_tok_s": free,
            "schema_tok_s": held, "grammar_ms_per_token": grammar_ms, "schema": SCHEMA,
            "peak_rss": memory()["VmHWM"], "machine": machine()}
    report("decode cost of a JSON Schema (batch 1)", rows, data, "grammar")


if __name__ == "__main__":
    main()
