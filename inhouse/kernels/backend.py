"""Choosing a model's backend once, at load, and the seams a backend plugs into.

"cpu": the model's own paths (the C kernels of kernels/cpu where built, else PyTorch).
"reference": PyTorch only, the model's slow references at every seam (no native code at all): the
arithmetic to compare the others with, and a model that runs anywhere torch does.
"cuda": the Triton kernels of kernels/cuda at the attention, experts and norm seams; the rest
(projections, rotary, router, embedding) stays PyTorch on the device. It also runs on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1): how the default suite tests it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from inhouse.errors import InhouseError

NAMES = ("auto", "cpu", "cuda", "reference")
# The arithmetic id audit records carry for the cuda backend: its kernels sum in their own order
# (see kernels/cuda), so a record made there replays bit for bit only there.
CUDA_PATH = "cuda-triton-v1"
# Positions per KV page (model.paged_cache's pages, the cuda attention kernel's key blocks).
PAGE_SIZE = 16


@dataclass(frozen=True)
class PackedExpertKernels:
    """The cpu backend's kernels for MXFP4-packed experts, which the model's expert loop calls
    (moe.MXFP4Experts, moe.PackedExpert); each may return None for a call it does not take.

    layer: (x, weights, indices, gate_up, down, alpha, limit, a16) -> (M, H): a whole MoE layer
           for groups (sequences) of up to `layer_max_rows` rows, every row as if alone.
    fused_max_rows: (dtype) -> up to how many rows of one group `matmul` serves (0: none).
    matmul: (x, blocks, scales, a16) -> x @ W.T from the packed bytes, rows independent.
    dense_matmul: (x, blocks, scales) -> many rows against tiles decoded for another GEMM dtype.
    decode: (blocks, scales, dtype) -> the dense weights (model.mxfp4.dequantize's values)."""

    layer: Callable
    layer_max_rows: int
    fused_max_rows: Callable
    matmul: Callable
    dense_matmul: Callable
    decode: Callable


@dataclass(frozen=True)
class Seams:
    """The functions a backend puts in place of the model's own; None keeps the model's. A seam
    function may also return None for a call its kernel does not take (a row count, a dtype): the
    model then runs its own path for that call.

    attention: model.attention.attention's contract (q (T, Hq, D), k/v (Hkv, S, D), ...).
    experts: (x, weights, indices, gate_up (blocks, scales, bias), down (...), alpha, limit)
             -> (N, H), for MXFP4-packed experts without an adapter.
    rmsnorm: (x, weight, eps) -> x's shape and dtype.
    The "reference" backend's seams are the model's own PyTorch references (model/ builds them:
    kernels/ may not import the model).
    paged_attention: kernels.cuda.attention.paged_attention's contract (several sequences over
             pages of PAGE_SIZE positions, one call per layer)."""

    name: str
    attention: Callable | None = None
    experts: Callable | None = None
    rmsnorm: Callable | None = None
    paged_attention: Callable | None = None
    linear: Callable | None = None  # F.linear's contract (projections, router, unembedding)
    rotary: Callable | None = None  # (x (T, H, D), cos, sin) -> x rotated
    route: Callable | None = None  # (logits (N, E), k) -> (weights, experts)
    linear_many: Callable | None = None  # (x, [modules]) -> their outputs in one call
    linear_rows_independent: Callable | None = None  # (weight, rows) -> bool
    int8_linear: Callable | None = None  # (x (M, K), weight int8, scale, bias) -> (M, O)
    packed_experts: PackedExpertKernels | None = None
    # (model, x (M, H), cos, sin, segments) -> (M, H) after every layer: a whole decode step
    decode_step: Callable | None = None
    # (model) -> do its decode steps read the weights once for several rows of one sequence
    # (so that speculative drafts pay)?
    verifies_rows_together: Callable | None = None
    # are the row-wise seams' rows computed each as if alone (reproducible mode may then run
    # all sequences' rows in one call)?
    rows_independent: bool = False
    # do the seams keep gradients themselves (they decline calls that need one)? Else the model
    # takes its own paths whenever gradients are on (the kernels have no backward).
    grad_aware: bool = False


def triton_available() -> bool:
    """Can the Triton kernels run here: triton importable, and CUDA or the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def cuda_failure(device: str) -> str | None:
    """Why the Triton kernels cannot serve on `device` (their self-check, kernels/cuda/check.py,
    failed or raised), or None; asked once per device."""
    from inhouse.kernels.cuda.check import self_check

    try:
        return self_check(torch.device(device))
    except Exception as e:  # noqa: BLE001 - any failure to compile or run: not this backend
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def select(device: torch.device, requested: str = "auto") -> str:
    """The backend for a model on `device`: "auto" takes "cuda" on a CUDA device where Triton
    can run and its kernels pass their self-check (else the PyTorch paths: `cuda_failure` says
    why), and "cpu" elsewhere."""
    if requested not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}, not {requested!r}")
    if requested != "auto":
        if requested == "cuda" and not triton_available():
            raise ValueError("backend 'cuda' needs triton and a CUDA device "
                             "(or TRITON_INTERPRET=1 to run its kernels on CPU)")
        return requested
    if device.type == "cuda" and triton_available() and cuda_failure(str(device)) is None:
        return "cuda"
    return "cpu"


def device_and_backend(device: str) -> tuple[torch.device, str]:
    """A --device value ("cpu", "cuda", "cuda:1") -> (the device, the backend "auto" picks for
    it); InhouseError, one line naming --device, for a name torch does not know or a GPU this
    machine lacks."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InhouseError(f"--device: unknown device {device!r} (cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InhouseError(f"--device: device {device!r}: inhouse runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InhouseError(f"--device: device {device!r}: this machine has no CUDA device torch "
                           "can use")
    return dev, select(dev)


@functools.lru_cache(maxsize=1)
def default_seams() -> Seams:
    """The seams of a module no model has plugged a backend into (one built on its own): the
    cpu backend's."""
    return seams("cpu")


def seams(name: str) -> Seams:
    """The seams of backend `name` (its kernels imported only now)."""
    if name == "cuda":
        from inhouse.kernels.cuda import attention, mxfp4_moe, norm
        return Seams("cuda", attention=attention.attention, experts=mxfp4_moe.moe,
                     rmsnorm=norm.rmsnorm, paged_attention=attention.paged_attention,
                     rows_independent=True)
    if name == "cpu":
        from inhouse.kernels.cpu.seams import cpu_seams
        return cpu_seams()
    raise ValueError(f"no backend {name!r}")
