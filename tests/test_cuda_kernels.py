"""The cuda backend's Triton kernels against the references, at small shapes: on CPU tensors under
Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU), on the GPU with
`pytest --device cuda`. Batch invariance is checked bit for bit; values to fp32/bf16 tolerances,
since the kernels sum in their own order."""

from __future__ import annotations

import warnings

import pytest
import torch

from inhouse.kernels import backend
from inhouse.kernels.cuda import attention as cuda_attention
from inhouse.kernels.cuda import mxfp4_moe, norm
from inhouse.model.attention import attention_reference
from inhouse.model.layers import rmsnorm_reference
from inhouse.model.moe import Experts
from tests.conftest import random_moe_layer

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter


@pytest.fixture(scope="module")
def dev(device) -> str:
    if not backend.triton_available():
        pytest.fail("triton is not installed (make setup-test installs it)")
    return device


def _moe_inputs(dtype, dev, num_rows, seed=0, num_experts=6, top_k=3):
    mlp = random_moe_layer(dtype, seed=seed, num_experts=num_experts,
                           experts_per_token=top_k).to(dev)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, 64, generator=g).to(dtype).to(dev)
    weights, indices = mlp.router(x)
    return mlp.experts, x, weights, indices


def _cuda_moe(experts, x, weights, indices):
    return mxfp4_moe.moe(x, weights, indices,
                         (experts.gate_up_proj_blocks, experts.gate_up_proj_scales,
                          experts.gate_up_proj_bias),
                         (experts.down_proj_blocks, experts.down_proj_scales,
                          experts.down_proj_bias), experts.alpha, experts.limit)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_moe_matches_the_reference(dev, dtype, tol):
    # 40 rows x top-3 of 6 experts: tiles of 16 pairs, experts with several tiles
    experts, x, weights, indices = _moe_inputs(dtype, dev, 40)
    with torch.no_grad():
        got = _cuda_moe(experts, x, weights, indices)
        ref = Experts.forward(experts.float(), x.float(), weights.float(), indices)
    scale = ref.abs().max()
    assert got.dtype == dtype and got.shape == ref.shape
    assert ((got.float() - ref).abs().max() / scale) < tol


def test_moe_with_experts_no_row_chose(dev):
    experts, x, weights, _ = _moe_inputs(torch.float32, dev, 3)
    indices = torch.tensor([[5, 0, 2]] * 3, device=dev)  # experts 1, 3, 4 idle
    with torch.no_grad():
        got = _cuda_moe(experts, x, weights, indices)
        ref = Experts.forward(experts, x, weights, indices)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_row_is_the_same_bits_alone_or_batched(dev, dtype):
    experts, x, weights, indices = _moe_inputs(dtype, dev, 37, seed=3)
    with torch.no_grad():
        batched = _cuda_moe(experts, x, weights, indices)
        for row in (0, 17, 36):
            alone = _cuda_moe(experts, x[row:row + 1], weights[row:row + 1],
                              indices[row:row + 1])
            assert torch.equal(alone[0], batched[row]), row


def test_moe_plan_covers_every_pair_once(dev):
    indices = torch.tensor([[0, 1], [1, 0], [1, 2], [1, 0]] * 9, device=dev)  # expert 1: 36 pairs
    p = mxfp4_moe.plan(indices, 4)
    starts, ends = p["tile_start"].tolist(), p["tile_end"].tolist()
    covered = sorted(i for s, e in zip(starts, ends) for i in range(s, e))
    assert covered == list(range(indices.numel()))
    for t, (s, e) in enumerate(zip(starts, ends)):
        assert e - s <= mxfp4_moe.BLOCK_M
        if e > s:  # a tile holds pairs of its own expert only
            slots = p["pair_slot"][s:e].long()
            assert set(indices.reshape(-1)[slots].tolist()) == {p["tile_expert"][t].item()}


CASES = [  # (queries, first query position, window)
    (1, 39, None), (1, 45, 8), (7, 23, None), (20, 30, 16), (5, 0, None), (33, 40, None),
]


