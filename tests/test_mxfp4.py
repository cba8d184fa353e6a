import torch
from hypothesis import given, settings, strategies as st

from inhouse.model.mxfp4 import FP4_VALUES, dequantize, dequantize_reference


def test_nibble_order_and_scale_by_hand():
    # byte 0x71: low nibble 1 (0.5) is element 0, high nibble 7 (6.0) is element 1; scale 128 = x2
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x71
    blocks[0, 0, 1] = 0xF9  # low 9 -> -0.5, high 15 -> -6.0
    scales = torch.tensor([[128]], dtype=torch.uint8)
    want = [1.0, 12.0, -1.0, -12.0] + [0.0] * 28
    assert dequantize_reference(blocks, scales)[0].tolist() == want
    assert dequantize(blocks, scales)[0].tolist() == want


def test_every_code_and_extreme_scales_match_reference():
    codes = torch.arange(256, dtype=torch.uint8)
    blocks = codes.view(16, 1, 16).repeat(1, 3, 1).reshape(1, 16, 3, 16)  # [1, out=16, in/32=3, 16]
    scales = torch.tensor([[0, 127, 254]], dtype=torch.uint8).repeat(16, 1).unsqueeze(0)
    ref = dequantize_reference(blocks, scales)
    fast = dequantize(blocks, scales, torch.float32)
    assert torch.equal(ref, fast)
    # scale 127 is 2**0: the middle group of row r decodes bytes 16r..16r+15 to the plain table
    row = ref[0, 1, 32:64].tolist()
    assert row[0::2] == [FP4_VALUES[b & 15] for b in range(16, 32)]
    assert row[1::2] == [FP4_VALUES[b >> 4] for b in range(16, 32)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), experts=st.integers(1, 3), out=st.integers(1, 5),
       groups=st.integers(1, 4), lo=st.integers(100, 140))
def test_fast_equals_reference(seed, experts, out, groups, lo):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, out, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(lo, lo + 8, (experts, out, groups), generator=g, dtype=torch.uint8)
    ref = dequantize_reference(blocks, scales)
    assert ref.shape == (experts, out, groups * 32)
    assert torch.equal(dequantize(blocks, scales, torch.float32), ref)
    # bf16 holds every FP4 value times a power of two in its exponent range exactly
    assert torch.equal(dequantize(blocks, scales, torch.bfloat16).float(), ref)
