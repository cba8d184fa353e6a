"""Decode attention (csrc/attend.c through ctypes): one query row per head over the KV cache,
with sinks and the allowed key range, in one call instead of some twenty PyTorch ops; and the
rotary embedding in one call (`rotary`: PyTorch's operations and roundings, the same bits).

`attention.attention_reference` is the reference the tests compare it with; `attention.attention`
calls `attend_one` for single-row queries on CPU when the kernel is built and no gradient is
needed. INHOUSE_ATTEND_KERNEL=0 turns it off. Its arithmetic is the same on every CPU (one set of
operations in a fixed order; the exp is the kernel's own), so it has one path name. On AVX-512 it
runs those operations 16 keys at a time in registers; INHOUSE_ATTEND_KERNEL=portable (or avx2)
keeps it to the plain loops, which give the same bits.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from inhouse.kernels.cpu import native
from inhouse.kernels.cpu.native import as_dtype


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    c = ctypes
    return native.bind("attend", {
        "inhouse_attend_one": [c.c_void_p, c.c_void_p, c.c_void_p, c.c_int, c.c_void_p, c.c_int64,
                               c.c_int64, c.c_int64, c.c_int64, c.c_int64, c.c_int64, c.c_float,
                               c.c_void_p, c.c_int, c.c_int],
        "inhouse_rotary": [c.c_void_p, c.c_int, c.c_void_p, c.c_void_p, c.c_int64, c.c_int64,
                           c.c_int64, c.c_void_p],
    })


def available() -> bool:
    return _lib() is not None


def path_name() -> str:
    """"attend-c" with the kernel, "torch" without; audit records carry it."""
    return "attend-c" if available() else "torch"


# csrc/attend.c's limits: head_dim a multiple of 16 up to MAX_HEAD_DIM, query heads per kv head
MAX_HEAD_DIM, MAX_GROUP = 256, 64


def allowed_keys(num_keys: int, q_start: int, k_start: int,
                 window: int | None) -> tuple[int, int]:
    """The keys lo..hi-1 (of num_keys from position k_start on) that one query row at q_start
    may see."""
    lo = 0 if window is None else max(0, q_start - window + 1 - k_start)
    return lo, max(lo, min(num_keys, q_start - k_start + 1))


def heads_fit(head_dim: int, group: int = 1) -> bool:
    """Does the kernel take heads of head_dim with `group` query heads per kv head?"""
    return head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM and group <= MAX_GROUP


def simd() -> int:
    """1 where the kernel may run its AVX-512 tiles (INHOUSE_ATTEND_KERNEL allows it), else 0
    (the plain loops; the same bits)."""
    return int(native.max_level("attend") >= 2)


def applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Would `attend_one` take these (one query row, CPU, bf16/fp32, head_dim a multiple of 16
    up to 256, keys laid out row after row within each head)?"""
    T, _, D = q.shape
    return (T == 1 and available() and q.is_cpu and k.dtype == q.dtype
            and q.dtype in (torch.bfloat16, torch.float32) and heads_fit(D)
            and k.stride(2) == 1 and k.stride(1) == D)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
               lo: int, hi: int, scale: float) -> torch.Tensor:
    """q (1, Hq, D), k/v (Hkv, S, D) (rows contiguous within a head; heads may be strided, as in
    the cache's buffer), keys lo..hi-1 allowed -> (1, Hq*D) in q's dtype."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the attention kernel is not built")
    _, Hq, D = q.shape
    Hkv = k.shape[0]
    if v.stride() != k.stride() or v.dtype != k.dtype or v.shape != k.shape:
        v = v.contiguous()
        k = k.contiguous()
    qc = q.contiguous()
    s = as_dtype(sinks, torch.float32).contiguous()
    out = torch.empty(1, Hq * D, dtype=q.dtype)
    rc = lib.inhouse_attend_one(qc.data_ptr(), k.data_ptr(), v.data_ptr(),
                                int(q.dtype == torch.bfloat16), s.data_ptr(), Hq, Hkv,
                                k.stride(0), lo, hi, D, scale, out.data_ptr(),
                                torch.get_num_threads(), simd())
    if rc != 0:
        raise RuntimeError(f"the attention kernel refused its input (code {rc})")
    return out


def rotary_applies(x: torch.Tensor) -> bool:
    return (available() and x.is_cpu and x.dtype in (torch.bfloat16,
            torch.float32) and x.shape[-1] % 2 == 0
            and not (torch.is_grad_enabled() and x.requires_grad))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """layers.apply_rotary in one call: x (T, H, D), cos/sin (T, D/2) fp32 -> (T, H, D)."""
    T, H, D = x.shape
    xc = x.contiguous()
    c, s = as_dtype(cos, torch.float32).contiguous(), as_dtype(sin, torch.float32).contiguous()
    if c.shape != (T, D // 2) or s.shape != (T, D // 2):
        raise ValueError(f"rotary: cos/sin {tuple(c.shape)} for x {tuple(x.shape)}")
    out = torch.empty_like(xc)
    _lib().inhouse_rotary(xc.data_ptr(), int(x.dtype == torch.bfloat16), c.data_ptr(),
                          s.data_ptr(), T, H, D, out.data_ptr())
    return out
