"""Mixture of experts: top-k router and experts stored packed (MXFP4) or dense (bf16/fp32).

Parameter names and orientations follow the HF checkpoint:
  packed: gate_up_proj_blocks [E, 2I, H/32, 16], gate_up_proj_scales [E, 2I, H/32],
          down_proj_blocks [E, H, I/32, 16], down_proj_scales [E, H, I/32]   (stored [out, in])
  dense:  gate_up_proj [E, H, 2I], down_proj [E, I, H]                        (stored [in, out])
  both:   gate_up_proj_bias [E, 2I], down_proj_bias [E, H]
Packed experts stay packed in memory: only the experts a batch routes to are decoded, one at a
time, for the tokens routed to them.
"""

from __future__ import annotations

import torch
from torch import nn

from inhouse.config import ModelConfig
from inhouse.model.layers import swiglu
from inhouse.model.mxfp4 import BYTES_PER_BLOCK, BLOCK_SIZE, dequantize


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.experts_per_token
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, k) summing to 1, expert indices (N, k)."""
        logits = nn.functional.linear(x, self.weight, self.bias)  # (N, E)
        top = torch.topk(logits, self.top_k, dim=-1, sorted=True)
        return torch.softmax(top.values.float(), dim=-1).to(x.dtype), top.indices


class Experts(nn.Module):
    """Base: route tokens to experts, weighted sum. Subclasses say where an expert's weights are."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I))
        self.down_proj_bias = nn.Parameter(torch.empty(E, H))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up (H, 2I), down (I, H)) as matrices to right-multiply by."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                groups: list[slice] | None = None) -> torch.Tensor:
        """x (N, H), weights/indices (N, k) -> (N, H).

        With `groups` (row ranges, one per sequence), each group's rows are multiplied on their
        own, exactly as if that sequence ran alone, while each routed expert is still decoded only
        once for all groups: the numerics of a row never depend on the other groups.
        """
        N, k = indices.shape
        groups = groups or [slice(0, N)]
        plans = []  # per group: (first row, slot order by expert, per-expert counts, offsets)
        for g in groups:
            flat = indices[g].reshape(-1)  # (n_g*k,): slot s is row g.start + s // k
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            offsets = [0]
            for c in counts:
                offsets.append(offsets[-1] + c)
            plans.append((g.start, torch.argsort(flat, stable=True), counts, offsets,
                          weights[g].reshape(-1)))
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            if not any(p[2][e] for p in plans):
                continue
            w1, w2 = self.expert_weights(e, x.dtype)  # decoded once, shared by all groups
            for row0, order, counts, offsets, flat_weights in plans:
                if not counts[e]:
                    continue
                slots = order[offsets[e]:offsets[e + 1]]
                rows = row0 + slots // k
                h = x[rows] @ w1 + self.gate_up_proj_bias[e]  # (n, 2I)
                h = swiglu(h, self.alpha, self.limit)  # (n, I)
                y = h @ w2 + self.down_proj_bias[e]  # (n, H)
                out.index_add_(0, rows, y * flat_weights[slots, None])
        return out


class MXFP4Experts(Experts):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        u8 = torch.uint8
        self.register_buffer("gate_up_proj_blocks",
                             torch.empty(E, 2 * I, H // BLOCK_SIZE, BYTES_PER_BLOCK, dtype=u8))
        self.register_buffer("gate_up_proj_scales", torch.empty(E, 2 * I, H // BLOCK_SIZE, dtype=u8))
        self.register_buffer("down_proj_blocks",
                             torch.empty(E, H, I // BLOCK_SIZE, BYTES_PER_BLOCK, dtype=u8))
        self.register_buffer("down_proj_scales", torch.empty(E, H, I // BLOCK_SIZE, dtype=u8))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = dequantize(self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e], dtype)  # (2I, H)
        w2 = dequantize(self.down_proj_blocks[e], self.down_proj_scales[e], dtype)  # (H, I)
        return w1.T, w2.T


class DenseExperts(Experts):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj[e], self.down_proj[e]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, experts_format: str) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = MXFP4Experts(config) if experts_format == "mxfp4" else DenseExperts(config)

    def forward(self, x: torch.Tensor, groups: list[slice] | None = None) -> torch.Tensor:
        if groups is None:
            weights, indices = self.router(x)
        else:  # row by row group, as each sequence would alone
            routed = [self.router(x[g]) for g in groups]
            weights = torch.cat([w for w, _ in routed])
            indices = torch.cat([i for _, i in routed])
        return self.experts(x, weights, indices, groups)
