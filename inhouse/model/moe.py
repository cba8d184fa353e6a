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
    """Base: route tokens to experts, weighted sum. Subclasses say how one expert projects."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I))
        self.down_proj_bias = nn.Parameter(torch.empty(E, H))

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x (n, H) -> (n, 2I) without bias."""
        raise NotImplementedError

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        """h (n, I) -> (n, H) without bias."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x (N, H), weights/indices (N, k) -> (N, H)."""
        N, k = indices.shape
        flat = indices.reshape(-1)  # (N*k,): slot s is token s // k
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        flat_weights = weights.reshape(-1)
        out = torch.zeros_like(x)
        offset = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slots = order[offset:offset + n]
            offset += n
            tokens = slots // k
            h = self.gate_up(x[tokens], e) + self.gate_up_proj_bias[e]  # (n, 2I)
            h = swiglu(h, self.alpha, self.limit)  # (n, I)
            y = self.down(h, e) + self.down_proj_bias[e]  # (n, H)
            out.index_add_(0, tokens, y * flat_weights[slots, None])
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

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        w = dequantize(self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e], x.dtype)  # (2I, H)
        return x @ w.T

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        w = dequantize(self.down_proj_blocks[e], self.down_proj_scales[e], h.dtype)  # (H, I)
        return h @ w.T


class DenseExperts(Experts):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return x @ self.gate_up_proj[e]

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        return h @ self.down_proj[e]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, experts_format: str) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = MXFP4Experts(config) if experts_format == "mxfp4" else DenseExperts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.router(x)
        return self.experts(x, weights, indices)
