import asyncio
import time

import pytest
import torch

from inhouse.config import EngineConfig
from inhouse.engine import (AsyncEngine, InvalidRequest, LLMEngine, QueueFull, SamplingParams)
from inhouse.engine.kv_manager import KVBlockManager, KVLayout
from inhouse.engine.sampling import sample
from inhouse.model import load_model
from inhouse.model.generate import greedy


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["hf"])


def prompt(i: int, n: int) -> list[int]:
    return [(1000 + 37 * i + 11 * j) % 199_000 for j in range(n)]


def run_all(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
            with_logprobs: bool = False):
    """Add requests at the given step numbers; run to completion; ids (and logprobs) per request."""
    outs: dict[str, list] = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for rid, ids, params in arrivals.pop(step, []):
            engine.add_request(rid, ids, params)
            outs[rid] = []
        for o in engine.step():
            outs[o.request_id] += ([(lp.token_id, lp.logprob) for lp in o.new_logprobs]
                                   if with_logprobs else o.new_token_ids)
        step += 1
    return outs


# ---- sampling --------------------------------------------------------------------------------
def test_sampling_is_seeded_and_greedy_at_zero_temperature():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    draw = lambda: [sample(logits, p, torch.Generator().manual_seed(5), [])[0] for _ in range(3)]
    assert draw() == draw()
    assert sample(logits, SamplingParams(temperature=0), torch.Generator(), [])[0] == int(logits.argmax())
    assert sample(logits, SamplingParams(top_k=1), torch.Generator(), [])[0] == int(logits.argmax())
    assert sample(logits, SamplingParams(top_p=1e-6), torch.Generator(), [])[0] == int(logits.argmax())
    assert sample(logits, SamplingParams(min_p=1.0), torch.Generator(), [])[0] == int(logits.argmax())


def test_top_k_restricts_the_support():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    top5 = set(torch.topk(logits, 5).indices.tolist())
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, SamplingParams(top_k=5, temperature=2.0), g, [])[0] for _ in range(200)}
    assert drawn <= top5 and len(drawn) > 1


def test_penalties_push_away_repeated_tokens():
    logits = torch.zeros(10)
    logits[3] = 1.0
    p = SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=0.6)
    assert sample(logits, p, torch.Generator(), [3])[0] != 3
    assert sample(logits, SamplingParams(temperature=0), torch.Generator(), [3])[0] == 3


def test_logprobs_are_the_model_distribution():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(2))
    token, lp = sample(logits, SamplingParams(temperature=0, logprobs=3), torch.Generator(), [])
    ref = torch.log_softmax(logits, -1)
    assert lp.token_id == token and abs(lp.logprob - float(ref[token])) < 1e-6
    assert [t for t, _ in lp.top] == torch.topk(ref, 3).indices.tolist()


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"presence_penalty": 3}, "presence_penalty"), ({"seed": -1}, "seed"),
])
def test_bad_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


# ---- KV bookkeeping ------------------------------------------------------------------------
def test_block_arithmetic_and_budget():
    layout = KVLayout(num_full_layers=2, num_sliding_layers=2, window=32, block_size=16,
                      bytes_per_token_layer=4)
    assert layout.blocks_for(1) == 2 + 2
    assert layout.blocks_for(32) == 2 * 2 + 2 * 2
    assert layout.blocks_for(100) == 7 * 2 + (2 + 1) * 2  # the window stays bounded
    kv = KVBlockManager(layout, budget_bytes=30 * 64)
    assert kv.num_blocks == 30 and kv.can_allocate(100) and not kv.fits_at_all(400)
    kv.allocate("a", 100)
    assert kv.num_free == 10 and not kv.can_allocate(100)
    kv.free("a")
    assert kv.num_free == 30


