"""One request's failure ends that request alone (issue 17, finding 3): degenerate sampling
numbers, non-finite logits, a kernel error on its rows. The innocent requests beside it finish
with exactly the tokens they would have had alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from inhouse.config import EngineConfig
from inhouse.engine import LLMEngine, SamplingParams
from inhouse.engine.sampling import sample
from inhouse.model import load_model

from tests.test_engine import prompt, run_all

CFG = EngineConfig(prefill_chunk=8, max_num_batched_tokens=64, mode="reproducible")


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["hf"])


def _innocent(i: int):
    return (f"ok{i}", prompt(i, 9 + 3 * i), SamplingParams(max_tokens=6, seed=50 + i, top_p=0.9))


def _alone(model, reqs):
    out = {}
    for r in reqs:
        out.update(run_all(LLMEngine(model, CFG), {0: [r]}))
    return out


@settings(max_examples=60, deadline=None)
@given(temperature=st.floats(min_value=0, max_value=2, allow_subnormal=True),
       top_p=st.floats(min_value=0, max_value=1, exclude_min=True, allow_subnormal=True),
       min_p=st.floats(min_value=0, max_value=1, allow_subnormal=True),
       top_k=st.integers(min_value=0, max_value=5))
def test_the_sampler_never_fails_on_valid_parameters(temperature, top_p, min_p, top_k):
    params = SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
                            logprobs=2)
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 30
    token, lp = sample(logits, params, torch.Generator().manual_seed(0), [])
    assert 0 <= token < 50 and lp is not None and lp.logprob == lp.logprob  # not NaN


@pytest.mark.parametrize("poison", [dict(temperature=1e-39), dict(temperature=5e-324),
                                    dict(top_p=1.4e-45), dict(top_p=1e-300, temperature=2.0)])
def test_degenerate_sampling_numbers_are_greedy_and_touch_no_one(model, poison):
    innocents = [_innocent(i) for i in range(6)]
    bad = ("bad", prompt(9, 12), SamplingParams(max_tokens=6, seed=3, **poison))
    together = run_all(LLMEngine(model, CFG), {0: innocents[:3] + [bad] + innocents[3:]})
    assert {k: v for k, v in together.items() if k != "bad"} == _alone(model, innocents)
    greedy = run_all(LLMEngine(model, CFG), {0: [("g", bad[1], SamplingParams(max_tokens=6,
                                                                               temperature=0))]})
    if poison.get("temperature", 1) < 1e-5:
        assert together["bad"] == greedy["g"]
    assert len(together["bad"]) == 6


def test_non_finite_logits_fail_only_their_request(model, monkeypatch):
    engine = LLMEngine(model, CFG)
    real_run = engine.runner.run

    def run(chunks):
        rows = real_run(chunks)
        return [torch.full_like(r, float("nan")) if c.seq.request_id == "bad" else r
                for c, r in zip(chunks, rows)]

    monkeypatch.setattr(engine.runner, "run", run)
    innocents = [_innocent(i) for i in range(4)]
    outs = {}
    for rid, ids, params in innocents[:2] + [("bad", prompt(9, 12), SamplingParams(max_tokens=6))] \
            + innocents[2:]:
        engine.add_request(rid, ids, params)
        outs[rid] = []
    reasons = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = (o.finish_reason, o.error)
    assert reasons["bad"][0] == "error" and "non-finite" in reasons["bad"][1]
    assert {k: v for k, v in outs.items() if k != "bad"} == _alone(model, innocents)
    assert engine.kv.num_held == 0


@pytest.mark.parametrize("fail_at", [0, 3])  # in the prompt's step, or mid-decode
def test_a_kernel_error_on_one_sequence_fails_it_alone(model, monkeypatch, fail_at):
    """A batched step that raises is retried sequence by sequence from fresh caches; only the
    one that fails alone fails, and the others keep their bits (reproducible mode)."""
    engine = LLMEngine(model, CFG)
    real_run = engine.runner.run
    steps = {"n": 0}

    def run(chunks):
        steps["n"] += 1
        if steps["n"] > fail_at and any(c.seq.request_id == "bad" for c in chunks):
            raise RuntimeError("simulated kernel fault on the bad rows")
        return real_run(chunks)

    monkeypatch.setattr(engine.runner, "run", run)
    innocents = [_innocent(i) for i in range(5)]
    arrivals = {0: innocents[:3] + [("bad", prompt(9, 12), SamplingParams(max_tokens=6))],
                1: innocents[3:]}
    outs = run_all(engine, arrivals)
    assert {k: v for k, v in outs.items() if k != "bad"} == _alone(model, innocents)
    assert len(outs["bad"]) <= fail_at
    assert engine.kv.num_held == 0 and not engine.has_unfinished()


@pytest.mark.parametrize("fault", ["allowed", "consume"])
def test_a_grammar_that_raises_fails_only_its_request(model, fault):
    """A grammar backend that raises (asked what it allows, or fed the drawn token) ends its
    request with an error; the requests beside it keep the tokens they have alone."""
    import numpy as np

    class Faulty:
        is_cut = False

        def allowed(self, remaining):
            if fault == "allowed":
                raise ValueError("grammar backend fault")
            return np.ones(model.config.vocab_size, dtype=bool)

        def consume(self, token):
            raise ValueError("grammar backend fault")

    class Compiler:
        def new_matcher(self, grammar):
            return Faulty()

    innocents = [_innocent(i) for i in range(3)]
    bad = ("bad", prompt(9, 12), SamplingParams(max_tokens=6, grammar="start: /a/"))
    engine = LLMEngine(model, CFG, grammars=Compiler())
    outs = run_all(engine, {0: innocents[:2] + [bad] + innocents[2:]})
    assert outs.pop("bad") == [] and outs == _alone(model, innocents)
    assert engine.kv.num_held == 0 and not engine.has_unfinished()


# ---- issue 17, finding 7: adapters at bf16, batched with base-model requests -----------------------
def test_adapters_serve_at_bf16_batched_with_base_requests(checkpoints):
    from inhouse.model.lora import LoraSpec, add_adapter, adapter_parameters

    model = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    add_adapter(model, "ft", LoraSpec(rank=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(model, "ft"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    base = ("base", prompt(1, 10), SamplingParams(max_tokens=6, temperature=0))
    tuned = ("tuned", prompt(1, 10), SamplingParams(max_tokens=6, temperature=0, adapter="ft"))
    alone = {**run_all(LLMEngine(model, CFG), {0: [base]}),
             **run_all(LLMEngine(model, CFG), {0: [tuned]})}
    engine = LLMEngine(model, CFG)
    outs, reasons = {}, {}
    for rid, ids, params in (base, tuned):
        engine.add_request(rid, ids, params)
        outs[rid] = []
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = (o.finish_reason, o.error)
    assert reasons == {"base": ("length", None), "tuned": ("length", None)}
    assert outs == alone  # together as alone, in reproducible mode
    assert outs["base"] != outs["tuned"]  # the adapter really changes the answer
