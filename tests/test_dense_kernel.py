"""The bf16 decode kernel against torch's linear (the reference), its batch/thread invariance on
every SIMD path, and where the model uses it."""

import pytest
import torch
from torch import nn

from inhouse.kernels.cpu import dense_kernel
from inhouse.model.layers import Linear
from inhouse.kernels.cpu import decode_step

pytestmark = pytest.mark.skipif(not dense_kernel.available(), reason="kernel not built")

LEVELS = ["1", "avx512", "avx2", "portable"]  # "1": AVX-512 BF16 for bf16 rows where present


def _weights(O, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(O, K, generator=g).bfloat16(), torch.randn(O, generator=g))


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("M, O, K", [(1, 5, 16), (3, 40, 96), (16, 9, 200), (2, 64, 2880)])
def test_kernel_matches_the_reference(monkeypatch, simd, M, O, K):
    monkeypatch.setenv("INHOUSE_DENSE_KERNEL", simd)
    w, b = _weights(O, K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    want = x.double() @ w.double().T + b.double()
    got = dense_kernel.bf16_matmul(x, w, b)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.allclose(dense_kernel.bf16_matmul(x, w).double(), want - b.double(),
                          rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("simd", LEVELS)
def test_rows_do_not_depend_on_the_batch_or_the_threads(monkeypatch, simd):
    monkeypatch.setenv("INHOUSE_DENSE_KERNEL", simd)
    w, b = _weights(70, 136, seed=3)
    x = torch.randn(12, 136, generator=torch.Generator().manual_seed(4))
    together = dense_kernel.bf16_matmul(x, w, b)
    alone = torch.cat([dense_kernel.bf16_matmul(x[i:i + 1], w, b) for i in range(12)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dense_kernel.bf16_matmul(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone) and torch.equal(together, single)


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("M, O, K", [(1, 5, 16), (3, 40, 96), (12, 9, 200), (2, 64, 2880)])
def test_bf16_rows_match_the_reference_and_the_batch(monkeypatch, simd, M, O, K):
    """bf16 rows (the model's activations): exact products summed in fp32 on every path."""
    monkeypatch.setenv("INHOUSE_DENSE_KERNEL", simd)
    w, b = _weights(O, K, seed=7)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(8)).bfloat16()
    want = x.double() @ w.double().T + b.double()
    got = dense_kernel.bf16_matmul(x, w, b)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    alone = torch.cat([dense_kernel.bf16_matmul(x[i:i + 1], w, b) for i in range(M)])
    assert torch.equal(got, alone)


def test_linear_takes_the_kernel_only_where_it_applies():
    lin = Linear(64, 32).to(torch.bfloat16)
    few, many = torch.randn(3, 64).bfloat16(), torch.randn(dense_kernel.MAX_ROWS + 1, 64).bfloat16()
    assert not dense_kernel.applies(few, lin.weight)  # grad enabled, weight requires grad
    with torch.no_grad():
        assert dense_kernel.applies(few, lin.weight)
        assert not dense_kernel.applies(many, lin.weight)  # prefill: torch's GEMM
        assert not dense_kernel.applies(few.float(), lin.weight.float())  # fp32 weights: torch
        got = lin(few)
    want = nn.functional.linear(few.float(), lin.weight.float(), lin.bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (3, 32)
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2)
    # with grad the module is plain nn.Linear, so training gets gradients
    x = few.float().requires_grad_()
    lin.float()(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_bf16_decoding_through_the_kernel_agrees_with_torch(checkpoints, monkeypatch):
    from inhouse.model import load_model
    from tests.conftest import random_ids

    model = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    ids = random_ids(12, model.config.vocab_size, seed=5)
    monkeypatch.setattr(decode_step, "run", lambda *a: None)  # the layers module by module
    calls = []
    real = dense_kernel._run
    monkeypatch.setattr(dense_kernel, "_run",
                        lambda *a: calls.append((a[1].shape[0], len(a[2]))) or real(*a))
    with torch.inference_mode():
        cache = model.new_cache()
        model(ids, cache=cache)
        with_kernel = model(torch.tensor([7]), cache=cache).float()
    # per layer q, k and v in one call, o, the router; and the unembedding: at one row each
    L = model.config.num_hidden_layers
    one_row = [c for c in calls if c[0] == 1]
    assert one_row.count((1, 3)) == L and one_row.count((1, 1)) == 2 * L + 1
    assert len(one_row) == 3 * L + 1
    monkeypatch.setattr(dense_kernel, "applies", lambda x, w: False)
    with torch.inference_mode():
        cache = model.new_cache()
        model(ids, cache=cache)
        without = model(torch.tensor([7]), cache=cache).float()
    assert (with_kernel - without).abs().max() < 0.05 * without.abs().max()


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("M, O, K", [(1, 5, 16), (4, 33, 200), (16, 64, 2880)])
def test_int8_kernel_matches_the_reference(monkeypatch, simd, M, O, K):
    from inhouse.model.int8 import Int8Linear, int8_kernel_reference, int8_linear_reference

    monkeypatch.setenv("INHOUSE_DENSE_KERNEL", simd)
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-128, 128, (O, K), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(O, generator=g) / 100, torch.randn(O, generator=g)
    x = torch.randn(M, K, generator=g) * 3
    x[0, :3] = torch.tensor([40.0, -40.0, 1e-3])  # a large activation sets the row's int16 step
    got = dense_kernel.int8_matmul(x, w, scale, bias)
    # the kernel's own arithmetic (int16 rows, exact integer sums), bit for bit on every path
    assert torch.equal(got, int8_kernel_reference(x, w, scale, bias))
    assert torch.equal(dense_kernel.int8_matmul(x.bfloat16(), w, scale, bias),
                       int8_kernel_reference(x.bfloat16(), w, scale, bias))
    # and the exact product to within the rows' rounding: half a step times sum |w| times scale
    exact = int8_linear_reference(x.double(), w, scale.double(), bias.double())
    step = x.abs().amax(-1, keepdim=True).double() / 32767
    bound = 0.5 * step * (w.abs().double().sum(-1) * scale.double())[None, :]
    assert ((got.double() - exact).abs() <= bound + 1e-5).all()
    alone = torch.cat([dense_kernel.int8_matmul(x[i:i + 1], w, scale, bias) for i in range(M)])
    assert torch.equal(got, alone)
    lin = Int8Linear(K, O)
    lin.weight.copy_(w), lin.weight_scale.copy_(scale)
    with torch.no_grad():
        lin.bias.copy_(bias)
        assert lin.rows_independent(M)
        assert torch.equal(lin(x), got)


def test_int8_kernel_rows_with_zeros_or_nan():
    from inhouse.model.int8 import int8_kernel_reference

    w = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    scale = torch.rand(8)
    x = torch.randn(3, 64)
    x[0] = 0
    x[1, 5] = float("nan")
    got = dense_kernel.int8_matmul(x, w, scale)
    assert torch.equal(got[0], torch.zeros(8)) and got[1].isnan().all()
    assert torch.equal(got[2], int8_kernel_reference(x[2:], w, scale)[0])


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("M", [1, 5])
def test_projections_in_one_call_give_each_projection_alone(monkeypatch, simd, M):
    """linear_many (a layer's q, k and v in one call) against each layer's own forward, bit for
    bit: bf16 Linear layers, int8 layers, with and without biases; a mix of kinds is declined."""
    from inhouse.model.int8 import Int8Linear

    monkeypatch.setenv("INHOUSE_DENSE_KERNEL", simd)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 96, generator=g).bfloat16()
    bf16_layers = [Linear(96, o, bias=o != 33).bfloat16() for o in (64, 33, 16)]
    int8_layers = []
    for o in (48, 16, 16):
        layer = Int8Linear(96, o, bias=True)
        layer.weight.copy_(torch.randint(-127, 128, (o, 96), generator=g, dtype=torch.int8))
        layer.weight_scale.copy_(torch.rand(o, generator=g) / 100)
        layer.bias.data = torch.randn(o, generator=g).bfloat16()
        int8_layers.append(layer)
    with torch.inference_mode():
        for layers in (bf16_layers, int8_layers):
            together = dense_kernel.linear_many(x, layers)
            assert together is not None
            for layer, y in zip(layers, together, strict=True):
                assert y.dtype == x.dtype and torch.equal(y, layer(x))
        assert dense_kernel.linear_many(x, [bf16_layers[0], int8_layers[0]]) is None
        assert dense_kernel.linear_many(x.float(), [nn.Linear(96, 8)]) is None  # fp32 weights


def test_scales_converted_for_the_call_stay_alive_through_it():
    """int8 scales in another dtype are converted for the call; the kernel gets their address,
    so the converted tensors must live until it returns (else it reads freed memory)."""
    g = torch.Generator().manual_seed(9)
    w = [torch.randint(-127, 128, (o, 64), generator=g, dtype=torch.int8) for o in (40, 24)]
    scales = [torch.rand(o, generator=g, dtype=torch.float64) / 50 for o in (40, 24)]
    x = torch.randn(1, 64, generator=g)
    together = dense_kernel._run("int8", x, w, scales, [None, None], torch.float32)
    for wi, si, y in zip(w, scales, together, strict=True):
        assert torch.equal(y, dense_kernel.int8_matmul(x, wi, si.float()))
