"""The fused MXFP4 matmul (csrc/mxfp4.c) through ctypes: x @ W.T straight from packed blocks.

`matmul` is the fast path; `mxfp4.dequantize_reference` + a plain matmul is the reference the
tests compare it with. With `a16=True` (the experts of int8 models) the rows are rounded to int16
first and the products summed exactly in integers (csrc/mxfp4_a16.c): the same bits on every SIMD
level, reproduced by `int8.a16_kernel_reference`. `decode` and `dense_matmul` serve prefill's
many rows. When the extension was not built (no C compiler), `available()` is False
and callers decode with PyTorch instead. INHOUSE_MXFP4_KERNEL=0 turns the kernel off,
INHOUSE_MXFP4_KERNEL=portable forces its non-SIMD path, =avx2 its AVX2 path (see native).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from inhouse.kernels.cpu import native
from inhouse.kernels.cpu.native import as_dtype

# The MXFP4 format (model/mxfp4.py says it in full): 32 values per E8M0 scale, 16 bytes of codes.
BLOCK_SIZE = 32
BYTES_PER_BLOCK = 16


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    c = ctypes
    return native.bind("mxfp4", {
        "inhouse_mxfp4_simd_level": [],
        "inhouse_mxfp4_matmul": [c.c_void_p, c.c_int64, c.c_void_p, c.c_void_p, c.c_int64,
                                 c.c_int64, c.c_void_p, c.c_int, c.c_int],
        "inhouse_mxfp4_matmul_bf16": [c.c_void_p, c.c_int64, c.c_void_p, c.c_void_p, c.c_int64,
                                      c.c_int64, c.c_void_p, c.c_int],
        "inhouse_mxfp4_matmul_a16": [c.c_void_p, c.c_int, c.c_int64, c.c_void_p, c.c_void_p,
                                     c.c_int64, c.c_int64, c.c_void_p, c.c_int, c.c_int],
        "inhouse_mxfp4_decode": [c.c_void_p, c.c_void_p, c.c_int64, c.c_int64, c.c_void_p,
                                 c.c_int, c.c_int, c.c_int],
        "inhouse_moe_rows": ([c.c_void_p, c.c_int, c.c_int, c.c_int64, c.c_int64]
                             + [c.c_void_p] * 8
                             + [c.c_int64, c.c_int64, c.c_float, c.c_float, c.c_void_p, c.c_int,
                                c.c_int]),
    })


def available() -> bool:
    return _lib() is not None


def _level() -> int:
    return native.simd_level(_lib(), "mxfp4")


def path_name() -> str:
    """Which MXFP4 arithmetic this process runs: "avx512bf16-fused" (bf16 rows meet bf16-decoded
    weights in vdpbf16ps; fp32 rows take the AVX-512 path), "avx512-fused", "avx2-fused",
    "portable" or "torch" (no kernel). Audit records carry it; replay refuses a record made on
    another path."""
    if not available():
        return "torch"
    return {3: "avx512bf16-fused", 2: "avx512-fused", 1: "avx2-fused", 0: "portable"}[_level()]


def matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
           a16: bool = False) -> torch.Tensor:
    """x (M, in), blocks (O, in/32, 16) uint8, scales (O, in/32) uint8 -> (M, O) in x's dtype.
    Accumulates in fp32; each row's result is independent of M and of the thread count. a16: the
    rows are rounded to int16 (`int8.a16_kernel_reference`, bit for bit)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the fused MXFP4 kernel is not built")
    O, G, nb = blocks.shape
    if nb != BYTES_PER_BLOCK or scales.shape != (O, G) or x.shape[-1] != G * BLOCK_SIZE:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, blocks {tuple(blocks.shape)}, "
                         f"scales {tuple(scales.shape)}")
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or x.device.type != "cpu":
        raise ValueError("the kernel takes uint8 blocks/scales and CPU tensors")
    blocks, scales = blocks.contiguous(), scales.contiguous()
    M = x.shape[0]
    y = torch.empty(M, O, dtype=torch.float32)
    level = _level()
    if a16:
        xc = x if x.dtype == torch.bfloat16 else x.to(torch.float32)
        xc = xc.contiguous()
        rc = lib.inhouse_mxfp4_matmul_a16(xc.data_ptr(), int(xc.dtype == torch.bfloat16), M,
                                          blocks.data_ptr(), scales.data_ptr(), O, G,
                                          y.data_ptr(), torch.get_num_threads(), level)
    elif level >= 3 and x.dtype == torch.bfloat16:  # exact products: x is bf16 already
        xb = x.contiguous()
        rc = lib.inhouse_mxfp4_matmul_bf16(xb.data_ptr(), M, blocks.data_ptr(), scales.data_ptr(),
                                           O, G, y.data_ptr(), torch.get_num_threads())
    else:
        x32 = x.to(torch.float32).contiguous()
        rc = lib.inhouse_mxfp4_matmul(x32.data_ptr(), M, blocks.data_ptr(), scales.data_ptr(), O,
                                      G, y.data_ptr(), torch.get_num_threads(), level)
    if rc != 0:
        raise MemoryError("the MXFP4 kernel could not allocate its row buffer")
    return y.to(x.dtype)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """blocks (..., O, G, 16), scales (..., O, G) -> (..., O, G*32) in dtype (fp32 or bf16; into
    `out`, contiguous, if given): the values of mxfp4.dequantize, bit for bit, decoded by C on all
    threads (prefill decodes an expert and multiplies it densely: 5760 x 2880 to bf16 takes
    PyTorch's table 53 ms, this 3.3 ms into a reused buffer on AVX-512)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the fused MXFP4 kernel is not built")
    if dtype not in (torch.float32, torch.bfloat16) or blocks.dtype != torch.uint8:
        raise ValueError(f"decode gives fp32 or bf16 from uint8 blocks, not {dtype}")
    *lead, G, nb = blocks.shape
    if nb != BYTES_PER_BLOCK or tuple(scales.shape) != (*lead, G):
        raise ValueError(f"shape mismatch: blocks {tuple(blocks.shape)}, scales "
                         f"{tuple(scales.shape)}")
    b, s = blocks.contiguous(), scales.contiguous()
    out = torch.empty(*lead, G * BLOCK_SIZE, dtype=dtype) if out is None else out
    if (out.dtype != dtype or tuple(out.shape) != (*lead, G * BLOCK_SIZE)
            or not out.is_contiguous()):
        raise ValueError("decode's out must be contiguous, of the result's shape and dtype")
    lib.inhouse_mxfp4_decode(b.data_ptr(), s.data_ptr(), b.numel() // (G * nb), G,
                             out.data_ptr(), int(dtype == torch.bfloat16),
                             torch.get_num_threads(), _level())
    return out


# Output rows decoded at a time by dense_matmul: a 512 x 2880 fp32 tile (5.9 MB) is multiplied
# while it is in cache (a 5760 x 2880 expert at 64 rows, 2 cores: 24 ms, against 39 ms fused and
# 36 ms to decode it whole first, most of that the fresh memory).
DECODE_TILE = 512


def dense_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """x (M, in), blocks (O, in/32, 16), scales (O, in/32) -> (M, O) in x's dtype: PyTorch's GEMM
    in `dtype` (x converted to it) against the weights decoded DECODE_TILE output rows at a time
    into one buffer (`decode`: exact). For many rows per expert (prefill), where a GEMM beats the
    fused kernel; a row's result depends on M (the GEMM's blocking), not on other groups."""
    O, G, _ = blocks.shape
    blocks, scales = blocks.contiguous(), scales.contiguous()
    xc = as_dtype(x, dtype)
    yt = torch.empty(O, x.shape[0], dtype=dtype)  # (O, M): each tile's rows contiguous
    tile = torch.empty(min(DECODE_TILE, O), G * BLOCK_SIZE, dtype=dtype)
    for o in range(0, O, DECODE_TILE):
        n = min(DECODE_TILE, O - o)
        w = decode(blocks[o:o + n], scales[o:o + n], dtype, tile[:n])
        torch.mm(w, xc.T, out=yt[o:o + n])
    return as_dtype(yt.T.contiguous(), x.dtype)


def moe_rows(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
             gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             down: tuple[torch.Tensor, torch.Tensor, torch.Tensor], alpha: float,
             limit: float, a16: bool = False) -> torch.Tensor:
    """One MoE layer in one call: x (M, H) bf16 or fp32, the router's weights and indices (M, k),
    gate_up / down as (blocks [E, out, in/32, 16], scales [E, out, in/32], bias [E, out]) ->
    (M, H) in x's dtype. The operations and bf16 roundings of moe.Experts.forward in its order,
    each expert's bytes read once for all rows; every row is computed as if alone. a16: both
    projections as `matmul(..., a16=True)`."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the fused MXFP4 kernel is not built")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"moe_rows takes bf16 or fp32 rows, not {x.dtype}")
    (b1, s1, bias1), (b2, s2, bias2) = gate_up, down
    M, H = x.shape
    I = b2.shape[2] * BLOCK_SIZE
    xc, b1, s1 = x.contiguous(), b1.contiguous(), s1.contiguous()
    b2, s2 = b2.contiguous(), s2.contiguous()
    bias1, bias2 = as_dtype(bias1, x.dtype).contiguous(), as_dtype(bias2, x.dtype).contiguous()
    idx = as_dtype(indices, torch.int64).contiguous()
    w = as_dtype(weights, torch.float32).contiguous()
    out = torch.empty(M, H, dtype=x.dtype)
    rc = lib.inhouse_moe_rows(xc.data_ptr(), int(x.dtype == torch.bfloat16), int(a16), M,
                              idx.shape[1],
                              idx.data_ptr(), w.data_ptr(), b1.data_ptr(), s1.data_ptr(),
                              bias1.data_ptr(), b2.data_ptr(), s2.data_ptr(), bias2.data_ptr(),
                              H, I, alpha, limit, out.data_ptr(), torch.get_num_threads(),
                              _level())
    if rc != 0:
        raise MemoryError("the MoE kernel could not allocate its buffers")
    return out
