"""Prefix caching: a hit must give what recomputing gives, never leak across tenants, and never
starve a sequence of KV memory.

The tiny model has a sliding window of 16; the engines here cache blocks of 4 tokens and prefill
in chunks of 8, so a reused prefix spans many blocks, chunks and windows.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inhouse.config import EngineConfig
from inhouse.engine import LLMEngine, SamplingParams
from inhouse.engine.prefix_cache import PrefixCache
from inhouse.engine.request import Sequence
from inhouse.model import load_model

BLOCK, CHUNK = 4, 8


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, checkpoints):
    """fp32 takes the module path; bf16 the native decode step (which reads the loaded cache)."""
    return load_model(checkpoints["hf"], dtype=getattr(torch, request.param))


def engine(model, mode: str = "reproducible", caching: bool = True, **kw) -> LLMEngine:
    config = EngineConfig(**{"block_size": BLOCK, "prefill_chunk": CHUNK,
                             "max_num_batched_tokens": 64, "mode": mode,
                             "prefix_caching": caching, **kw})
    return LLMEngine(model, config)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 199_000) for _ in range(n)]


def params(seed: int, salt: str | None = None, n: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=1.0, seed=seed, logprobs=2, cache_salt=salt)


def run(eng: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    """All requests at once; per request (token ids, logprobs with their top 2, cached tokens)."""
    out: dict[str, list] = {rid: [[], [], 0] for rid, _, _ in requests}
    for rid, prompt, p in requests:
        eng.add_request(rid, prompt, p)
    while eng.has_unfinished():
        for o in eng.step():
            r = out[o.request_id]
            r[0] += o.new_token_ids
            r[1] += [(lp.token_id, lp.logprob, lp.top) for lp in o.new_logprobs]
            r[2] = o.num_cached_tokens
    return {k: tuple(map(lambda v: tuple(v) if isinstance(v, list) else v, r))
            for k, r in out.items()}


def fresh(model, rid, prompt, p) -> tuple:
    return run(engine(model, caching=False), [(rid, prompt, p)])[rid]


# ---- reproducible mode: a hit is the same bits as recomputing ----------------------------------
def test_a_hit_gives_the_bits_of_recomputing(model):
    shared = ids(0, 45)  # 5 chunks and a bit: the hit is the 40 tokens of whole chunks
    eng = engine(model)
    first = run(eng, [("a", shared + ids(1, 7), params(1))])["a"]
    assert first[2] == 0
    for i, tail in enumerate([ids(2, 9), ids(3, 1), ids(4, 30)]):
        p = params(10 + i)
        got = run(eng, [(f"b{i}", shared + tail, p)])[f"b{i}"]
        assert got[2] == 40  # whole chunks only: the rest is computed as a fresh request would
        want = fresh(model, "x", shared + tail, p)
        assert got[:2] == want[:2]  # ids and logprobs, bit for bit
    assert eng.kv.num_held == 0 and eng.kv.num_cached > 0


def test_the_next_turn_of_a_conversation_reuses_the_last_prompt(model):
    eng = engine(model)
    convo, prev_len = ids(5, 30), 0
    for turn in range(4):
        got = run(eng, [(f"t{turn}", convo, params(turn))])[f"t{turn}"]
        assert got[2] == prev_len // CHUNK * CHUNK  # the last prompt's whole chunks
        assert got[:2] == fresh(model, "x", convo, params(turn))[:2]
        prev_len = len(convo)
        convo = convo + list(got[0][:-1]) + ids(100 + turn, 11)  # the answer, then the user


def test_hits_are_bit_identical_inside_a_running_batch(model):
    """Several requests on one shared prefix, admitted together and in a batch with others."""
    shared = ids(6, 33)
    eng = engine(model)
    run(eng, [("warm", shared + [5], params(0, n=2))])
    reqs = [(f"r{i}", shared + ids(20 + i, 3 + 5 * i), params(30 + i)) for i in range(4)]
    reqs.append(("other", ids(99, 20), params(99)))
    got = run(eng, reqs)
    for rid, prompt, p in reqs:
        assert got[rid][:2] == fresh(model, rid, prompt, p)[:2]
    assert [got[f"r{i}"][2] for i in range(4)] == [32] * 4 and got["other"][2] == 0


def test_a_prompt_inside_a_cached_one_still_computes_its_last_token(model):
    shared = ids(7, 48)
    eng = engine(model)
    run(eng, [("long", shared + ids(8, 20), params(0, n=1))])
    for n in (48, 41, 40, 9, 8, 1):
        got = run(eng, [(f"p{n}", shared[:n], params(n))])[f"p{n}"]
        assert got[2] == (n - 1) // CHUNK * CHUNK
        assert got[:2] == fresh(model, "x", shared[:n], params(n))[:2]


def test_tenants_and_adapters_never_share(model):
    shared = ids(9, 40)
    eng = engine(model)
    run(eng, [("a", shared + [1], params(0, salt="tenant-a"))])
    assert run(eng, [("b", shared + [2], params(0, salt="tenant-b"))])["b"][2] == 0
    assert run(eng, [("n", shared + [2], params(0))])["n"][2] == 0
    assert run(eng, [("a2", shared + [3], params(0, salt="tenant-a"))])["a2"][2] == 40
    # the salt and the adapter name cannot be shifted into each other
    def namespace(**kw) -> str:
        return Sequence("x", [1], SamplingParams(**kw), 0, 2).cache_namespace

    assert namespace(cache_salt="a") != namespace(adapter="a")
    assert namespace(cache_salt="a", adapter="b\x00") != namespace(cache_salt="a\x00b")
    assert namespace(cache_salt="a\x00b") != namespace(cache_salt="a", adapter="b")


# ---- batched mode: blocks, outputs included ---------------------------------------------------
def test_batched_mode_reuses_the_last_prompt_up_to_its_last_block(model):
    # chunks of 32 over a window of 16: a chunk ending at 61 would leave the sliding layers
    # without the window before 60; the chunk is split at 60 instead
    eng = engine(model, mode="batched", prefill_chunk=32)
    prompt = ids(13, 61)
    run(eng, [("a", prompt, params(1, n=2))])
    got = run(eng, [("b", prompt + ids(14, 9), params(2))])["b"]
    assert got[2] == 60


def test_batched_mode_reuses_blocks_and_the_answer(model):
    eng = engine(model, mode="batched")
    prompt = ids(11, 30)
    first = run(eng, [("a", prompt, params(1, n=20))])["a"]
    follow = prompt + list(first[0]) + ids(12, 5)
    got = run(eng, [("b", follow, params(2))])["b"]
    # every whole block the first request computed, its answer's included (not its last token)
    assert got[2] == (len(prompt) + 20 - 1) // BLOCK * BLOCK
    want = run(engine(model, mode="batched", caching=False), [("b", follow, params(2))])["b"]
    if model.dtype == torch.float32:  # the same prefix from other arithmetic: close, not bits
        assert got[0] == want[0]


# ---- memory --------------------------------------------------------------------------------
def test_cached_blocks_give_way_to_running_sequences(model):
    probe = engine(model)
    per_seq = probe.kv.layout.blocks_for(60 + 8) * probe.kv.layout.bytes_per_block
    # two sequences at a time reserve two thirds of the budget: the cache lives in the rest
    eng = engine(model, kv_budget_bytes=3 * per_seq)
    for i in range(6):  # each leaves blocks behind; the budget is never exceeded
        run(eng, [(f"s{i}", ids(40 + i, 60), params(i, n=8)), (f"t{i}", ids(50 + i, 60),
                                                              params(i, n=8))])
        assert eng.kv.num_used <= eng.kv.num_blocks and eng.kv.num_held == 0
    assert 0 < eng.kv.prefix.nbytes <= eng.kv.num_blocks * eng.kv.layout.bytes_per_block
    # the last prompts share what room there was (neither evicts the other's blocks as they are
    # captured); the oldest are gone
    hits = [run(eng, [(f"again{i}", ids(i, 60), params(0, n=2))])[f"again{i}"][2]
            for i in (45, 55, 40)]
    assert hits[0] > 0 and hits[1] > 0 and hits[2] == 0 and sum(hits[:2]) <= 60


def test_lru_evicts_leaves_before_their_root():
    cache = PrefixCache(2, [None])
    kv = (torch.zeros(1, 2, 1), torch.zeros(1, 2, 1))
    keys = cache.block_keys([1, 2, 3, 4, 5, 6], "", 3)
    other = cache.block_keys([9, 9], "", 1)[0]
    for i, key in enumerate(keys):
        cache.insert(key, keys[i - 1] if i else None, [kv])
    cache.insert(other, None, [kv])
    assert cache.match([1, 2, 3, 4, 5, 6, 7], "", 2, 6).num_tokens == 6  # other: least recent
    cache.evict_one()
    assert cache.match([9, 9, 1], "", 2, 2) is None
    cache.evict_one()  # the chain's leaf, though its root was used as recently
    assert cache.match([1, 2, 3, 4, 5, 6, 7], "", 2, 6).num_tokens == 4
    assert cache.evict_one() and cache.evict_one() and not cache.evict_one() and not len(cache)
    assert cache.nbytes == 0


def test_a_sliding_layer_without_its_window_blocks_the_hit():
    cache = PrefixCache(2, [None, 4])
    kv = (torch.zeros(1, 2, 1), torch.zeros(1, 2, 1))
    keys = cache.block_keys(list(range(8)), "", 4)
    for i, key in enumerate(keys):  # block 2 lost its sliding layer (captured too late)
        cache.insert(key, keys[i - 1] if i else None, [kv, None if i == 2 else kv])
    hit = cache.match(list(range(9)), "", 2, 8)
    assert hit.num_tokens == 4  # 8 and 6 need block 2's window
    assert [len(p) for p in hit.layers] == [2, 2]


# ---- the hostile mix: any prompts, any order, any budget -------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mix_of_shared_prefixes_gives_what_recomputing_gives(model, data):
    bases = [ids(s, 40) for s in range(3)]
    n = data.draw(st.integers(2, 5))
    reqs = []
    for i in range(n):
        base = data.draw(st.sampled_from(bases))
        cut = data.draw(st.integers(1, 40))
        tail = ids(data.draw(st.integers(200, 400)), data.draw(st.integers(0, 12)))
        salt = data.draw(st.sampled_from([None, "t1", "t2"]))
        reqs.append((f"q{i}", base[:cut] + tail, params(i, salt=salt, n=4)))
    budget = data.draw(st.sampled_from([1 << 20, 1 << 30]))
    eng = engine(model, kv_budget_bytes=budget)
    together = data.draw(st.booleans())
    got = run(eng, reqs) if together else {
        rid: run(eng, [(rid, p, sp)])[rid] for rid, p, sp in reqs}
    for rid, prompt, p in reqs:
        assert got[rid][:2] == fresh(model, rid, prompt, p)[:2], rid
    assert eng.kv.num_held == 0 and eng.kv.num_used <= eng.kv.num_blocks
