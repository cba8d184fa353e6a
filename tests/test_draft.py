"""Speculative decoding (issue 20): drafts change the speed, never the output. Tried with drafts
that are all right, all wrong, right for a while, and the prompt lookup's own, on the module path
(fp32) and the native decode step (bf16), alone and batched, sampled and constrained."""

from __future__ import annotations

import random

import pytest
import torch

from inhouse.config import EngineConfig
from inhouse.engine import LLMEngine, SamplingParams
from inhouse.engine.draft import PromptLookup
from inhouse.harmony.grammar import GrammarBackend
from inhouse.model import load_model


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, checkpoints):
    return load_model(checkpoints["hf"], dtype=getattr(torch, request.param))


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 199_000) for _ in range(n)]


class Scripted:
    """Drafts from a known continuation: right for `right` tokens, then wrong ones."""

    def __init__(self, truth: list[int], prompt_len: int, right: int = 99) -> None:
        self.truth, self.prompt_len, self.right = truth, prompt_len, right

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        at = len(token_ids) - self.prompt_len
        good = self.truth[at:at + min(k, self.right)]
        return good + [7] * (k - len(good))


class Random:
    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return [random.randrange(1000, 199_000) for _ in range(k)]


def run(model, requests, drafts: int = 4, drafters=None, mode="reproducible", grammars=None):
    eng = LLMEngine(model, EngineConfig(mode=mode, num_draft_tokens=drafts, prefill_chunk=16),
                    grammars=grammars)
    out = {}
    for rid, prompt, p in requests:
        eng.add_request(rid, prompt, p)
        if drafters and rid in drafters:
            eng._seqs[rid].drafter = drafters[rid]
        out[rid] = ([], [])
    steps = 0
    while eng.has_unfinished():
        steps += 1
        for o in eng.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend((lp.token_id, lp.logprob, lp.top) for lp in o.new_logprobs)
    assert eng.kv.num_held == 0
    return out, eng, steps


def p(seed, n=24, t=1.0, **kw):
    return SamplingParams(max_tokens=n, temperature=t, seed=seed, logprobs=2, **kw)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    d = PromptLookup()
    text = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 1, 2, 3, 4]
    assert d.propose(text, 3) == [6, 1, 2]  # "2 3 4" last followed by 6
    assert d.propose(text + [8, 8], 2) == []  # "4 8 8", "8 8": never seen before
    assert PromptLookup().propose([5, 5, 5, 5], 2) == [5]  # the latest "5 5 5" has one token after it
    assert PromptLookup().propose([1], 4) == []


@pytest.mark.parametrize("right", [99, 0, 2])
def test_drafts_right_wrong_or_half_right_give_the_same_tokens(model, right):
    prompt = ids(1, 20)
    reqs = [("a", prompt, p(1)), ("g", prompt, p(2, t=0.0))]
    want, _, plain_steps = run(model, reqs, drafts=0)
    drafters = {rid: Scripted(want[rid][0], len(prompt), right) for rid, _, _ in reqs}
    got, eng, steps = run(model, reqs, drafters=drafters)
    assert got == want  # ids and logprobs, bit for bit
    assert eng.num_draft_tokens > 0
    if right == 99:  # all kept: drafts grow to 4 tokens a step
        assert eng.num_draft_kept == eng.num_draft_tokens and steps < plain_steps / 2
    if right == 0:
        assert eng.num_draft_kept == 0


def test_random_drafts_back_off_and_change_nothing(model):
    reqs = [(f"r{i}", ids(10 + i, 12 + i), p(i, n=20)) for i in range(3)]
    want, _, _ = run(model, reqs, drafts=0)
    got, eng, _ = run(model, reqs, drafters={rid: Random() for rid, _, _ in reqs})
    assert got == want
    # after misses, drafts come ever more rarely: far fewer than 4 per decoded token
    assert eng.num_draft_tokens < 3 * 20 * 4 / 3


def test_the_engine_drafts_by_prompt_lookup(model):
    """By default each sequence drafts by prompt lookup (a random model's text never repeats,
    so its drafts are rare; the demo's acceptance is measured by benchmarks/conversation.py)."""
    reqs = [("loop", ids(3, 10) * 3, p(0, n=20, t=0.0)), ("s", ids(4, 30), p(5, n=20))]
    want, _, _ = run(model, reqs, drafts=0)
    eng = LLMEngine(model, EngineConfig(num_draft_tokens=4))
    eng.add_request("x", [1, 2], p(0))
    # only where a step verifies the rows in one read of the weights: bf16 on the native step
    assert isinstance(eng._seqs["x"].drafter, PromptLookup) == (model.dtype == torch.bfloat16)
    eng = LLMEngine(model, EngineConfig(num_draft_tokens=0))
    eng.add_request("x", [1, 2], p(0))
    assert eng._seqs["x"].drafter is None
    assert run(model, reqs)[0] == want


def test_batched_mode_and_a_grammar_see_the_same_tokens(model):
    reqs = [("j", ids(5, 15), p(3, n=30, grammar='start: "{" /[a-z ]{1,20}/ "}"'))]
    backend = GrammarBackend()
    want, _, _ = run(model, reqs, drafts=0, grammars=backend)
    truth = {"j": Scripted(want["j"][0], 15)}
    got, eng, _ = run(model, reqs, drafters=truth, grammars=backend)
    assert got == want and eng.num_draft_kept > 0
    many = [(f"b{i}", ids(20 + i, 10), p(i, n=12, t=0.0)) for i in range(5)]
    want, _, _ = run(model, many, drafts=0, mode="batched")
    got, eng, _ = run(model, many, mode="batched",
                      drafters={rid: Scripted(want[rid][0], 10) for rid, _, _ in many})
    assert [got[r][0] for r, _, _ in many] == [want[r][0] for r, _, _ in many]
    assert eng.num_draft_kept > 0


def test_a_draft_never_runs_past_max_tokens_or_the_reservation(model):
    reqs = [("short", ids(6, 12), p(1, n=3))]
    want, _, _ = run(model, reqs, drafts=0)
    got, eng, _ = run(model, reqs, drafts=8,
                      drafters={"short": Scripted(want["short"][0] + [1] * 20, 12)})
    assert got == want and len(got["short"][0]) == 3
