"""The fused MXFP4 kernel against the slow reference, and its batch/thread invariance, on every
SIMD path this CPU has ("1" is the best one: AVX-512 BF16 for bf16 rows where present)."""

import pytest
import torch

from inhouse.kernels.backend import Seams
from inhouse.kernels.cpu import mxfp4_kernel
from inhouse.model.mxfp4 import dequantize_reference
from tests.conftest import random_moe_layer

pytestmark = pytest.mark.skipif(not mxfp4_kernel.available(), reason="kernel not built")


def _packed(O, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (O, G, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 128, (O, G), generator=g, dtype=torch.uint8)
    return blocks, scales


LEVELS = ["1", "avx512", "avx2", "portable"]


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("M, O, G", [(1, 7, 1), (3, 40, 3), (9, 64, 2), (20, 33, 2)])
def test_kernel_matches_the_reference(monkeypatch, simd, M, O, G):
    monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", simd)
    blocks, scales = _packed(O, G)
    x = torch.randn(M, G * 32, generator=torch.Generator().manual_seed(1))
    want = x.double() @ dequantize_reference(blocks, scales).double().T
    got = mxfp4_kernel.matmul(x, blocks, scales)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("M", [2, 19])
def test_bf16_inputs_accumulate_in_fp32(monkeypatch, simd, M):
    monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", simd)
    blocks, scales = _packed(16, 4)
    x = torch.randn(M, 128).bfloat16()
    want = x.double() @ dequantize_reference(blocks, scales).double().T
    got = mxfp4_kernel.matmul(x, blocks, scales)
    assert got.dtype == torch.bfloat16
    # the products are exact and summed in fp32: the only loss is the final rounding to bf16
    assert torch.allclose(got.double(), want, rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("G", [1, 2, 3, 4, 5, 6, 7, 8, 12, 15, 16, 17, 18, 19, 23, 36, 90])
def test_bf16_rows_meet_every_block_layout(G):
    """The AVX-512 BF16 path reads blocks in pairs, then a single block if G is odd: every
    remainder, at 1, 8 and 11 rows, against the reference."""
    blocks, scales = _packed(24, G, seed=G)
    x = torch.randn(11, G * 32, generator=torch.Generator().manual_seed(G)).bfloat16()
    want = x.double() @ dequantize_reference(blocks, scales).double().T
    for rows in (x, x[:1], x[:8]):
        got = mxfp4_kernel.matmul(rows, blocks, scales).double()
        ref = want[:rows.shape[0]]
        assert torch.allclose(got, ref, rtol=8e-3, atol=1e-3 * float(ref.abs().max()))


def test_the_smallest_and_largest_scales_are_kept():
    """E8M0 0 is 2**-127 (a float subnormal), 255 is infinity, on every path."""
    blocks = torch.full((2, 4, 16), 0x77, dtype=torch.uint8)  # every element 6.0
    scales = torch.tensor([[0] * 4, [255] * 4], dtype=torch.uint8)
    x = torch.full((1, 128), 1e30).bfloat16()
    got = mxfp4_kernel.matmul(x, blocks, scales).double()
    tiny = 128 * 6.0 * float(x[0, 0]) * 2.0 ** -127
    assert got[0, 0].item() == pytest.approx(tiny, rel=1e-2) and got[0, 1].item() == float("inf")


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_the_batch_or_the_threads(monkeypatch, simd, dtype):
    monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", simd)
    blocks, scales = _packed(96, 4, seed=3)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    together = mxfp4_kernel.matmul(x, blocks, scales)
    alone = torch.cat([mxfp4_kernel.matmul(x[i:i + 1], blocks, scales) for i in range(40)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = mxfp4_kernel.matmul(x, blocks, scales)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone) and torch.equal(together, single)


def test_path_names_follow_the_setting(monkeypatch):
    monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", "portable")
    assert mxfp4_kernel.path_name() == "portable"
    monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", "avx2")
    assert mxfp4_kernel.path_name() in ("avx2-fused", "portable")
    monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", "1")
    assert mxfp4_kernel.path_name() in ("avx512bf16-fused", "avx512-fused", "avx2-fused",
                                        "portable")


def mxfp4_kernel_max_rows() -> int:
    from inhouse.kernels.cpu.seams import KERNEL_MAX_ROWS
    return KERNEL_MAX_ROWS


def test_shape_errors_are_clear():
    blocks, scales = _packed(4, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        mxfp4_kernel.matmul(torch.zeros(1, 32), blocks, scales)


def test_the_model_uses_the_kernel_for_decoding_and_agrees_with_the_decode_path(checkpoints,
                                                                              monkeypatch):
    from inhouse.model import load_model
    from tests.conftest import random_ids

    model = load_model(checkpoints["hf"])
    ids = random_ids(20, model.config.vocab_size, seed=5)
    calls = []
    real = mxfp4_kernel.moe_rows
    monkeypatch.setattr(mxfp4_kernel, "moe_rows",
                        lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.inference_mode():
        cache = model.new_cache()
        model(ids, cache=cache)
        with_kernel = model(torch.tensor([7]), cache=cache)
    # the 20-token prompt and the decoded row went through the one-call MoE layer
    assert calls and max(calls) <= mxfp4_kernel_max_rows() and 1 in calls
    for module in model.modules():  # the cpu backend where the library is not built
        if hasattr(module, "seams"):
            module.seams = Seams("cpu")
    calls.clear()
    with torch.inference_mode():
        cache = model.new_cache()
        model(ids, cache=cache)
        without = model(torch.tensor([7]), cache=cache)
    assert not calls
    assert (with_kernel - without).abs().max() < 1e-4


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("int16_rows", [False, True])
def test_the_one_call_moe_layer_matches_the_pytorch_path(monkeypatch, simd, dtype, int16_rows):
    """Also with the rows rounded to int16 (int8 models' experts), where the PyTorch path calls
    the same a16 kernel per expert."""
    from inhouse.model.moe import Experts

    monkeypatch.setenv("INHOUSE_MXFP4_KERNEL", simd)
    mlp = random_moe_layer(dtype)
    mlp.experts.int16_rows = int16_rows
    x = (torch.randn(9, 64) * 2).to(dtype)
    with torch.inference_mode():
        w, i = mlp.router(x)
        fast = mlp.experts(x, w, i)  # one native call
        slow = Experts.forward(mlp.experts, x, w, i)  # an op per expert, the same kernel
        alone = torch.cat([mlp.experts(x[j:j + 1], w[j:j + 1], i[j:j + 1]) for j in range(9)])
    assert torch.equal(fast, alone)  # every row as if alone
    if dtype == torch.bfloat16:  # the same roundings in the same order
        assert torch.equal(fast, slow)
    else:  # the SwiGLU's exp is libm's, not PyTorch's: the last bits may differ
        assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5)


def test_groups_choose_their_path_by_their_own_size(monkeypatch):
    import dataclasses

    from inhouse.kernels.cpu.seams import PACKED, cpu_seams

    mlp = random_moe_layer(torch.bfloat16, seed=2)
    mlp.experts.seams = dataclasses.replace(
        cpu_seams(), packed_experts=dataclasses.replace(PACKED, layer_max_rows=4))
    x = torch.randn(11, 64).bfloat16()
    calls = []
    real = mxfp4_kernel.moe_rows
    monkeypatch.setattr(mxfp4_kernel, "moe_rows",
                        lambda *a: calls.append(a[0].shape[0]) or real(*a))
    groups = [slice(0, 2), slice(2, 9), slice(9, 11)]  # 2 and 2 rows: one call; 7: per expert
    with torch.inference_mode():
        w, i = mlp.router(x)
        together = mlp.experts(x, w, i, groups)
        alone = torch.cat([mlp.experts(x[g], w[g], i[g]) for g in groups])
    assert calls[0] == 4
    assert torch.equal(together, alone)


def test_the_kernels_block_format_is_the_models():
    from inhouse.model import mxfp4

    assert (mxfp4_kernel.BLOCK_SIZE, mxfp4_kernel.BYTES_PER_BLOCK) == (mxfp4.BLOCK_SIZE,
                                                                       mxfp4.BYTES_PER_BLOCK)