@pytest.mark.parametrize("T,q_start,window", CASES)
def test_attention_matches_the_reference(dev, T, q_start, window):
    Hq, Hkv, D = 8, 2, 16
    g = torch.Generator().manual_seed(T + q_start)
    S = q_start + T  # keys from position 0 to the last query
    q, k, v = (torch.randn(shape, generator=g).to(dev)
               for shape in ((T, Hq, D), (Hkv, S, D), (Hkv, S, D)))
    sinks = torch.randn(Hq, generator=g).to(dev)
    got = cuda_attention.attention(q, k, v, sinks, q_start, 0, window, D ** -0.5)
    ref = attention_reference(q, k, v, sinks, q_start, 0, window, D ** -0.5)
    assert torch.allclose(got, ref, atol=2e-6, rtol=1e-5)


def test_attention_over_a_held_window_slice(dev):
    """A sliding layer's cache holds keys from a later position (k_start > 0), as a strided
    slice of its buffer."""
    Hq, Hkv, D = 4, 2, 16
    g = torch.Generator().manual_seed(1)
    buffer = torch.randn(Hkv, 40, D, generator=g).to(dev)
    vbuf = torch.randn(Hkv, 40, D, generator=g).to(dev)
    k, v = buffer[:, 6:26], vbuf[:, 6:26]  # 20 held keys, positions 50..69
    q = torch.randn(3, Hq, D, generator=g).to(dev)  # positions 67..69
    sinks = torch.randn(Hq, generator=g).to(dev)
    got = cuda_attention.attention(q, k, v, sinks, 67, 50, 16, 0.25)
    ref = attention_reference(q, k, v, sinks, 67, 50, 16, 0.25)
    assert torch.allclose(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_row_is_the_same_bits_at_decode_and_in_a_prefill_chunk(dev, dtype):
    Hq, Hkv, D, S = 8, 2, 16, 50
    g = torch.Generator().manual_seed(7)
    q = torch.randn(S, Hq, D, generator=g).to(dtype).to(dev)
    k, v = (torch.randn(Hkv, S, D, generator=g).to(dtype).to(dev) for _ in range(2))
    sinks = torch.randn(Hq, generator=g).to(dev)
    for window in (None, 16):
        chunk = cuda_attention.attention(q[30:], k, v, sinks, 30, 0, window, 0.25)
        for t in (30, 37, 49):  # query t decoded alone, over keys 0..t
            alone = cuda_attention.attention(q[t:t + 1], k[:, :t + 1], v[:, :t + 1], sinks, t, 0,
                                             window, 0.25)
            assert torch.equal(alone[0], chunk[t - 30]), (window, t)


def test_paged_attention_gives_the_contiguous_bits(dev):
    """Two sequences whose keys sit in shuffled pages of one pool; the pages a sliding window has
    left behind hold NaN: they must never be read."""
    Hq, Hkv, D, P = 8, 2, 16, cuda_attention.PAGE
    g = torch.Generator().manual_seed(5)
    lengths, num_q, window = [70, 21], [1, 5], 16
    pool = 12
    k_pages = torch.randn(pool, Hkv, P, D, generator=g).to(dev)
    v_pages = torch.randn(pool, Hkv, P, D, generator=g).to(dev)
    table = torch.tensor([[7, 2, 9, 4, 11], [3, 0, -1, -1, -1]], dtype=torch.int32, device=dev)
    k_pages[7] = k_pages[2] = float("nan")  # sequence 0's positions 0..31: behind its window
    v_pages[7] = v_pages[2] = float("nan")
    q = torch.randn(sum(num_q), Hq, D, generator=g).to(dev)
    sinks = torch.randn(Hq, generator=g).to(dev)
    i32 = dict(dtype=torch.int32, device=dev)
    q_start = [n - m for n, m in zip(lengths, num_q)]
    got = cuda_attention.paged_attention(
        q, k_pages, v_pages, sinks, table, torch.tensor([0, 1], **i32),
        torch.tensor(num_q, **i32), torch.tensor(q_start, **i32), torch.tensor(lengths, **i32),
        window, 0.25)
    assert not got.isnan().any()
    row = 0
    for i, (n, m) in enumerate(zip(lengths, num_q)):
        pages = table[i, :(n + P - 1) // P].long()
        k = k_pages[pages].permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :n]
        v = v_pages[pages].permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :n]
        lo = max(0, q_start[i] - window + 1)  # what the contiguous cache would still hold
        contiguous = cuda_attention.attention(q[row:row + m], k[:, lo:], v[:, lo:], sinks,
                                              q_start[i], lo, window, 0.25)
        assert torch.equal(got[row:row + m].reshape(m, -1), contiguous), i
        row += m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_the_reference(dev, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2880, generator=g).to(dtype).to(dev)
    w = torch.randn(2880, generator=g).to(dev)
    got = norm.rmsnorm(x, w, 1e-5)
    ref = rmsnorm_reference(x, w, 1e-5)
    assert got.dtype == dtype
    # bf16: one rounding of a value that may differ in its last fp32 bits
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert ((got.float() - ref.float()).abs() / ref.float().abs().clamp(min=1)).max() <= tol
    assert torch.equal(norm.rmsnorm(x[3:4], w, 1e-5)[0], got[3])  # a row alone: same bits


