"""The cuda backend on a real GPU, at the real shapes: `pytest -m gpu` on a machine with CUDA (not
in the default run). Without CUDA these fail rather than skip: whoever selects them wants the GPU
checked. The same kernels run at small shapes in the default suite (test_cuda_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from inhouse.config import EngineConfig
from inhouse.kernels.cuda import attention as cuda_attention
from inhouse.kernels.cuda import mxfp4_moe
from inhouse.model.attention import attention_reference
from inhouse.model.layers import swiglu
from inhouse.model.mxfp4 import dequantize

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda() -> str:
    if not torch.cuda.is_available():
        pytest.fail("-m gpu needs a CUDA device")
    return "cuda"


def _packed(g, *shape):
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g, device="cuda")
    scales = torch.randint(118, 128, shape, dtype=torch.uint8, generator=g, device="cuda")
    return blocks, scales


def test_20b_moe_layer_matches_the_reference_and_is_batch_invariant(cuda):
    E, H, I, k = 32, 2880, 2880, 4
    g = torch.Generator(device=cuda).manual_seed(0)
    b1, s1 = _packed(g, E, 2 * I, H // 32)
    b2, s2 = _packed(g, E, H, I // 32)
    bias1 = torch.randn(E, 2 * I, generator=g, device=cuda).bfloat16()
    bias2 = torch.randn(E, H, generator=g, device=cuda).bfloat16()
    x = torch.randn(300, H, generator=g, device=cuda).bfloat16()
    indices = torch.stack([torch.randperm(E, generator=g, device=cuda)[:k] for _ in range(300)])
    weights = torch.softmax(torch.randn(300, k, generator=g, device=cuda), -1).bfloat16()
    run = lambda rows: mxfp4_moe.moe(x[rows], weights[rows], indices[rows], (b1, s1, bias1),  # noqa: E731
                                     (b2, s2, bias2), 1.702, 7.0)
    full = run(slice(0, 300))
    W1, W2 = dequantize(b1, s1), dequantize(b2, s2)  # fp32 (E, out, in)
    ref = torch.zeros(8, H, device=cuda)
    for n in range(8):
        for j in range(k):
            e = indices[n, j]
            h = swiglu(x[n].float() @ W1[e].T + bias1[e].float(), 1.702, 7.0)
            ref[n] += weights[n, j].float() * (h @ W2[e].T + bias2[e].float())
    assert ((full[:8].float() - ref).abs().max() / ref.abs().max()) < 2e-2
    for rows in (slice(0, 1), slice(5, 6), slice(0, 8), slice(0, 64)):
        assert torch.equal(run(rows), full[rows]), rows


@pytest.mark.parametrize("window", [None, 128])
def test_20b_attention_matches_the_reference_and_decode_equals_prefill(cuda, window):
    Hq, Hkv, D, S = 64, 8, 64, 4096
    g = torch.Generator(device=cuda).manual_seed(1)
    q = torch.randn(S, Hq, D, generator=g, device=cuda).bfloat16()
    k, v = (torch.randn(Hkv, S, D, generator=g, device=cuda).bfloat16() for _ in range(2))
    sinks = torch.randn(Hq, generator=g, device=cuda)
    chunk = cuda_attention.attention(q[-512:], k, v, sinks, S - 512, 0, window, D ** -0.5)
    ref = attention_reference(q[-512:], k, v, sinks, S - 512, 0, window, D ** -0.5)
    assert (chunk.float() - ref.float()).abs().max() < 2e-2
    for t in (S - 512, S - 1):
        alone = cuda_attention.attention(q[t:t + 1], k[:, :t + 1], v[:, :t + 1], sinks, t, 0,
                                         window, D ** -0.5)
        assert torch.equal(alone[0], chunk[t - (S - 512)]), t


def test_the_tiny_model_on_the_cuda_backend_matches_transformers(cuda, checkpoints, tiny_config):
    from inhouse.model import load_model
    from tests.conftest import random_ids
    from tests.test_oracles import _transformers_model

    ours = load_model(checkpoints["hf"], device=cuda)
    assert ours.backend == "cuda"  # chosen by "auto" on a CUDA device
    ids = random_ids(48, tiny_config.vocab_size)
    with torch.no_grad():
        got = ours(ids.to(cuda))
        ref = _transformers_model(checkpoints["hf"], cuda)(ids[None].to(cuda)).logits[0]
    assert torch.allclose(got.float(), ref.float(), atol=2e-3, rtol=2e-3)


def test_seeded_requests_are_bit_identical_alone_or_batched_on_the_gpu(cuda, checkpoints):
    from inhouse.model import load_model
    from tests.test_engine import _invariance_runs

    model = load_model(checkpoints["hf"], device=cuda, dtype=torch.bfloat16)
    cfg = EngineConfig(prefill_chunk=8, max_num_batched_tokens=24, mode="reproducible")
    alone, others = _invariance_runs(model, cfg)
    assert all(o == alone for o in others)


def test_captured_decode_steps_give_the_eager_steps_bits(cuda, checkpoints):
    """CUDA graphs (the engine's default on the cuda backend) against launch-by-launch steps:
    the same kernels, so the same ids and logprob floats."""
    from inhouse.engine import LLMEngine, SamplingParams
    from inhouse.model import load_model
    from tests.test_engine import prompt, run_all

    outs = []
    for graphs in (True, False):
        model = load_model(checkpoints["hf"], device=cuda, dtype=torch.bfloat16)
        engine = LLMEngine(model, EngineConfig(prefill_chunk=8, cuda_graphs=graphs))
        assert (model.decode_graphs is not None) == graphs
        reqs = [(f"r{i}", prompt(i, 9 + 5 * i), SamplingParams(max_tokens=24, seed=i, logprobs=0))
                for i in range(3)]
        outs.append(run_all(engine, {0: reqs}, True))
        if graphs:
            assert model.decode_graphs.steps  # some steps were replayed
    assert outs[0] == outs[1]


def test_the_sampler_at_the_real_vocabulary(cuda):
    """201,088 logits a row, 64 rows: the reference's draws, and each row's draw alone."""
    from inhouse.kernels.cuda import sampling

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 201_088, generator=g) * 4
    keys = torch.tensor([sampling.draw_key(9, i) for i in range(64)])
    rows = torch.arange(64)
    args = [(rows % 3 == 0).float() * 0.5 + 0.5, (rows % 4 == 1).int() * 40,
            torch.where(rows % 5 == 2, 0.9, 1.0), torch.where(rows % 7 == 3, 0.05, 0.0)]
    dev_args = [a.to(cuda) for a in args]
    got = sampling.sample(x.to(cuda), *dev_args, keys.to(cuda)).tolist()
    for i in range(0, 64, 9):
        assert got[i] == sampling.sample_reference(x[i], float(args[0][i]), int(args[1][i]),
                                                   float(args[2][i]), float(args[3][i]),
                                                   int(keys[i]))
        alone = sampling.sample(x[i:i + 1].to(cuda), *(a[i:i + 1] for a in dev_args),
                                keys[i:i + 1].to(cuda))
        assert alone.item() == got[i]
