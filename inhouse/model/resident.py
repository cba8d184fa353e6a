"""Weights in process memory instead of a file mapping.

A memory-mapped checkpoint loads its pages on first use, and the kernel may drop clean file pages
whenever it likes: a decode step that meets a dropped page (an embedding row, an expert not routed
to for a while) waits for the disk. On the shared 2-core test machine that was 8-26 major faults
per 48 decode steps of the 20b shape, each step that met one taking 0.35-0.86 s instead of
0.15-0.2 s. `load_model` therefore copies each tensor into process memory as it loads (as
llama.cpp reads its whole file at load) and drops the copied pages from this process's mapping at
once, so that peak RSS stays near the model's size instead of twice it. `load_model(mmap=True)`
keeps the mapping (less RAM than the model: the OS pages weights in and out); `load_model` keeps
it too, with a warning, when the weights would not fit in the memory available now.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch

_MADV_WILLNEED, _MADV_DONTNEED = 3, 4  # Linux


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def available_memory() -> int | None:
    """Bytes the kernel says it can give without swapping (Linux MemAvailable), or None where
    there is no /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _pages(t: torch.Tensor) -> tuple[int, int]:
    """The whole pages under contiguous `t`: (first address, length); the edges may hold a
    neighbouring tensor's bytes."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    return first, max(0, end // mmap.PAGESIZE * mmap.PAGESIZE - first)


def _advise(t: torch.Tensor, advice: int) -> None:
    fn = _madvise()
    if fn is None or t.device.type != "cpu" or not t.is_contiguous():
        return
    first, length = _pages(t)
    if length:
        fn(first, length, advice)  # advisory: a failure changes nothing


def release_mapped_pages(t: torch.Tensor) -> None:
    """Drop this process's mapping of the whole pages under `t`, a contiguous CPU view of a
    memory-mapped *file*. The data stays in the file (and the page cache): a later read faults it
    back in. NOTE: on anonymous memory this would zero the data, so only call it on tensors read
    from a file mapping (weights.read_tensors)."""
    _advise(t, _MADV_DONTNEED)


def copy_out(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`t` (a view of a memory-mapped file) on `device` in `dtype`, in memory of its own; the
    pages of the mapping it was read from are released."""
    _advise(t, _MADV_WILLNEED)  # one readahead of the whole tensor, not a fault per few pages
    out = t.to(device=device, dtype=dtype)
    if out.data_ptr() == t.data_ptr():
        out = t.clone()
    release_mapped_pages(t)
    return out
