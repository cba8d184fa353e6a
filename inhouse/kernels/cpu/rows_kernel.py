"""Row-wise ops in one native call each (csrc/rows.c through ctypes): RMSNorm, and the router's
top-k with its softmax (`route`).

At decode a norm is some eight small PyTorch ops on one row of 2880 values, which cost more than
the arithmetic. The kernel sums each row's squares in its own fixed order (so a row's result does
not depend on the batch: `by_rows` gives it every sequence's rows at once) and gives the same bits
on every CPU. `layers.rmsnorm_reference` and `moe.route_reference` are the references the tests
compare them with.
INHOUSE_ROWS_KERNEL=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from inhouse.kernels.cpu import native


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    c = ctypes
    return native.bind("rows", {
        "inhouse_rmsnorm": [c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_void_p, c.c_float,
                            c.c_void_p],
        "inhouse_route": [c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_int64, c.c_void_p,
                          c.c_void_p],
    })


def available() -> bool:
    return _lib() is not None


def path_name() -> str:
    """"rows-route-c" with the kernel (RMSNorm and the router's top-k and softmax), "torch"
    without; audit records carry it."""
    return "rows-route-c" if available() else "torch"


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Would `rmsnorm` take x (CPU, bf16/fp32, fp32 weight, no gradient)?"""
    return (available() and x.is_cpu
            and x.dtype in (torch.bfloat16, torch.float32) and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., H) -> x / sqrt(mean(x^2) + eps) * weight, computed in fp32, in x's dtype."""
    H = x.shape[-1]
    xc = x.contiguous()
    w = weight.contiguous()
    if w.shape != (H,):
        raise ValueError(f"rmsnorm: weight {tuple(w.shape)} for rows of {H}")
    out = torch.empty_like(xc)
    _lib().inhouse_rmsnorm(xc.data_ptr(), int(x.dtype == torch.bfloat16), xc.numel() // H, H,
                           w.data_ptr(), eps, out.data_ptr())
    return out


def route_applies(logits: torch.Tensor) -> bool:
    """Would `route` take these logits (CPU, bf16/fp32, 2-D, no gradient)?"""
    return (available() and logits.is_cpu and logits.dim() == 2
            and logits.dtype in (torch.bfloat16, torch.float32)
            and not (torch.is_grad_enabled() and logits.requires_grad))


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, E) -> weights (N, k) in logits' dtype, experts (N, k) int64: the k largest
    logits, largest first (ties: the lower expert first; NaN above every number), and their
    softmax computed in fp32 (libm's expf), rounded once."""
    N, E = logits.shape
    lc = logits.contiguous()
    weights = torch.empty(N, k, dtype=logits.dtype)
    experts = torch.empty(N, k, dtype=torch.int64)
    rc = _lib().inhouse_route(lc.data_ptr(), int(lc.dtype == torch.bfloat16), N, E, k,
                              weights.data_ptr(), experts.data_ptr())
    if rc != 0:
        raise ValueError(f"route: top {k} of {E} experts")
    return weights, experts
