"""Loading the package's optional C kernels (built by setup.py) through ctypes.

ctypes releases the GIL during a call, and the kernels take plain pointers, so no Python C-API
code is involved. A kernel that was not built (no C compiler) loads as None and callers fall back
to PyTorch. INHOUSE_<NAME>_KERNEL (NAME = MXFP4, DENSE, ATTEND, ROWS or STEP): 0 turns one off,
portable keeps it off its SIMD paths, avx2 keeps it off AVX-512, avx512 off AVX-512 BF16. The
paths sum in different orders, so a record made on an AVX2-only machine replays bit for bit here
with =avx2 set. `as_dtype` is the wrappers' conversion that skips `.to` when nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import torch


def setting(name: str) -> str:
    """INHOUSE_<NAME>_KERNEL: "1" (default: the best SIMD the CPU has), "0", "portable", "avx2",
    "avx512" (AVX-512 without its BF16 instructions)."""
    return os.environ.get(f"INHOUSE_{name.upper()}_KERNEL", "1")


def max_level(name: str) -> int:
    """The most SIMD a kernel may use: 3 = AVX-512 with BF16, 2 = AVX-512, 1 = AVX2, 0 = C."""
    return {"portable": 0, "avx2": 1, "avx512": 2}.get(setting(name), 3)


def load(name: str) -> ctypes.CDLL | None:
    """The built kernels library (`inhouse.kernels.cpu._native`, all the kernels in one) for kernel
    `name`, or None (not built, or this kernel turned off)."""
    if setting(name) == "0":
        return None
    spec = importlib.util.find_spec("inhouse.kernels.cpu._native")
    if spec is None or spec.origin is None:
        return None
    return ctypes.CDLL(spec.origin)


def bind(name: str, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """`load(name)` with the argument types of its functions set; every kernel function returns
    an int (a status code or a level)."""
    lib = load(name)
    if lib is None:
        return None
    for fn, argtypes in signatures.items():
        f = getattr(lib, fn)
        f.argtypes, f.restype = argtypes, ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def _cpu_level(lib: ctypes.CDLL, name: str) -> int:
    return getattr(lib, f"inhouse_{name}_simd_level")()


def simd_level(lib: ctypes.CDLL | None, name: str) -> int:
    """The SIMD level kernel `name` runs at: what the CPU has (its inhouse_<name>_simd_level, asked
    once), capped by INHOUSE_<NAME>_KERNEL (read at every call); 0 without the library."""
    if lib is None:
        return 0
    return min(_cpu_level(lib, name), max_level(name))


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype: t itself when it already is (`.to` costs a microsecond even then, and the
    wrappers run a few hundred times per decoded token)."""
    return t if t.dtype == dtype else t.to(dtype)
