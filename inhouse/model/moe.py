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
from inhouse.kernels.backend import PackedExpertKernels, Seams
from inhouse.model.layers import seam, through, swiglu
from inhouse.model.mxfp4 import BYTES_PER_BLOCK, BLOCK_SIZE, dequantize


def route_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, E) -> weights (N, k) in logits' dtype summing to 1, experts (N, k): the k
    largest logits, largest first, ties to the lower expert (a stable sort; torch.topk leaves
    their order open), and their softmax in fp32."""
    values, experts = torch.sort(logits, dim=-1, descending=True, stable=True)
    values, experts = values[..., :k], experts[..., :k]
    return torch.softmax(values.float(), dim=-1).to(logits.dtype), experts


def moe_reference(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  down: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  alpha: float, limit: float) -> torch.Tensor:
    """The experts seam's contract (kernels/backend.Seams) in PyTorch: each routed expert
    decoded with `dequantize` into x's dtype, its rows multiplied densely, the results summed
    into the rows in expert order (Experts.forward's arithmetic with decoded weights)."""
    (b1, s1, c1), (b2, s2, c2) = gate_up, down
    out = torch.zeros_like(x)
    flat_w, flat_e = weights.reshape(-1), indices.reshape(-1)
    for e in torch.unique(flat_e).tolist():
        slots = (flat_e == e).nonzero().squeeze(1)  # (n,): slot s is row s // k
        rows = slots // indices.shape[1]
        h = x[rows] @ dequantize(b1[e], s1[e], x.dtype).T + c1[e]  # (n, 2I)
        y = swiglu(h, alpha, limit) @ dequantize(b2[e], s2[e], x.dtype).T + c2[e]  # (n, H)
        out.index_add_(0, rows, y * flat_w[slots][:, None])
    return out


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.experts_per_token
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.num_experts))
        self.seams: Seams | None = None  # the backend's kernels (Transformer.use_backend)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, k) summing to 1, expert indices (N, k)."""
        logits = through(self.seams, "linear", x, self.weight, self.bias)
        if logits is None:
            logits = nn.functional.linear(x, self.weight, self.bias)  # (N, E)
        routed = through(self.seams, "route", logits, self.top_k)
        return routed if routed is not None else route_reference(logits, self.top_k)


