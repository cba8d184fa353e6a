"""Decode steps through model/cuda_graphs.py's static buffers, on CPU without the capture itself
(`capture=False`: the same step function on the same buffers; Triton's interpreter runs the
kernels). `pytest -m gpu` (test_gpu.py) checks the captured graphs."""

from __future__ import annotations

import pytest

from inhouse.config import EngineConfig
from inhouse.engine import LLMEngine, SamplingParams
from inhouse.model import load_model
from inhouse.model.cuda_graphs import DecodeGraphs, bucket_of
from inhouse.model.paged_cache import PagedPools
from tests.conftest import random_ids

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter


@pytest.fixture(scope="module")
def graphed(checkpoints):
    model = load_model(checkpoints["hf"], backend="cuda")
    model.use_paged_kv(PagedPools.sized(model.config, model.dtype, model.device, 1 << 22, 4, 64))
    model.decode_graphs = DecodeGraphs(model, capture=False)
    return model


def _run(model, prompts, params, cfg):
    return _drain(LLMEngine(model, cfg), prompts, params)


def _drain(engine, prompts, params):
    """Requests r0, r1, ... run to the end -> id -> [(token, logprob or None)]."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    out: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            logprobs = [lp.logprob for lp in o.new_logprobs] or [None] * len(o.new_token_ids)
            out.setdefault(o.request_id, []).extend(zip(o.new_token_ids, logprobs))
    return out


def test_buckets():
    assert [bucket_of(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, None]


def test_graph_steps_decode_as_the_cpu_backend_does(graphed, checkpoints, tiny_config):
    """Three sequences (bucket 4: a padding row), the third sharing a 16-token block with the
    first (the prefix cache loads it into pages), greedy, against the CPU backend's engine."""
    cpu = load_model(checkpoints["hf"], backend="cpu")
    prompts = [random_ids(n, tiny_config.vocab_size, seed=n).tolist() for n in (19, 5, 21)]
    prompts[2] = prompts[0][:18] + prompts[2][18:]
    params = [SamplingParams(max_tokens=5, temperature=0)] * 3
    cfg = EngineConfig(prefill_chunk=8, max_num_batched_tokens=24, max_num_seqs=4,
                       block_size=16, kv_budget_bytes=1 << 22)
    graphed.decode_graphs.steps.clear()
    results = []
    for model in (graphed, cpu):
        engine = LLMEngine(model, cfg)
        out = _drain(engine, prompts[:2], params)  # the first two, then the third
        out |= {"r2": _drain(engine, prompts[2:], params)["r0"]}
        results.append((out, engine.stats().prefix_hit_tokens))
    assert results[0] == results[1]
    assert results[0][1] == 16  # the third reused the first's block, into pages too
    assert {k for k, _ in graphed.decode_graphs.steps} >= {2, 1}
    pools = graphed.pages  # everything given back but the graphs' scratch pages
    assert len(pools.full.free) == pools.full.num_pages - 1
    assert len(pools.sliding.free) == pools.sliding.num_pages - 1


def test_seeded_graph_steps_are_the_same_bits_alone_or_batched(graphed, tiny_config):
    prompts = [random_ids(n, tiny_config.vocab_size, seed=n).tolist() for n in (11, 20)]
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=50 + i, logprobs=0)
              for i in range(2)]
    cfg = EngineConfig(prefill_chunk=8, max_num_batched_tokens=24, mode="reproducible")
    graphed.decode_graphs.steps.clear()
    together = _run(graphed, prompts, params, cfg)
    for i in range(2):
        alone = _run(graphed, [prompts[i]], [params[i]], cfg)
        assert alone["r0"] == together[f"r{i}"], i
    # batched: bucket 2 row by row (reproducible); alone: the one-sequence step
    assert set(graphed.decode_graphs.steps) == {(2, True), (1, False)}


def test_a_step_that_cannot_be_captured_runs_without_graphs(graphed, tiny_config, monkeypatch,
                                                            caplog):
    """A GPU stack whose capture fails (an op it cannot record, a driver limit) must still serve:
    the step runs launch by launch, and the engine says why once."""
    from inhouse.model import cuda_graphs

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "_Step", refuse)
    monkeypatch.setattr(graphed, "decode_graphs", DecodeGraphs(graphed, capture=False))
    prompt = random_ids(9, tiny_config.vocab_size, seed=3).tolist()
    cfg = EngineConfig(prefill_chunk=16)
    with caplog.at_level("WARNING", logger="inhouse.engine"):
        out = _run(graphed, [prompt], [SamplingParams(max_tokens=3, temperature=0)], cfg)
    assert len(out["r0"]) == 3
    assert graphed.decode_graphs.failure.startswith("RuntimeError: operation not permitted")
    assert [r.message for r in caplog.records].count(
        "CUDA graph capture failed (RuntimeError: operation not permitted when stream is "
        "capturing); decode steps run launch by launch") == 1
