"""8-bit weights for the attention projections and the unembedding (`inhouse convert --quantize
int8`): each output row is int8 with one scale, W[o, :] ~= weight[o, :] * weight_scale[o].

`int8_linear_reference` dequantises and multiplies (obvious, slow); `Int8Linear` goes through its
backend's `int8_linear` seam. The cpu backend's (kernels/cpu/seams.py) is a matrix-vector kernel
at decode (up to 16 rows; a byte per weight read once at close to the memory bandwidth, rows
independent of the batch), and for more rows (prefill) the int8 weights (exact in bf16 and fp32)
converted to the GEMM's dtype a slab at a time for torch's GEMM, about twice as fast as torch's
weight-only int8 kernel (docs/performance.md, "8-bit attention and unembedding"). Gradients (LoRA
training on an int8 base) take the reference. The decode kernel rounds each input row to int16
first (`int16_rows`); `int8_kernel_reference` is that arithmetic in PyTorch, bit for bit.
The packed experts of an int8 model meet int16 rows too (mxfp4_kernel's a16 path), reproduced bit
for bit by `a16_kernel_reference`.
"""

from __future__ import annotations

import torch
from torch import nn

from inhouse.kernels.backend import Seams
from inhouse.model import mxfp4
from inhouse.model.layers import seam, through
from inhouse.model.moe import MXFP4Experts


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in), weight int8 (out, in), scale (out,) -> (N, out) in x's dtype, computed in fp32."""
    w = weight.float() * scale.float()[:, None]
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (N, in) as the int8 kernel rounds them: q = round(x * (32767 / max|x|)) int16 (ties
    to even, fp32 arithmetic) and the row scale max|x| / 32767 (N,)."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    full = torch.full_like(amax, 32767.0)  # NOTE: a tensor, so that both divisions are IEEE
    inv = torch.where(amax > 0, full / amax, torch.zeros_like(amax))  # (not times a reciprocal)
    q = torch.round(x * inv).clamp(-32767, 32767).to(torch.int16)
    return q, (amax / full).squeeze(-1)


def int8_kernel_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """What dense_kernel.int8_matmul computes, fp32 (N, out): int16 rows . int8 weights summed
    exactly (int64), then * row scale * scale + bias in fp32."""
    q, row_scale = int16_rows(x)
    dots = (q.long() @ weight.long().T).float()
    y = dots * row_scale[:, None] * scale.float()
    return y + bias.float() if bias is not None else y


# twice the FP4 values, exact integers: the weights of the int16-row ("a16") kernel path
FP4_DOUBLED = torch.tensor([2 * v for v in mxfp4.FP4_VALUES], dtype=torch.int64)


def a16_kernel_reference(x: torch.Tensor, blocks: torch.Tensor,
                         scales: torch.Tensor) -> torch.Tensor:
    """What mxfp4_kernel.matmul(x, blocks, scales, a16=True) computes, bit for bit (fp32 (M, O)),
    written plainly (csrc/mxfp4_a16.c): rows rounded to int16 (int8.int16_rows); per block, the
    exact integer sums of 4 products (elements 4l..4l+3 of blocks paired as (0, 1), (2, 3), ...;
    of a last single block, elements 4l, 4l+2 and 4l+1, 4l+3), times the block's scale halved
    (the weights are doubled); 16 fp32 lanes, lanes 0-7 from a pair's first block and 8-15 from
    its second, summed pair after pair, then in sum_lanes' tree, then times the row's scale."""
    q, row_scale = int16_rows(x)  # (M, n) int16, (M,)
    O, G, _ = blocks.shape
    M = q.shape[0]
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).reshape(O, G, 32).long()
    w = FP4_DOUBLED[codes]  # (O, G, 32): element order
    prods = q.long().view(M, 1, G, 32) * w.view(1, O, G, 32)  # (M, O, G, 32), exact
    half = torch.exp2(scales.double() - 128).float()  # (O, G): exact powers of two
    acc = torch.zeros(M, O, 16)
    for g in range(0, G - 1, 2):  # pairs
        for j, lanes in ((g, slice(0, 8)), (g + 1, slice(8, 16))):
            partial = prods[:, :, j].reshape(M, O, 8, 4).sum(-1).float()  # exact
            acc[..., lanes] = acc[..., lanes] + partial * half[:, j, None]
    if G % 2:  # a last single block: even and odd elements in lanes 0-7 and 8-15
        last = prods[:, :, G - 1].reshape(M, O, 8, 2, 2)  # [.., l, a, b]: element 4l + 2a + b
        even, odd = last[..., 0].sum(-1).float(), last[..., 1].sum(-1).float()
        acc[..., :8] = acc[..., :8] + even * half[:, G - 1, None]
        acc[..., 8:] = acc[..., 8:] + odd * half[:, G - 1, None]
    a = acc[..., :8] + acc[..., 8:]  # sum_lanes: p[i] + p[i + 8], then + 4, then the last four
    b = a[..., :4] + a[..., 4:]
    total = (b[..., 0] + b[..., 2]) + (b[..., 1] + b[..., 3])
    return total * row_scale[:, None]


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with `weight` int8 (out, in) and `weight_scale` (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    seams: Seams | None = None  # the backend's (Transformer.use_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = through(self.seams, "int8_linear", x2, self.weight, self.weight_scale, self.bias)
        if y is None:
            y = int8_linear_reference(x2, self.weight, self.weight_scale, self.bias)
        return y if x.dim() == 2 else y.reshape(*lead, self.out_features)

    def rows_independent(self, rows: int) -> bool:
        """Is each result row of a `rows`-row call computed exactly as that row alone?"""
        same = seam(self.seams, "linear_rows_independent")
        return same is not None and same(self.weight, rows)


def use_int8(model: nn.Module, names: list[str]) -> None:
    """Replace the nn.Linear owning each weight name (HF names) by an (empty) Int8Linear, and
    have packed experts meet int16 rows too (MXFP4Experts.int16_rows): an int8 model runs integer
    products throughout its decode step."""
    for module in model.modules():
        if isinstance(module, MXFP4Experts):
            module.int16_rows = True
    for name in names:
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        new = Int8Linear(old.in_features, old.out_features, old.bias is not None)
        new.seams = old.seams  # the backend the model runs
        setattr(parent, attr, new)