class Experts(nn.Module):
    """Base: route tokens to experts, weighted sum. Subclasses say where an expert's weights are."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I))
        self.down_proj_bias = nn.Parameter(torch.empty(E, H))
        self.lora = None  # an ExpertsLoRA once adapters are attached (lora.attach)

    def expert(self, e: int, dtype: torch.dtype) -> "ExpertProjections":
        """Expert e's two projections, for rows of `dtype`."""
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
        lora = self.lora if self.lora is not None and self.lora.begin(N) else None
        for e in range(self.num_experts):
            if not any(p[2][e] for p in plans):
                continue
            proj = self.expert(e, x.dtype)  # anything it decodes is shared by all groups
            shared, apart = [], []  # (rows, routing weights) of each group routed to e
            for row0, order, counts, offsets, flat_weights in plans:
                if counts[e]:
                    slots = order[offsets[e]:offsets[e + 1]]
                    job = (row0 + slots // k, flat_weights[slots])
                    (shared if proj.rows_independent(counts[e]) else apart).append(job)
            # NOTE: rows whose results do not depend on the batch run in one call for all groups
            # (each expert's bytes are read once); the others run group by group.
            if len(shared) > 1:
                shared = [(torch.cat([r for r, _ in shared]), torch.cat([w for _, w in shared]))]
            for (rows, w), fused in [(j, True) for j in shared] + [(j, False) for j in apart]:
                xr = x[rows]
                h = proj.gate_up(xr, fused) + self.gate_up_proj_bias[e]  # (n, 2I)
                if lora is not None:
                    h = lora.delta("gate_up_proj", e, rows, xr, h)
                h = swiglu(h, self.alpha, self.limit)  # (n, I)
                y = proj.down(h, fused) + self.down_proj_bias[e]  # (n, H)
                if lora is not None:
                    y = lora.delta("down_proj", e, rows, h, y)
                out.index_add_(0, rows, y * w[:, None])
        return out


class MXFP4Experts(Experts):
    """int16_rows: the fused kernel meets rows rounded to int16 (mxfp4_kernel's a16 path: exact
    integer products, about half the instructions per weight), as int8 models' projections do;
    set for those models (int8.use_int8). Otherwise rows keep the model's dtype."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.int16_rows = False
        self.seams: Seams | None = None  # the backend's kernels (Transformer.use_backend)
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        u8 = torch.uint8
        self.register_buffer("gate_up_proj_blocks",
                             torch.empty(E, 2 * I, H // BLOCK_SIZE, BYTES_PER_BLOCK, dtype=u8))
        self.register_buffer("gate_up_proj_scales", torch.empty(E, 2 * I, H // BLOCK_SIZE, dtype=u8))
        self.register_buffer("down_proj_blocks",
                             torch.empty(E, H, I // BLOCK_SIZE, BYTES_PER_BLOCK, dtype=u8))
        self.register_buffer("down_proj_scales", torch.empty(E, H, I // BLOCK_SIZE, dtype=u8))

    def expert(self, e: int, dtype: torch.dtype) -> "ExpertProjections":
        return PackedExpert(self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e],
                            self.down_proj_blocks[e], self.down_proj_scales[e], dtype,
                            self.int16_rows, seam(self.seams, "packed_experts"))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                groups: list[slice] | None = None) -> torch.Tensor:
        """With the cuda backend, its `experts` seam for all rows in one call. With the cpu
        backend's packed-expert kernels, groups (sequences) of up to `layer_max_rows` rows
        without an adapter go through one native call for the whole layer (the same operations
        and roundings as Experts.forward, without a PyTorch op per expert); the rest through
        Experts.forward. The choice depends only on the group itself (batch invariance)."""
        N = x.shape[0]
        fast = seam(self.seams, "experts")
        gate_up = (self.gate_up_proj_blocks, self.gate_up_proj_scales, self.gate_up_proj_bias)
        down = (self.down_proj_blocks, self.down_proj_scales, self.down_proj_bias)
        if fast is not None and (self.lora is None or not self.lora.adapted_rows(N)):
            # a row's arithmetic never depends on the batch there: all groups in one call
            return fast(x, weights, indices, gate_up, down, self.alpha, self.limit)
        groups = groups or [slice(0, N)]
        kernels: PackedExpertKernels | None = seam(self.seams, "packed_experts")
        adapted = self.lora.adapted_rows(N) if self.lora is not None else []
        alone = [g for g in groups if g.stop - g.start <= kernels.layer_max_rows
                 and not any(g.start < r.stop and r.start < g.stop for r in adapted)
                 ] if kernels is not None else []
        if not alone:
            return super().forward(x, weights, indices, groups)
        rest = [g for g in groups if g not in alone]
        rows = torch.cat([torch.arange(g.start, g.stop) for g in alone]) if rest else slice(0, N)
        y = kernels.layer(x[rows], weights[rows], indices[rows], gate_up, down, self.alpha,
                          self.limit, self.int16_rows)
        if y is None:  # the kernel does not take these rows (their dtype, a gradient)
            return super().forward(x, weights, indices, groups)
        if not rest:  # every group took it
            return y
        out = super().forward(x, weights, indices, rest)
        out[rows] = y
        return out


class DenseExperts(Experts):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))

    def expert(self, e: int, dtype: torch.dtype) -> "ExpertProjections":
        return DenseExpert(self.gate_up_proj[e], self.down_proj[e])


class ExpertProjections:
    """One expert's gate_up (rows (n, H) -> (n, 2I)) and down ((n, I) -> (n, H)), without biases.
    NOTE: a result row must depend only on its input row and on n (batch invariance)."""

    def rows_independent(self, n: int) -> bool:
        """Would a group of n rows take the path whose rows are computed exactly as each row
        alone (`fused=True` below)? Then several groups' rows may share one call."""
        return False

    def gate_up(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        raise NotImplementedError

    def down(self, h: torch.Tensor, fused: bool) -> torch.Tensor:
        raise NotImplementedError


class DenseExpert(ExpertProjections):
    def __init__(self, w1: torch.Tensor, w2: torch.Tensor) -> None:
        self.w1, self.w2 = w1, w2  # (H, 2I), (I, H)

    def gate_up(self, x, fused=False):
        return x @ self.w1

    def down(self, h, fused=False):
        return h @ self.w2


class PackedExpert(ExpertProjections):
    """Where the backend has packed-expert kernels (the cpu backend's), few rows per group go to
    the fused kernel, straight from the packed bytes (rows of several groups in one call; a16:
    rows rounded to int16); many: decode once for all groups and multiply densely, group by group
    (where bf16 GEMMs run in fp32, tile by tile: `dense_matmul`). The choice depends only on the
    group's own row count. Without them: `dequantize` and PyTorch's matmul."""

    def __init__(self, b1, s1, b2, s2, dtype: torch.dtype, a16: bool = False,
                 kernels: PackedExpertKernels | None = None) -> None:
        self.b1, self.s1, self.b2, self.s2, self.dtype, self.a16 = b1, s1, b2, s2, dtype, a16
        self.kernels = kernels
        self._dense: DenseExpert | None = None

    def rows_independent(self, n: int) -> bool:
        # the fused kernel computes every row the same way whatever the batch (tested bit for bit)
        return self.kernels is not None and n <= self.kernels.fused_max_rows(self.dtype)

    def _decoded(self) -> DenseExpert:
        if self._dense is None:  # the backend's decoder where it has one: the same values
            decode = self.kernels.decode if self.kernels is not None else dequantize
            self._dense = DenseExpert(decode(self.b1, self.s1, self.dtype).T,  # (H, 2I)
                                      decode(self.b2, self.s2, self.dtype).T)  # (I, H)
        return self._dense

    def _multiply(self, x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                  fused: bool, which: str) -> torch.Tensor:
        if fused:
            return self.kernels.matmul(x, blocks, scales, self.a16)
        y = self.kernels.dense_matmul(x, blocks, scales) if self.kernels is not None else None
        return y if y is not None else getattr(self._decoded(), which)(x)

    def gate_up(self, x, fused):
        return self._multiply(x, self.b1, self.s1, fused, "gate_up")

    def down(self, h, fused):
        return self._multiply(h, self.b2, self.s2, fused, "down")


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
