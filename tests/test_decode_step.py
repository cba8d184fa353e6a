"""The whole-step decode kernel (decode_step, csrc/step.c) against the module path it replaces:
the same bits for bf16 and int8 projections, every SIMD level, sliding windows past their
buffer's room, batches with and without batch-invariant mode; when it steps aside; and the
router's top-k kernel against its reference."""

import copy

import pytest
import torch

from inhouse.kernels.cpu import rows_kernel
from inhouse.kernels.cpu import decode_step
from inhouse.model import load_model, lora
from inhouse.model.moe import route_reference
from inhouse.model.transformer import Segment
from tests.conftest import random_ids

pytestmark = pytest.mark.skipif(not decode_step.available(), reason="kernels not built")
_RUN = decode_step.run


def _path(monkeypatch, fused: bool) -> list[int]:
    """Route decode steps to the kernel (fused) or the modules; returns the fused-step count."""
    taken = []

    def run(*args):
        out = _RUN(*args) if fused else None
        taken.append(out is not None)
        return out
    monkeypatch.setattr(decode_step, "run", run)
    return taken


def _decode(model, prompt, steps):
    """Greedy decode after a prompt: the logits of every step, (steps + 1, V)."""
    with torch.inference_mode():
        cache = model.new_cache()
        out = [model(prompt, cache=cache, last_only=True)]
        for _ in range(steps):
            out.append(model(out[-1][-1].argmax().view(1), cache=cache))
    return torch.cat(out)


@pytest.mark.parametrize("simd", ["1", "avx512", "avx2", "portable"])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_fused_step_gives_the_module_path_bits(checkpoints, int8_checkpoint, monkeypatch, simd,
                                               kind):
    for name in ("DENSE", "MXFP4", "ATTEND"):
        monkeypatch.setenv(f"INHOUSE_{name}_KERNEL", simd)
    model = load_model(checkpoints["hf"] if kind == "bf16" else int8_checkpoint,
                       dtype=torch.bfloat16)
    prompt = random_ids(9, 2000, seed=3)
    steps = 30  # past the window of 16 and its buffer's room of 18: keys move back
    taken = _path(monkeypatch, True)
    fused = _decode(model, prompt, steps)
    assert taken == [False] + [True] * steps  # the prompt takes the modules
    _path(monkeypatch, False)
    assert torch.equal(fused, _decode(model, prompt, steps))


def test_window128_model_bits(window128_checkpoints, monkeypatch):
    """MQA (one kv head), top-2 of 4 experts, the real 128-token window crossed."""
    model = load_model(window128_checkpoints["hf"], dtype=torch.bfloat16)
    prompt = random_ids(120, model.config.vocab_size, seed=4)
    taken = _path(monkeypatch, True)
    fused = _decode(model, prompt, 24)
    assert sum(taken) == 24
    _path(monkeypatch, False)
    assert torch.equal(fused, _decode(model, prompt, 24))


@pytest.mark.parametrize("independent", [False, True])
def test_batched_steps_give_the_module_bits_and_each_sequence_alone(checkpoints, monkeypatch,
                                                                    independent):
    model = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    prompts = [random_ids(n, 2000, seed=n) for n in (3, 17, 30)]

    def steps(fused: bool, batch: list[int]) -> list[torch.Tensor]:
        taken = _path(monkeypatch, fused)
        with torch.inference_mode():
            caches = [model.new_cache() for _ in batch]
            for i, cache in zip(batch, caches):
                model(prompts[i], cache=cache)
            out = []
            toks = [torch.tensor([5 + i]) for i in batch]
            for _ in range(6):
                logits = model.forward_batch(list(zip(toks, caches)), independent=independent)
                out.append(logits)
                toks = [row.argmax().view(1) for row in logits]
        assert sum(taken) == (6 if fused else 0)
        return out

    fused = steps(True, [0, 1, 2])
    assert all(torch.equal(a, b) for a, b in zip(fused, steps(False, [0, 1, 2])))
    alone = steps(True, [1])
    assert all(torch.equal(a[1], b[0]) for a, b in zip(fused, alone))


def test_engine_outputs_match_the_module_path_and_each_request_alone(checkpoints, monkeypatch):
    """The engine in reproducible mode (prefill chunks and decodes mixed in its steps) on a bf16
    model: ids and logprobs the same with the kernel as with the modules, alone or together."""
    from inhouse.config import EngineConfig
    from inhouse.engine import LLMEngine, SamplingParams
    from tests.test_engine import prompt, run_all

    model = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    cfg = EngineConfig(prefill_chunk=8, max_num_batched_tokens=24, mode="reproducible")
    reqs = [(f"r{i}", prompt(i, 6 + 9 * i),
             SamplingParams(max_tokens=12, temperature=1.0, seed=i, logprobs=0)) for i in range(4)]

    def together() -> dict:
        return run_all(LLMEngine(model, cfg), {0: reqs[:2], 3: reqs[2:]}, True)

    taken = _path(monkeypatch, True)
    fused = together()
    assert sum(taken) >= 8  # most decode steps took the kernel
    alone = {}
    for r in reqs:
        alone.update(run_all(LLMEngine(model, cfg), {0: [r]}, True))
    assert fused == alone
    _path(monkeypatch, False)
    assert together() == fused


def test_new_weights_are_read_not_the_old_pointers(checkpoints, monkeypatch):
    model = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    prompt = random_ids(5, 2000, seed=6)
    _decode(model, prompt, 2)  # builds the plan
    assert model.step_plan is not None and model.step_plan.table is not None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = "model.layers.1.self_attn.o_proj.weight"
    state[name] = torch.randn_like(state[name], dtype=torch.float32).to(state[name].dtype)
    model.load_state_dict(state, assign=True)  # new tensors, the old ones freed
    assert model.step_plan is None
    fused = _decode(model, prompt, 4)
    _path(monkeypatch, False)
    assert torch.equal(fused, _decode(model, prompt, 4))


def test_a_copy_builds_its_own_plan(checkpoints, monkeypatch):
    model = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    prompt = random_ids(5, 2000, seed=7)
    first = _decode(model, prompt, 3)
    twin = copy.deepcopy(model)  # the plan holds addresses (ctypes), which a copy must not take
    assert twin.step_plan is None
    assert torch.equal(_decode(twin, prompt, 3), first)
    assert twin.step_plan.pointers != model.step_plan.pointers


def test_steps_it_does_not_take(checkpoints):
    fp32 = load_model(checkpoints["hf"], dtype=torch.float32)
    bf16 = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    with torch.inference_mode():
        for model in (fp32, bf16):
            cache = model.new_cache()
            model(random_ids(4, 2000), cache=cache)
            x = model.model.embed_tokens(torch.tensor([3])).to(model.dtype)
            cos, sin = model.rotary.cos_sin(torch.tensor([4]))
            seg = [_segment(cache)]
            taken = decode_step.run(model, x, cos, sin, seg)
            assert (taken is None) == (model is fp32)
            if model is bf16:
                cache.num_tokens += 1
        lora.attach(bf16)  # adapters attached: the modules apply them
        x = bf16.model.embed_tokens(torch.tensor([3])).to(bf16.dtype)
        cos, sin = bf16.rotary.cos_sin(torch.tensor([5]))
        assert decode_step.run(bf16, x, cos, sin, [_segment(cache)]) is None


def _segment(cache):
    """One new token continuing `cache`."""
    return Segment(0, 1, cache.num_tokens, cache)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_route_matches_its_reference_with_ties(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 32, generator=g).to(dtype)
    logits[::3, 5] = logits[::3, 9]  # ties, some of them among the top 4
    logits[::4, :] = logits[::4, :].round()  # many ties
    logits[1, 7] = float("nan")  # NaN ranks first, as in torch's sort
    weights, experts = rows_kernel.route(logits, 4)
    ref_w, ref_e = route_reference(logits, 4)
    assert torch.equal(experts, ref_e)
    ok = ~ref_w.isnan()
    assert torch.equal(weights.isnan(), ref_w.isnan())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(weights[ok].float(), ref_w[ok].float(), atol=tol, rtol=0)
    assert weights.dtype == dtype
    with pytest.raises(ValueError):
        rows_kernel.route(logits, 33)
