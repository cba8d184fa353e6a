"""Prefill's many-row products: the C decoder of whole MXFP4 matrices (bit for bit
mxfp4.dequantize), and, where bf16 GEMMs run in fp32 (CPUs without AVX-512 BF16, or
INHOUSE_DENSE_KERNEL capping the kernels below it), the projections and the experts multiplied in
fp32, tile by tile for the experts, against the exact products."""

import pytest
import torch

from inhouse.kernels import arithmetic
from inhouse.kernels.cpu import dense_kernel, mxfp4_kernel
from inhouse.kernels.cpu.seams import PACKED, fused_max_rows
from inhouse.model.moe import Experts, PackedExpert
from inhouse.model.mxfp4 import dequantize, dequantize_reference
from tests.conftest import random_moe_layer

pytestmark = pytest.mark.skipif(not (mxfp4_kernel.available() and dense_kernel.available()),
                                reason="kernels not built")


def _packed(O, G, seed=0, lo=112, hi=140):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (O, G, 16), generator=g, dtype=torch.uint8),
            torch.randint(lo, hi, (O, G), generator=g, dtype=torch.uint8))


@pytest.mark.parametrize("simd", ["1", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decoder_gives_dequantize_bit_for_bit(monkeypatch, simd, dtype):
    """Every code and scale, the extremes too (E8M0 0 and 1: subnormal, 255: 2**128), -0.0."""
    monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", simd)
    blocks, scales = _packed(40, 7, seed=1, lo=0, hi=256)
    scales[0, :3] = torch.tensor([0, 1, 255], dtype=torch.uint8)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    got = mxfp4_kernel.decode(blocks, scales, dtype)
    assert torch.equal(got.view(bits), dequantize(blocks, scales, dtype).view(bits))
    small = _packed(3, 2, seed=2)
    assert torch.equal(mxfp4_kernel.decode(*small, torch.float32),
                       dequantize_reference(*small).reshape(3, 64))
    out = torch.empty(40, 7 * 32, dtype=dtype)
    assert mxfp4_kernel.decode(blocks, scales, dtype, out) is out and torch.equal(out, got)
    with pytest.raises(ValueError):
        mxfp4_kernel.decode(blocks, scales, dtype, torch.empty(40, 7 * 32 + 1, dtype=dtype))


@pytest.mark.parametrize("simd", ["1", "avx512"])
def test_bf16_prefill_projections_multiply_in_fp32_where_bf16_gemms_are_slow(monkeypatch, simd):
    """Below AVX-512 BF16 (the CPU's, or capped by the setting) bf16 rows and weights meet in an
    fp32 GEMM, a slab of weight rows at a time: the exact products summed in fp32, rounded once;
    with AVX-512 BF16, PyTorch's bf16 GEMM as before. The audit path says which."""
    monkeypatch.setenv("INHOUSE_DENSE_KERNEL", simd)
    monkeypatch.setattr(dense_kernel, "SLAB_ROWS", 16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g).bfloat16()  # more rows than the decode kernel takes
    w, b = torch.randn(50, 64, generator=g).bfloat16(), torch.randn(50, generator=g).bfloat16()
    with torch.inference_mode():
        got = dense_kernel.linear(x, w, b)
    fp32 = dense_kernel._level() < 3
    assert dense_kernel.gemm_dtype(x) == (torch.float32 if fp32 else torch.bfloat16)
    assert ("+gemm-f32+" in arithmetic.path_name()) == fp32
    if fp32:
        slabs = torch.cat([x.float() @ w[o:o + 16].float().T for o in range(0, 50, 16)], -1)
        assert torch.equal(got, (slabs + b.float()).bfloat16())
    else:
        assert torch.equal(got, torch.nn.functional.linear(x, w, b))
    exact = x.double() @ w.double().T + b.double()
    assert torch.allclose(got.double(), exact, rtol=8e-3, atol=1e-2)
    x.requires_grad_(True)  # training keeps PyTorch's autograd op
    assert dense_kernel.linear(x, w, b).requires_grad


@pytest.mark.parametrize("tile", [16, 512])
def test_many_rows_meet_the_expert_decoded_tile_by_tile(monkeypatch, tile):
    monkeypatch.setattr(mxfp4_kernel, "DECODE_TILE", tile)
    blocks, scales = _packed(40, 3, seed=4)  # 3 tiles of 16 rows (the last one 8), or one
    x = torch.randn(70, 96, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = mxfp4_kernel.dense_matmul(x, blocks, scales, torch.float32)
    assert got.dtype == torch.bfloat16 and got.shape == (70, 40) and got.is_contiguous()
    exact = x.double() @ dequantize_reference(blocks, scales).double().T
    assert torch.allclose(got.double(), exact, rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("simd", ["1", "avx512"])
def test_an_expert_chooses_fused_or_tiled_by_its_rows(monkeypatch, simd):
    """Up to fused_max_rows the fused kernel (rows independent of the batch); above, one GEMM for
    the group: in fp32 where bf16 GEMMs are slow, else on the decoded weights in bf16."""
    monkeypatch.setenv("INHOUSE_DENSE_KERNEL", simd)
    limit = fused_max_rows(torch.bfloat16)
    assert limit == (40 if dense_kernel.gemm_in_fp32(torch.bfloat16) else 64)
    b1, s1 = _packed(32, 2, seed=5)
    b2, s2 = _packed(64, 1, seed=6)
    expert = PackedExpert(b1, s1, b2, s2, torch.bfloat16, kernels=PACKED)
    calls = []
    for name in ("matmul", "dense_matmul"):
        real = getattr(mxfp4_kernel, name)
        monkeypatch.setattr(mxfp4_kernel, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))
    w1 = dequantize_reference(b1, s1).double()
    for n in (limit, limit + 1):
        x = torch.randn(n, 64).bfloat16()
        with torch.inference_mode():
            fused = expert.rows_independent(n)
            y = expert.gate_up(x, fused)
        assert fused == (n <= limit)
        assert torch.allclose(y.double(), x.double() @ w1.T, rtol=8e-3, atol=1e-2)
    tiled = dense_kernel.gemm_in_fp32(torch.bfloat16)
    assert calls == ["matmul"] + (["dense_matmul"] if tiled else [])


def test_a_prefill_sized_moe_layer_agrees_with_the_exact_experts():
    """The whole layer at 150 rows (some experts above the fused limit, some below)."""
    mlp = random_moe_layer(torch.bfloat16, seed=7, num_experts=4, experts_per_token=2)
    x = torch.randn(150, 64).bfloat16()
    with torch.inference_mode():
        w, i = mlp.router(x)
        got = mlp.experts(x, w, i)
        slow = mlp.experts.float()
        want = Experts.forward(slow, x.float(), w.float(), i)  # fp32, decoded weights
    assert torch.allclose(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max())