# ---- engine ---------------------------------------------------------------------------------
def test_engine_greedy_equals_the_reference_loop(model):
    engine = LLMEngine(model, EngineConfig(prefill_chunk=8, max_num_batched_tokens=24))
    arrivals = {0: [(f"r{i}", prompt(i, 20 + 7 * i), SamplingParams(max_tokens=12, temperature=0))
                    for i in range(4)]}
    outs = run_all(engine, arrivals)
    for i in range(4):
        assert outs[f"r{i}"] == greedy(model, prompt(i, 20 + 7 * i), 12)


def _seeded(i):
    return SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=100 + i, logprobs=0)


def _invariance_runs(model, cfg):
    reqs = [(f"r{i}", prompt(i, 10 + 9 * i), _seeded(i)) for i in range(5)]
    alone = {}
    for r in reqs:
        alone.update(run_all(LLMEngine(model, cfg), {0: [r]}, True))
    together = run_all(LLMEngine(model, cfg), {0: list(reqs)}, True)
    staggered = run_all(LLMEngine(model, cfg), {0: [reqs[4]], 2: [reqs[1], reqs[0]], 5: [reqs[3]],
                                                 9: [reqs[2]]}, True)
    small = EngineConfig(**{**cfg.__dict__, "max_num_seqs": 2})
    reversed_ = run_all(LLMEngine(model, small), {0: list(reversed(reqs))}, True)
    return alone, [together, staggered, reversed_]


def test_seeded_outputs_are_bit_identical_alone_or_in_any_batch(model):
    """Ids *and* the logprob floats: the numerics do not depend on the batch at all."""
    cfg = EngineConfig(prefill_chunk=8, max_num_batched_tokens=24, mode="reproducible")
    alone, others = _invariance_runs(model, cfg)
    assert all(o == alone for o in others)
    assert len({tuple(t for t, _ in v) for v in alone.values()}) == 5  # sampling really happened


def test_batched_mode_numerics_depend_on_the_batch(model):
    """Why the reproducible mode exists: the batched one shares matmuls across sequences."""
    cfg = EngineConfig(prefill_chunk=8, max_num_batched_tokens=24, mode="batched")
    alone, others = _invariance_runs(model, cfg)
    assert any(o != alone for o in others)


@pytest.mark.parametrize("mode", ["batched", "reproducible"])
def test_both_modes_run_several_sequences_per_pass(model, mode):
    engine = LLMEngine(model, EngineConfig(mode=mode, prefill_chunk=8))
    passes = []
    original = engine.runner.model.forward_batch
    engine.runner.model.forward_batch = (
        lambda feeds, **kw: passes.append((len(feeds), kw["independent"])) or original(feeds, **kw))
    try:
        outs = run_all(engine, {0: [(f"r{i}", prompt(i, 12), SamplingParams(max_tokens=5, temperature=0))
                                    for i in range(3)]})
    finally:
        engine.runner.model.forward_batch = original
    assert max(n for n, _ in passes) == 3
    assert {independent for _, independent in passes} == {mode == "reproducible"}
    for i in range(3):
        assert outs[f"r{i}"] == greedy(model, prompt(i, 12), 5)


def test_forward_batch_matches_separate_forwards(model):
    ids = [torch.tensor(prompt(i, 5 + 6 * i)) for i in range(3)]
    # 160 tokens x top-4 of 8 experts: ~80 rows per expert, above KERNEL_MAX_ROWS: the dense path too
    ids_mixed = ids + [torch.tensor(prompt(7, 160))]
    caches = [model.new_cache() for _ in ids]
    with torch.inference_mode():
        batched = model.forward_batch(list(zip(ids, caches)))
        alone = torch.stack([model(x, cache=model.new_cache(), last_only=True)[0] for x in ids])
        independent = model.forward_batch([(x, model.new_cache()) for x in ids], independent=True)
        mixed = model.forward_batch([(x, model.new_cache()) for x in ids_mixed], independent=True)
        mixed_alone = torch.stack([model(x, cache=model.new_cache(), last_only=True)[0]
                                   for x in ids_mixed])
    assert (batched - alone).abs().max() < 1e-4
    assert torch.equal(independent, alone)  # bit for bit
    assert torch.equal(mixed, mixed_alone)
    assert [c.num_tokens for c in caches] == [5, 11, 17]


