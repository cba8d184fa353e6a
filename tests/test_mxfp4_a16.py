"""The MXFP4 kernel's int16-row path (the experts of int8 models): bit for bit its PyTorch
reference on every SIMD level, within its rounding bound of the exact product, batch- and
thread-invariant, and what int8 models (and only they) run, in the modules and in the one-call
decode step alike."""

import pytest
import torch

from inhouse.kernels import arithmetic
from inhouse.kernels.cpu import mxfp4_kernel
from inhouse.model import load_model
from inhouse.model.int8 import a16_kernel_reference, int16_rows
from inhouse.model.moe import MXFP4Experts
from inhouse.model.mxfp4 import dequantize_reference
from tests.conftest import random_moe_layer

pytestmark = pytest.mark.skipif(not mxfp4_kernel.available(), reason="kernel not built")

# "1": the best this CPU has (AVX-512BW where present); the a16 path has no BF16 variant
LEVELS = ["1", "avx2", "portable"]


def _packed(O, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (O, G, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(116, 130, (O, G), generator=g, dtype=torch.uint8)
    return blocks, scales


def _rows(M, n, seed, dtype=torch.float32):
    x = torch.randn(M, n, generator=torch.Generator().manual_seed(seed))
    x[:, ::7] *= 20  # a few large elements per row, as activations have
    return x.to(dtype)


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("G", [1, 2, 3, 5, 90, 91])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_is_its_reference_bit_for_bit(monkeypatch, simd, G, dtype):
    """Pairs of blocks and a last single one, 1 to 11 rows (a group of 8, then 3)."""
    monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", simd)
    blocks, scales = _packed(24, G, seed=G)
    x = _rows(11, G * 32, seed=G, dtype=dtype)
    for rows in (x[:1], x[:8], x):
        got = mxfp4_kernel.matmul(rows, blocks, scales, a16=True)
        assert got.dtype == dtype
        assert torch.equal(got, a16_kernel_reference(rows, blocks, scales).to(dtype))


def test_every_simd_level_gives_the_same_bits(monkeypatch):
    blocks, scales = _packed(64, 90, seed=4)
    x = _rows(8, 2880, seed=4)
    got = []
    for simd in LEVELS:
        monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", simd)
        got.append(mxfp4_kernel.matmul(x, blocks, scales, a16=True))
    assert all(torch.equal(got[0], g) for g in got[1:])


@pytest.mark.parametrize("G", [3, 90])
def test_the_only_loss_is_the_rounding_of_the_rows(G):
    """Against the exact product (fp64): within the int16 rounding (per element at most max|x| /
    65534, times the weight) plus fp32 summation; and the rows' rounding is really there (the
    result is not the fp32 path's)."""
    blocks, scales = _packed(48, G, seed=5)
    x = _rows(6, G * 32, seed=5)
    w = dequantize_reference(blocks, scales).double()  # (O, n)
    exact = x.double() @ w.T
    got = mxfp4_kernel.matmul(x, blocks, scales, a16=True).double()
    rounding = x.abs().amax(-1, keepdim=True).double() / 65534 * w.abs().sum(-1)
    summing = 1e-6 * (x.double().abs() @ w.abs().T)
    assert ((got - exact).abs() <= rounding + summing).all()
    q, scale = int16_rows(x)
    assert torch.allclose(got, (q.double() * scale.double()[:, None]) @ w.T, rtol=1e-5, atol=1e-3)
    assert not torch.equal(got.float(), mxfp4_kernel.matmul(x, blocks, scales))


def test_rows_do_not_depend_on_the_batch_or_the_threads():
    blocks, scales = _packed(96, 6, seed=6)
    x = _rows(13, 192, seed=6, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    together = mxfp4_kernel.matmul(x, blocks, scales, a16=True)
    try:
        torch.set_num_threads(1)
        alone = torch.cat([mxfp4_kernel.matmul(x[m:m + 1], blocks, scales, a16=True)
                           for m in range(13)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)


def test_zero_and_non_finite_rows():
    blocks, scales = _packed(8, 2, seed=7)
    x = torch.randn(3, 64)
    x[0] = 0.0
    x[1, 5] = float("nan")
    got = mxfp4_kernel.matmul(x, blocks, scales, a16=True)
    assert torch.equal(got[0], torch.zeros(8)) and got[1].isnan().all()
    assert torch.equal(got[2], a16_kernel_reference(x[2:], blocks, scales)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_flag_changes_the_moe_layers_arithmetic_a_little(dtype):
    """(The one-call layer with int16 rows against the PyTorch path: test_mxfp4_kernel.)"""
    mlp = random_moe_layer(dtype)
    x = (torch.randn(9, 64) * 2).to(dtype)
    with torch.inference_mode():
        w, i = mlp.router(x)
        plain = mlp.experts(x, w, i)
        mlp.experts.int16_rows = True
        rounded = mlp.experts(x, w, i)
    assert not torch.equal(rounded, plain)
    assert torch.allclose(rounded.float(), plain.float(), rtol=0.05,
                          atol=0.05 * plain.abs().max())


def test_int8_models_and_only_they_run_int16_rows(checkpoints, int8_checkpoint):
    int8 = load_model(int8_checkpoint, dtype=torch.bfloat16)
    plain = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    experts = lambda m: [e for e in m.modules() if isinstance(e, MXFP4Experts)]  # noqa: E731
    assert experts(int8) and all(e.int16_rows for e in experts(int8))
    assert experts(plain) and not any(e.int16_rows for e in experts(plain))
    # the audit path names it, so replay refuses records of the other arithmetic
    assert "+experts-a16+" in arithmetic.path_name(int8=True)
    assert "experts-a16" not in arithmetic.path_name()