def test_select_backend():
    from inhouse.kernels import arithmetic

    assert arithmetic.path_name(backend="cuda") == backend.CUDA_PATH != arithmetic.path_name()
    assert backend.select(torch.device("cpu")) == "cpu"
    assert backend.select(torch.device("cpu"), "cuda") == "cuda"  # the interpreter, here
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.select(torch.device("cpu"), "tpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.seams("cuda").attention is cuda_attention.attention


def test_model_on_the_cuda_backend_gives_the_cpu_backend_logits(dev, checkpoints, tiny_config,
                                                                monkeypatch):
    """The whole tiny model (sliding window 16, 8 experts top-4, GQA) with the Triton kernels
    plugged in at load: a prefill past the window, then decode steps on the KV cache, and a
    batch of two sequences, against the CPU backend; every seam's kernel ran."""
    from inhouse.model import load_model
    from tests.conftest import random_ids

    calls = {"attention": 0, "moe": 0, "rmsnorm": 0}
    for module, name in ((cuda_attention, "attention"), (mxfp4_moe, "moe"), (norm, "rmsnorm")):
        def counted(*args, _fn=getattr(module, name), _name=name):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(module, name, counted)
    ours = load_model(checkpoints["hf"], device=dev, backend="cuda")
    cpu = load_model(checkpoints["hf"], backend="cpu")
    assert ours.backend == "cuda" and cpu.backend == "cpu"
    assert ours.model.layers[0].mlp.experts.seams.name == "cuda"
    ids = random_ids(40, tiny_config.vocab_size)
    with torch.no_grad():
        caches = ours.new_cache(), cpu.new_cache()
        for chunk in (ids[:37], ids[37:38], ids[38:39], ids[39:]):
            got = ours(chunk.to(dev), caches[0], last_only=True)
            want = cpu(chunk, caches[1], last_only=True)
            assert torch.allclose(got.cpu(), want, atol=1e-4, rtol=1e-4)
        other = random_ids(5, tiny_config.vocab_size, seed=1)
        batch = [(ids[:20], ours.new_cache()), (other, ours.new_cache())]
        got = ours.forward_batch([(i.to(dev), c) for i, c in batch], independent=True)
        want = torch.stack([cpu(i, last_only=True)[0] for i, _ in batch])
        assert torch.allclose(got.cpu(), want, atol=1e-4, rtol=1e-4)
    layers = tiny_config.num_hidden_layers  # 5 calls of the model, the batch's two in one
    assert calls == {"attention": 6 * layers, "moe": 5 * layers, "rmsnorm": 5 * (2 * layers + 1)}


def test_the_self_check_passes_here_and_catches_a_wrong_kernel(dev, monkeypatch):
    """`select("auto")` runs it once per device before choosing the cuda backend."""
    from inhouse.kernels.cuda import check

    assert check.self_check(torch.device(dev)) is None
    real = mxfp4_moe.moe
    monkeypatch.setattr(mxfp4_moe, "moe", lambda *a: real(*a) * 1.01)
    assert check.self_check(torch.device(dev)) == "the MXFP4 experts differ from their reference"
    monkeypatch.setattr(norm, "rmsnorm", lambda *a: (_ for _ in ()).throw(RuntimeError("PTX")))
    with pytest.raises(RuntimeError):
        check.self_check(torch.device(dev))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_auto_on_a_gpu_whose_kernels_fail_takes_the_pytorch_paths():
    backend.cuda_failure.cache_clear()
    assert backend.select(torch.device("cuda")) == "cpu"  # triton interprets, but no device
    assert backend.cuda_failure("cuda").startswith(("RuntimeError", "AssertionError"))
    backend.cuda_failure.cache_clear()
