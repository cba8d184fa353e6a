"""The cpu backend's seams: the C kernels of this package, each behind the contract of its seam
(kernels.backend.Seams).

Built once, at load, and only where the native library is: without it the cpu backend is the
model's own PyTorch paths. A seam here returns None for a call its kernel does not take (a row
count, a dtype, a layout, a gradient to keep), and the model then runs its own path for that
call: these kernels decide per call only what depends on the call itself.
"""

from __future__ import annotations

import torch

from inhouse.kernels.backend import PackedExpertKernels, Seams
from inhouse.kernels.cpu import attend_kernel, dense_kernel, mxfp4_kernel, rows_kernel
from inhouse.kernels.cpu import decode_step as cpu_step
from inhouse.kernels.cpu.native import as_dtype

# Up to this many rows (of one sequence, routed to one expert) the fused kernel multiplies straight
# from the packed blocks; above it, decoding the expert once and using a dense matmul is faster
# (docs/performance.md, "Where the fused expert kernel stops").
KERNEL_MAX_ROWS = 64
# Where bf16 rows multiply in fp32 (dense_kernel.gemm_dtype: no AVX-512 BF16) the fused kernel
# is slower per row and a tiled decode + fp32 GEMM wins earlier (the same section).
KERNEL_MAX_ROWS_F32_GEMM = 40


def available() -> bool:
    """Is the native library built (all the kernels are in it)?"""
    return all(k.available() for k in (mxfp4_kernel, dense_kernel, attend_kernel, rows_kernel))


def cpu_seams() -> Seams:
    """The cpu backend's seams; none (the model's PyTorch paths) where the library is missing."""
    if not available():
        return Seams("cpu")
    return Seams("cpu", attention=attention, rmsnorm=rmsnorm, linear=linear,
                 linear_many=linear_many, linear_rows_independent=linear_rows_independent,
                 int8_linear=int8_linear, rotary=rotary, route=route, packed_experts=PACKED,
                 decode_step=decode_step, verifies_rows_together=verifies_rows_together,
                 rows_independent=True, grad_aware=True)


# NOTE: each seam looks its kernel up when called, not when the seams are built, so that a test
# may stand in for a kernel (to count its calls, or to make it fail).
def linear(x, weight, bias):
    return dense_kernel.linear(x, weight, bias)


def linear_many(x, layers):
    return dense_kernel.linear_many(x, layers)


def linear_rows_independent(weight, rows: int) -> bool:
    return dense_kernel.rows_independent(weight, rows)


def decode_step(model, x, cos, sin, segments):
    return cpu_step.run(model, x, cos, sin, segments)


def verifies_rows_together(model) -> bool:
    return cpu_step.verifies_rows_together(model)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    return rows_kernel.rmsnorm(x, weight, eps) if rows_kernel.applies(x, weight) else None


def route(logits: torch.Tensor, k: int):
    return rows_kernel.route(logits, k) if rows_kernel.route_applies(logits) else None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    return attend_kernel.rotary(x, cos, sin) if attend_kernel.rotary_applies(x) else None


def attention(q, k, v, sinks, q_start: int, k_start: int, window: int | None,
              scale: float) -> torch.Tensor | None:
    """One query row (decode) in one call: the keys lo..hi-1 it may see."""
    if (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sinks))
            or not attend_kernel.applies(q, k)):
        return None
    lo, hi = attend_kernel.allowed_keys(k.shape[1], q_start, k_start, window)
    return attend_kernel.attend_one(q, k, v, sinks, lo, hi, scale)


def int8_linear(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor | None:
    """Rows (M, K) against int8 weights (O, K) and their scales (O,), in x's dtype: the kernel at
    decode's row counts (rows rounded to int16, exact integer sums), else the weights converted
    a slab at a time for PyTorch's GEMM (dense_kernel.gemm)."""
    if x2.dtype not in (torch.float32, torch.bfloat16) or (torch.is_grad_enabled()
                                                          and x2.requires_grad):
        return None
    if not dense_kernel.applies(x2, weight):
        return dense_kernel.gemm(x2, weight, bias, scale)
    out = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32
    return as_dtype(dense_kernel.int8_matmul(x2, weight, scale, bias, out), x2.dtype)


def _layer(x, weights, indices, gate_up, down, alpha, limit, a16):
    if not (x.dtype in (torch.bfloat16, torch.float32) and not torch.is_grad_enabled()):
        return None
    return mxfp4_kernel.moe_rows(x, weights, indices, gate_up, down, alpha, limit, a16)


def fused_max_rows(dtype: torch.dtype) -> int:
    """Up to how many rows per expert (of one group) the fused kernel runs for rows of dtype."""
    return KERNEL_MAX_ROWS_F32_GEMM if dense_kernel.gemm_in_fp32(dtype) else KERNEL_MAX_ROWS


def _fused_rows(dtype: torch.dtype) -> int:
    # no backward: training multiplies by the decoded weights
    return 0 if torch.is_grad_enabled() else fused_max_rows(dtype)


def _dense_matmul(x, blocks, scales):
    gemm = dense_kernel.gemm_dtype(x)
    if gemm == x.dtype or torch.is_grad_enabled():
        return None
    return mxfp4_kernel.dense_matmul(x, blocks, scales, gemm)


def _matmul(x, blocks, scales, a16: bool):
    return mxfp4_kernel.matmul(x, blocks, scales, a16)


def _decode(blocks, scales, dtype):
    return mxfp4_kernel.decode(blocks, scales, dtype)


PACKED = PackedExpertKernels(layer=_layer, layer_max_rows=KERNEL_MAX_ROWS,
                             fused_max_rows=_fused_rows, matmul=_matmul,
                             dense_matmul=_dense_matmul, decode=_decode)