def test_long_prompt_does_not_stall_running_decodes(model):
    engine = LLMEngine(model, EngineConfig(prefill_chunk=16, max_num_batched_tokens=17))
    engine.add_request("short", prompt(0, 4), SamplingParams(max_tokens=30, temperature=0))
    engine.step()  # prefill of the short one; it decodes from now on
    engine.add_request("long", prompt(1, 160), SamplingParams(max_tokens=2, temperature=0))
    for _ in range(8):
        plan_ids = {o.request_id for o in engine.step()}
        assert "short" in plan_ids  # a token for the running request every single step


def test_stop_tokens_and_finish_reasons(model):
    first = greedy(model, prompt(3, 10), 6)
    engine = LLMEngine(model)
    outs = {}
    engine.add_request("stop", prompt(3, 10), SamplingParams(max_tokens=6, temperature=0,
                                                             stop_token_ids=(first[2],)))
    engine.add_request("len", prompt(3, 10), SamplingParams(max_tokens=4, temperature=0))
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = (o.finish_reason, o.num_output_tokens)
    assert outs == {"stop": ("stop", 3), "len": ("length", 4)}


def test_kv_tensors_stay_within_the_reservation(model):
    engine = LLMEngine(model, EngineConfig(prefill_chunk=7))
    engine.add_request("a", prompt(0, 40), SamplingParams(max_tokens=13, temperature=0))
    seq = engine._seqs["a"]
    peak = 0
    while engine.has_unfinished():
        engine.step()
        if seq.cache is not None:
            peak = max(peak, max(l.k.shape[1] for l in seq.cache.layers))
    assert seq.reserve_tokens == 53 and 40 <= peak <= 53  # doubling would have reached 64


def test_cancel_frees_the_kv_cache(model):
    engine = LLMEngine(model)
    engine.add_request("a", prompt(0, 30), SamplingParams(max_tokens=50))
    engine.add_request("b", prompt(1, 30), SamplingParams(max_tokens=50))
    for _ in range(3):
        engine.step()
    seq = engine._seqs["a"]
    assert engine.kv.holds("a") and seq.cache is not None
    out = engine.abort_request("a")
    assert out.finished and out.finish_reason == "abort"
    assert not engine.kv.holds("a") and seq.cache is None
    assert engine.stats().num_running == 1


def test_a_failed_step_fails_its_requests_and_frees_memory(model, monkeypatch):
    engine = LLMEngine(model)
    engine.add_request("a", prompt(0, 10), SamplingParams(max_tokens=5))
    engine.step()

    def boom(chunks):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine.runner, "run", boom)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason, o.finished) for o in outs] == [("a", "error", True)]
    assert "simulated kernel failure" in outs[0].error
    assert engine.kv.num_held == 0 and not engine.has_unfinished()


def test_a_full_budget_queues_new_requests_and_running_ones_finish(model):
    one = LLMEngine(model).kv.layout.blocks_for(40)
    cfg = EngineConfig(kv_budget_bytes=one * LLMEngine(model).kv.layout.bytes_per_block)
    engine = LLMEngine(model, cfg)
    for i in range(3):
        engine.add_request(f"r{i}", prompt(i, 20), SamplingParams(max_tokens=20, temperature=0))
    finished, max_running = [], 0
    while engine.has_unfinished():
        for o in engine.step():
            assert o.finish_reason in (None, "length")
            if o.finished:
                finished.append(o.request_id)
        max_running = max(max_running, engine.stats().num_running)
    assert finished == ["r0", "r1", "r2"] and max_running == 1


