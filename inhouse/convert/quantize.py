"""Quantisers: dense weights -> MXFP4 (experts) and -> int8 rows (attention, unembedding).

MXFP4 (OCP Microscaling v1.0, section 6.3): per block of 32 values along the input dimension, the
shared E8M0 scale is 2**(floor(log2(max|x|)) - 2) (2 = the largest exponent of FP4 E2M1), each
value is divided by it and rounded to the nearest FP4 value, ties to the even code, saturating at
+-6. Any weight that came from MXFP4 quantises back to the same values (tested).
`quantize_mxfp4_reference` is the element-by-element version the fast one is tested against.

int8: symmetric per output row, scale = max|row| / 127, round to nearest.
"""

from __future__ import annotations

import math

import torch

from inhouse.model.mxfp4 import BLOCK_SIZE, FP4_VALUES

_GRID = torch.tensor(FP4_VALUES[:8])  # the 8 magnitudes, code = index
_MIDPOINTS = (_GRID[1:] + _GRID[:-1]) / 2  # (7,)
_UP_ON_TIE = torch.tensor([(i + 1) % 2 == 0 for i in range(7)])  # tie goes to the even code
_MIN_SCALE, _MAX_SCALE = 0, 254  # E8M0 255 is NaN


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) float, in % 32 == 0 -> blocks uint8 (..., out, in/32, 16), scales uint8
    (..., out, in/32), in the checkpoint layout (low nibble = even element)."""
    *lead, n_in = w.shape
    if n_in % BLOCK_SIZE:
        raise ValueError(f"the input dimension {n_in} is not a multiple of {BLOCK_SIZE}")
    x = w.float().reshape(*lead, n_in // BLOCK_SIZE, BLOCK_SIZE)  # (..., G, 32)
    amax = x.abs().amax(dim=-1)  # (..., G)
    exp = torch.floor(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny))) - 2
    scale = (exp + 127).clamp(_MIN_SCALE, _MAX_SCALE)
    scale = torch.where(amax == 0, torch.zeros_like(scale), scale)  # an all-zero block
    y = x / torch.exp2(scale - 127).unsqueeze(-1)  # (..., G, 32) in units of the scale
    mag = y.abs().unsqueeze(-1)  # (..., G, 32, 1)
    code = (mag > _MIDPOINTS).sum(-1) + ((mag == _MIDPOINTS) & _UP_ON_TIE).sum(-1)
    code = code.clamp(max=7)
    code = torch.where((y < 0) & (code > 0), code + 8, code).to(torch.uint8)  # sign bit
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)  # (..., G, 16)
    return blocks.contiguous(), scale.to(torch.uint8)


def quantize_mxfp4_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element by element in Python: the obvious version of `quantize_mxfp4`. Tests only."""
    *lead, n_in = w.shape
    rows = w.float().reshape(-1, BLOCK_SIZE).tolist()
    codes, scales = [], []
    for block in rows:
        amax = max(abs(v) for v in block)
        s = 0 if amax == 0 else min(max(math.floor(math.log2(amax)) - 2 + 127, 0), 254)
        scales.append(s)
        unit = 2.0 ** (s - 127)
        for v in block:
            best = 0
            for c in range(8):  # nearest magnitude; on a tie keep the even code
                d_new, d_best = abs(abs(v) / unit - FP4_VALUES[c]), abs(abs(v) / unit - FP4_VALUES[best])
                if d_new < d_best or (d_new == d_best and c % 2 == 0 and best % 2 == 1):
                    best = c
            codes.append(best + 8 if v < 0 and best else best)
    code = torch.tensor(codes, dtype=torch.uint8).reshape(-1, BLOCK_SIZE)
    blocks = code[:, 0::2] | (code[:, 1::2] << 4)
    groups = n_in // BLOCK_SIZE
    return (blocks.reshape(*lead, groups, BLOCK_SIZE // 2),
            torch.tensor(scales, dtype=torch.uint8).reshape(*lead, groups))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (int8 (out, in), scale fp32 (out,)) with w ~= q * scale[:, None]."""
    x = w.float()
    scale = x.abs().amax(dim=1) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale
