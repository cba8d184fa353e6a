"""MXFP4 (OCP Microscaling, FP4 E2M1 elements + E8M0 scale per 32): decoding packed expert weights.

Spec: https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf
Storage as in gpt-oss checkpoints:
  blocks uint8 [..., out, in/32, 16]: each byte holds two FP4 codes, low nibble = element 2j,
                                      high nibble = element 2j+1
  scales uint8 [..., out, in/32]:     E8M0, the block's value is FP4_VALUES[code] * 2**(scale - 127)
`dequantize_reference` is the slow, obviously-correct version; `dequantize` is the vectorised one
used at run time. Tests compare them.
"""

from __future__ import annotations

import math

import torch

BLOCK_SIZE = 32  # values per scale
BYTES_PER_BLOCK = 16

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode element by element in Python; float32 result of shape [..., out, in]. Slow: tests only."""
    assert blocks.dtype == torch.uint8 and scales.dtype == torch.uint8
    assert blocks.shape[:-1] == scales.shape and blocks.shape[-1] == BYTES_PER_BLOCK
    flat_blocks = blocks.reshape(-1, BYTES_PER_BLOCK).tolist()
    flat_scales = scales.reshape(-1).tolist()
    values: list[float] = []
    for block, scale in zip(flat_blocks, flat_scales):
        for byte in block:
            values.append(math.ldexp(FP4_VALUES[byte & 0x0F], scale - 127))  # element 2j
            values.append(math.ldexp(FP4_VALUES[byte >> 4], scale - 127))    # element 2j+1
    *lead, groups, _ = blocks.shape
    return torch.tensor(values, dtype=torch.float32).reshape(*lead, groups * BLOCK_SIZE)


_PAIR_LUT: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_SCALE_LUT: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _pair_lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: byte -> (value of low nibble, value of high nibble)."""
    key = (dtype, device)
    if key not in _PAIR_LUT:
        v = torch.tensor(FP4_VALUES, dtype=torch.float32)
        codes = torch.arange(256)
        _PAIR_LUT[key] = torch.stack([v[codes & 0x0F], v[codes >> 4]], dim=-1).to(dtype).to(device)
    return _PAIR_LUT[key]


def _scale_lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256]: E8M0 byte -> 2**(byte - 127) (computed in float64, so 2**-127 stays exact)."""
    key = (dtype, device)
    if key not in _SCALE_LUT:
        e = torch.arange(256, dtype=torch.float64) - 127
        _SCALE_LUT[key] = torch.exp2(e).to(dtype).to(device)
    return _SCALE_LUT[key]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Vectorised decode to `dtype`, shape [..., out, in]. Exact in fp32; bf16 is exact for scales in
    bf16's exponent range (all real checkpoints)."""
    # blocks (..., G, 16) -> pairs (..., G, 16, 2) -> (..., G, 32)
    vals = _pair_lut(dtype, blocks.device)[blocks.long()]
    vals = vals.flatten(-2)
    vals = vals * _scale_lut(dtype, blocks.device)[scales.long()].unsqueeze(-1)  # (..., G, 32)
    return vals.flatten(-2)


def num_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one packed [out, in] matrix: 16 bytes of codes + 1 byte of scale per 32 values."""
    return out_features * (in_features // BLOCK_SIZE) * (BYTES_PER_BLOCK + 1)