def test_refusals(model):
    engine = LLMEngine(model, EngineConfig(max_waiting=1, kv_budget_bytes=1 << 20))
    with pytest.raises(InvalidRequest, match="context window"):
        engine.add_request("x", [1] * model.config.max_position_embeddings, SamplingParams())
    with pytest.raises(InvalidRequest, match="KV budget"):
        engine.add_request("x", [1] * 10, SamplingParams(max_tokens=100_000))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request("x", [], SamplingParams())
    with pytest.raises(InvalidRequest, match=r"token ids must be in"):
        engine.add_request("x", [model.config.vocab_size], SamplingParams())
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=4))
    with pytest.raises(QueueFull):
        engine.add_request("b", [1, 2], SamplingParams(max_tokens=4))


# ---- async client ------------------------------------------------------------------------------
def test_async_streams_concurrent_requests_and_cancels(model):
    client = AsyncEngine(LLMEngine(model))

    async def collect(rid, ids, n):
        out = []
        async for o in client.generate(rid, ids, SamplingParams(max_tokens=n, temperature=0)):
            out += o.new_token_ids
        return out

    async def cancel_early():
        got = 0
        async for o in client.generate("c", prompt(9, 8), SamplingParams(max_tokens=200)):
            got += len(o.new_token_ids)
            if got >= 3:
                break
        return got

    async def main():
        results = await asyncio.gather(collect("a", prompt(1, 9), 7), collect("b", prompt(2, 14), 5),
                                       cancel_early())
        for _ in range(100):  # the abort reaches the engine thread
            if not client.engine.kv.holds("c"):
                break
            await asyncio.sleep(0.01)
        return results

    try:
        a, b, got = asyncio.run(main())
        assert a == greedy(model, prompt(1, 9), 7) and b == greedy(model, prompt(2, 14), 5)
        assert got == 3 and client.engine.kv.num_held == 0
    finally:
        client.shutdown()


def test_a_cancel_reaches_a_consumer_the_engine_is_ahead_of(model):
    """Ctrl-C in `inhouse chat` cancels the task that prints the answer. When printing is
    slower than decoding (a slow terminal), the queue is never empty; the stream must still
    stop at the next output, not run on to max_tokens."""
    client = AsyncEngine(LLMEngine(model))

    async def slow_reader():
        outputs, cancelled = 0, False
        try:
            async for _ in client.generate("s", prompt(4, 8), SamplingParams(max_tokens=300)):
                outputs += 1
                time.sleep(0.02)  # printing, blocking the loop: the engine thread runs ahead
                if outputs == 5:
                    asyncio.current_task().cancel()  # what the SIGINT handler does
        except asyncio.CancelledError:
            cancelled = True
        return outputs, cancelled

    try:
        outputs, cancelled = asyncio.run(slow_reader())
        assert cancelled and outputs == 5, outputs  # cancelled at once, not after more outputs
        for _ in range(100):  # and the abort reaches the engine thread
            if not client.engine.kv.holds("s"):
                break
            time.sleep(0.01)
        assert not client.engine.kv.holds("s")
    finally:
        client.shutdown()


def test_async_engine_survives_a_failing_step(model, monkeypatch):
    engine = LLMEngine(model)
    client = AsyncEngine(engine)
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(ValueError("sampler broke")))

    async def one(rid):
        return [o async for o in client.generate(rid, prompt(0, 5), SamplingParams(max_tokens=3))]

    try:
        outs = asyncio.run(one("a"))
        assert outs[-1].finished and outs[-1].finish_reason == "error"
        assert "sampler broke" in outs[-1].error and engine.kv.num_held == 0
        monkeypatch.setattr(engine, "step", real_step)  # the thread is still serving
        assert asyncio.run(one("b"))[-1].finish_reason == "length"
    finally:
        client.shutdown()


def test_async_refusal_raises_before_streaming(model):
    client = AsyncEngine(LLMEngine(model))

    async def main():
        async for _ in client.generate("x", [], SamplingParams()):
            pass

    try:
        with pytest.raises(InvalidRequest, match="empty"):
            asyncio.run(main())
    finally:
        client.shutdown()
