"""Sampling on the device (kernels/cuda/sampling.py, engine/device_sampler.py): the kernel draws
what its reference draws, from the distribution the host sampler draws from, the same token for
a row alone or batched; and the engine on the cuda backend draws every row there, with penalties,
logprobs, grammars and failing rows as on the host. Under Triton's interpreter where there is no
GPU (`pytest --device cuda` on one)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from inhouse.config import EngineConfig
from inhouse.engine import LLMEngine, SamplingParams
from inhouse.engine import engine as engine_module
from inhouse.engine.sampling import filtered_probs
from inhouse.kernels import backend
from inhouse.kernels.cuda import sampling
from inhouse.model import load_model
from tests.test_engine import prompt, run_all

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's exp


@pytest.fixture(scope="module")
def dev(device) -> str:
    if not backend.triton_available():
        pytest.fail("triton is not installed (make setup-test installs it)")
    return device


def _draw(x, dev, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, keys=None, block=None):
    B = x.shape[0]
    keys = keys if keys is not None else [sampling.draw_key(7, i) for i in range(B)]

    def full(v, dtype=torch.float32):
        return torch.full((B,), v, dtype=dtype, device=dev)

    return sampling.sample(x.to(dev), full(temperature), full(top_k, torch.int32), full(top_p),
                           full(min_p), torch.tensor(keys, device=dev), block=block).tolist()


FILTERS = [dict(), dict(temperature=0.0), dict(temperature=0.6, top_k=40),
           dict(top_p=0.8), dict(min_p=0.05, temperature=1.4), dict(top_k=5, top_p=0.5, min_p=0.1)]


@pytest.mark.parametrize("filters", FILTERS)
def test_the_kernel_draws_what_its_reference_draws(dev, filters):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3000, generator=g) * 3  # three blocks of 1024 and a ragged end
    keys = [sampling.draw_key(11, i) for i in range(6)]
    got = _draw(x, dev, keys=keys, block=1024, **filters)
    args = {k: filters.get(k, v) for k, v in dict(temperature=1.0, top_k=0, top_p=1.0,
                                                   min_p=0.0).items()}
    want = [sampling.sample_reference(x[i], key=keys[i], **args) for i in range(6)]
    assert got == want


def test_a_rows_draw_is_the_same_alone_or_batched(dev):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3000, generator=g) * 2
    keys = [sampling.draw_key(5, i) for i in range(5)]
    for filters in (dict(), dict(top_p=0.9, top_k=50)):
        batched = _draw(x, dev, keys=keys, block=1024, **filters)
        alone = [_draw(x[i:i + 1], dev, keys=keys[i:i + 1], block=1024, **filters)[0]
                 for i in range(5)]
        assert batched == alone


def test_greedy_takes_the_first_of_the_largest_across_blocks(dev):
    x = torch.zeros(1, 3000)
    x[0, 2500] = x[0, 1700] = x[0, 900] = 4.0
    assert _draw(x, dev, temperature=0.0, block=1024) == [900]


DISTRIBUTIONS = [SamplingParams(temperature=0.8, top_k=4), SamplingParams(top_p=0.7),
                 SamplingParams(min_p=0.2, temperature=1.3),
                 SamplingParams(top_k=6, top_p=0.9, min_p=0.02)]
LOGITS = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 2.2, -3.0])


def _filters(params: SamplingParams) -> dict:
    return dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                min_p=params.min_p)


@pytest.mark.parametrize("params", DISTRIBUTIONS)
def test_draws_follow_the_host_samplers_distribution(params):
    """2,000 draws of one row under as many keys (the kernel's arithmetic, by its reference)
    against engine.sampling's distribution: nothing outside what it keeps, and Pearson's
    chi-square under its 0.1% critical value."""
    n = 2000
    tokens = [sampling.sample_reference(LOGITS, key=sampling.draw_key(seed, 0), **_filters(params))
              for seed in range(n)]
    p = filtered_probs(LOGITS, params, [])
    p = p / p.sum()
    counts = torch.bincount(torch.tensor(tokens), minlength=10).float()
    assert not counts[p == 0].any()
    kept = p > 0
    chi2 = float(((counts[kept] - n * p[kept]) ** 2 / (n * p[kept])).sum())
    dof = int(kept.sum()) - 1
    # Wilson-Hilferty: the chi-square quantile from the normal's (z = 3.09 at 0.1%)
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical, (chi2, critical, counts.tolist())


def test_the_kernel_draws_those_draws(dev):
    """The distribution test's draws, by the kernel itself (a few keys per filter)."""
    for params in DISTRIBUTIONS:
        keys = [sampling.draw_key(seed, 0) for seed in range(12)]
        got = _draw(LOGITS.expand(12, -1).contiguous(), dev, keys=keys, **_filters(params))
        assert got == [sampling.sample_reference(LOGITS, key=k, **_filters(params)) for k in keys]


@settings(max_examples=25, deadline=None)
@given(temperature=st.floats(min_value=0, max_value=2, allow_subnormal=True),
       top_p=st.floats(min_value=0, max_value=1, exclude_min=True, allow_subnormal=True),
       min_p=st.floats(min_value=0, max_value=1, allow_subnormal=True),
       top_k=st.integers(min_value=0, max_value=5),
       scale=st.sampled_from([1.0, 30.0, 1e4]))
def test_the_kernel_never_fails_on_valid_parameters(temperature, top_p, min_p, top_k, scale):
    x = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)) * scale
    x[0, 7] = float("-inf")  # a grammar's mask
    (token,) = _draw(x, "cpu" if not torch.cuda.is_available() else "cuda",
                     temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    assert 0 <= token < 50 and token != 7


def test_draw_keys_differ_by_seed_and_step():
    keys = {sampling.draw_key(seed, step) for seed in (0, 1, 2**62) for step in range(50)}
    assert len(keys) == 150 and all(-2**63 <= k < 2**63 for k in keys)


# ---- the engine on the cuda backend ------------------------------------------------------------
CFG = EngineConfig(prefill_chunk=8, max_num_batched_tokens=64, mode="reproducible")


@pytest.fixture(scope="module")
def cuda_model(checkpoints, dev):
    return load_model(checkpoints["hf"], backend="cuda", device=dev)


@pytest.fixture
def no_host_draws(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the cuda backend drew on the host")
    monkeypatch.setattr(engine_module, "sample", refuse)


def _request(i: int, **kw):
    return (f"r{i}", prompt(i, 9 + 3 * i),
            SamplingParams(max_tokens=4, seed=40 + i, top_p=0.95, logprobs=2, **kw))


@pytest.fixture(scope="module")
def alone(cuda_model):
    """Requests r0 (with penalties) and r1 (top-k), each run by itself."""
    out = {}
    for r in (_request(0, frequency_penalty=1.5, presence_penalty=0.5), _request(1, top_k=3)):
        out |= run_all(LLMEngine(cuda_model, CFG), {0: [r]}, with_logprobs=True)
    return out


def test_the_engine_draws_on_the_device_the_same_alone_or_batched(cuda_model, alone,
                                                                  no_host_draws):
    reqs = [_request(0, frequency_penalty=1.5, presence_penalty=0.5), _request(1, top_k=3),
            _request(2, temperature=0.0)]
    together = run_all(LLMEngine(cuda_model, CFG), {0: reqs[:2], 1: reqs[2:]},
                       with_logprobs=True)
    assert {k: together[k] for k in alone} == alone
    assert all(len(v) == 4 for v in together.values())
    # the frequency penalty: no token repeats in so short an answer of a random model
    ids = [t for t, _ in together["r0"]]
    assert len(set(ids)) == len(ids)


def test_non_finite_logits_fail_only_their_request_on_the_device(cuda_model, alone, monkeypatch,
                                                                 no_host_draws):
    engine = LLMEngine(cuda_model, CFG)
    real_run = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda chunks: [
        torch.full_like(r, float("nan")) if c.seq.request_id == "bad" else r
        for c, r in zip(chunks, real_run(chunks))])
    reqs = [_request(0, frequency_penalty=1.5, presence_penalty=0.5),
            ("bad", prompt(9, 12), SamplingParams(max_tokens=4)), _request(1, top_k=3)]
    outs = run_all(engine, {0: reqs}, with_logprobs=True)
    assert outs.pop("bad") == [] and engine.kv.num_held == 0
    assert outs == alone


def test_a_grammar_holds_on_the_device(cuda_model, no_host_draws):
    from inhouse.harmony import ChatMessage, render_prompt
    from inhouse.harmony.constraints import answer_grammar
    from inhouse.harmony.grammar import GrammarBackend

    grammar = answer_grammar({"type": "object", "properties": {"a": {"type": "integer"}},
                              "required": ["a"], "additionalProperties": False})
    engine = LLMEngine(cuda_model, CFG, grammars=GrammarBackend())
    out = run_all(engine, {0: [("g", render_prompt([ChatMessage("user", "hi")]),
                                SamplingParams(max_tokens=8, seed=1, grammar=grammar))]})
    m = GrammarBackend().new_matcher(grammar)
    assert out["g"] and all(m.consume(t) for t in out["g"])
