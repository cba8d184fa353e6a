"""bf16 and int8 matrix-vector products for decode (csrc/dense.c through ctypes), and `Linear`,
the nn.Linear that uses them (int8.Int8Linear uses `int8_matmul`).

At decode a projection multiplies a few rows by a large bf16 matrix: the work is reading the
matrix once. PyTorch's CPU bf16 GEMM reaches about half of this machine's memory bandwidth there;
the kernel streams the matrix at close to all of it. Each output row is computed the same way
whatever the number of rows (batch-invariant), so the engine's reproducible mode can give every
sequence's rows to one call and read the weights once per step instead of once per sequence.
`torch.nn.functional.linear` is the reference the tests compare it with; prefill (many rows),
fp32 weights, GPUs and training (grad) use it. INHOUSE_DENSE_KERNEL=0 turns the kernel off,
=portable keeps it off its SIMD paths, =avx2 off AVX-512.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from inhouse.kernels.cpu import native
from inhouse.kernels.cpu.native import as_dtype

# The dtypes argument of the kernel (csrc/kernels.h): which of the rows, the biases and the
# results are bf16 (else fp32).
X_BF16, BIAS_BF16, Y_BF16 = 1, 2, 4

# Up to this many rows the kernel runs (it reads the weights once and computes each row against
# them from cache); prefill's hundreds of rows go to PyTorch's blocked GEMM.
MAX_ROWS = 16

# Weight rows converted at a time for a GEMM in another dtype (`gemm`: a bf16 slab of 4096 x 2880 is
# 24 MB, fp32 47 MB; the unembedding is never converted whole).
SLAB_ROWS = 4096


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    c, p = ctypes, ctypes.c_void_p
    return native.bind("dense", {
        "inhouse_dense_simd_level": [],
        "inhouse_bf16_matmul_many": [p, c.c_int, c.c_int64, c.c_int, p, p, p, c.c_int64, p,
                                     c.c_int, c.c_int],
        "inhouse_int8_matmul_many": [p, c.c_int, c.c_int64, c.c_int, p, p, p, p, c.c_int64, p,
                                     c.c_int, c.c_int],
    })


def available() -> bool:
    return _lib() is not None


def _level() -> int:
    """3 = AVX-512 BF16 (bf16 rows in vdpbf16ps), 2 = AVX-512, 1 = AVX2, 0 = portable C."""
    return native.simd_level(_lib(), "dense")


def path_name() -> str:
    """The arithmetic this process uses for decode projections: "avx512bf16" (bf16 rows in
    vdpbf16ps; fp32 rows and int8 weights take the AVX-512 path), "avx512", "avx2", "portable",
    or "torch" (no kernel). Audit records carry it with the MXFP4 path."""
    if not available():
        return "torch"
    return {3: "avx512bf16", 2: "avx512", 1: "avx2", 0: "portable"}[_level()]


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype prefill's GEMMs multiply x's rows in. bf16 rows on a CPU without AVX-512 BF16 (or
    with INHOUSE_DENSE_KERNEL capping it) go in fp32: PyTorch's bf16 GEMM converts as it goes
    there and runs at a third of its fp32 GEMM (512 x 2880 x 4096 on an Ice Lake: 29.6 against
    105 GMAC/s), and bf16 values are exact in fp32, so the products stay exact and the sums fp32
    as before; only their order changes (kernels.path_name says "+gemm-f32"). Otherwise x's."""
    return torch.float32 if x.is_cpu and gemm_in_fp32(x.dtype) else x.dtype


def gemm_in_fp32(dtype: torch.dtype) -> bool:
    """Do CPU GEMMs of `dtype` rows run in fp32 here (gemm_dtype)?"""
    return dtype == torch.bfloat16 and available() and _level() < 3


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) float, weight (out, in) bf16 or int8 (with scale (out,)) -> (N, out) in x's
    dtype: PyTorch's GEMM in gemm_dtype(x), the weights converted (exactly) SLAB_ROWS rows at a
    time, then times scale plus bias in that dtype, rounded once to x's dtype."""
    dt = gemm_dtype(x)
    xc = as_dtype(x, dt)
    parts = [nn.functional.linear(xc, as_dtype(weight[o:o + SLAB_ROWS], dt))
             for o in range(0, weight.shape[0], SLAB_ROWS)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if scale is not None:
        y = y * as_dtype(scale, dt)
    if bias is not None:
        y = y + as_dtype(bias, dt)
    return as_dtype(y, x.dtype)


def _takes(weight: torch.Tensor, rows: int) -> bool:
    return (0 < rows <= MAX_ROWS and weight.is_cpu and weight.dtype in (torch.bfloat16, torch.int8)
            and available())


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Would `linear(x, weight)` / `int8_matmul(x, weight, ...)` run the kernel (x's row count,
    device, grad; a bf16 or int8 weight)?"""
    return (x.dim() > 0 and _takes(weight, x.numel() // x.shape[-1]) and x.is_cpu
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def rows_independent(weight: torch.Tensor, rows: int) -> bool:
    """Is each result row of a `rows`-row product with `weight` computed exactly as that row
    alone (the kernel runs, and no gradient can send it elsewhere)?"""
    return _takes(weight, rows) and not torch.is_grad_enabled()


def _run(kind: str, x: torch.Tensor, weights: list[torch.Tensor],
         scales: list[torch.Tensor] | None, biases: list[torch.Tensor | None],
         out_dtype: torch.dtype) -> list[torch.Tensor]:
    """x (M, K) against each of `weights` ((O_i, K), bf16 or int8 as `kind` says; int8 with
    `scales`), in one kernel call: their rows are shared out over the threads together."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the dense kernel is not built")
    M, K = x.shape
    f32, bf16 = torch.float32, torch.bfloat16
    dtype = torch.int8 if kind == "int8" else bf16
    for i, w in enumerate(weights):
        scale = scales[i] if scales is not None else None
        if w.shape != (w.shape[0], K) or w.dtype != dtype or (
                scale is not None and scale.shape != (w.shape[0],)):
            raise ValueError(f"shape/dtype mismatch: x {tuple(x.shape)}, weight {tuple(w.shape)} "
                             f"{w.dtype}, scale {None if scale is None else tuple(scale.shape)}")
    level = _level()
    # bf16 rows go in as they are where vdpbf16ps can take them (exact products) and for int8
    # weights (the kernel rounds rows to int16 itself), else as fp32
    rows_bf16 = x.dtype == bf16 and (dtype == torch.int8 or level >= 3)
    xc = x.contiguous() if rows_bf16 else as_dtype(x, f32).contiguous()
    bs = [None if b is None else as_dtype(b, bf16 if b.dtype == bf16 else f32).contiguous()
          for b in biases]
    bias_dtypes = {b.dtype for b in bs if b is not None}
    if len(bias_dtypes) > 1:
        raise ValueError("the biases of one call must share a dtype")
    dtypes = ((X_BF16 if rows_bf16 else 0) | (BIAS_BF16 if bf16 in bias_dtypes else 0)
              | (Y_BF16 if out_dtype == bf16 else 0))
    ws = [w.contiguous() for w in weights]
    ys = [torch.empty(M, w.shape[0], dtype=bf16 if out_dtype == bf16 else f32) for w in ws]
    n = len(ws)
    ptrs = ctypes.c_void_p * n
    args = [ptrs(*(w.data_ptr() for w in ws))]
    if kind == "int8":  # the converted scales must outlive the call: only their addresses go in
        ss = [as_dtype(s, f32).contiguous() for s in scales]
        args.append(ptrs(*(s.data_ptr() for s in ss)))
    args += [ptrs(*(None if b is None else b.data_ptr() for b in bs)),
             (ctypes.c_int64 * n)(*(w.shape[0] for w in ws)), K, ptrs(*(y.data_ptr() for y in ys))]
    fn = getattr(lib, f"inhouse_{kind}_matmul_many")
    rc = fn(xc.data_ptr(), dtypes, M, n, *args, torch.get_num_threads(), level)
    if rc != 0:
        raise RuntimeError(f"the {kind} kernel refused its rows (code {rc})")
    return ys


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x (M, K) any float dtype, weight (O, K) bf16, bias (O,) -> (M, O) by the kernel, summed in
    fp32 and rounded once to out_dtype (fp32 or bf16)."""
    return _run("bf16", x, [weight], None, [bias], out_dtype)[0]


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x (M, K), weight int8 (O, K), scale (O,) -> (M, O) = scale * (x @ weight.T) + bias,
    each row of x rounded to int16 with one scale (|error| <= max|x[m]| / 65534) and the products
    summed exactly: the same bits on every SIMD path; rounded once to out_dtype."""
    return _run("int8", x, [weight], [scale], [bias], out_dtype)[0]


def linear_many(x: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor] | None:
    """x (M, K) through several projections of it (a layer's q, k and v) in one kernel call:
    each result is what that layer's forward gives (Linear with bf16 weights, or int8 layers
    with `weight` and `weight_scale`: all of one kind). None where the kernel does not take them
    all together; the caller then runs them one by one."""
    weights = [layer.weight for layer in layers]
    if x.dim() != 2 or not all(applies(x, w) and w.dtype == weights[0].dtype for w in weights):
        return None
    int8 = weights[0].dtype == torch.int8
    scales = [getattr(layer, "weight_scale", None) for layer in layers] if int8 else None
    biases = [layer.bias for layer in layers]
    if (scales is not None and any(s is None for s in scales)
            or len({b.dtype for b in biases if b is not None}) > 1):
        return None
    out = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    ys = _run("int8" if int8 else "bf16", x, weights, scales, biases, out)
    return [as_dtype(y, x.dtype) for y in ys]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the kernel when it applies (result rounded to x's dtype, like PyTorch's
    fp32-accumulating bf16 GEMM); prefill's rows in gemm_dtype where that is not x's."""
    if not applies(x, weight):
        if (gemm_dtype(x) != x.dtype and weight.dtype == x.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return gemm(x, weight, bias)
        return nn.functional.linear(x, weight, bias)
    out = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    if x.dim() == 2:  # decode's rows: no reshapes
        return as_dtype(bf16_matmul(x, weight, bias, out), x.dtype)
    y = bf16_matmul(x.reshape(-1, x.shape[-1]), weight, bias, out)
    return as_dtype(y, x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose decode-sized calls take the kernel,
    unless its backend's seams (kernels.backend.Seams, set by Transformer.use_backend) give
    another `linear`."""

    seams = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seams is not None and self.seams.linear is not None:
            return self.seams.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)

    def rows_independent(self, rows: int) -> bool:
        """Is each result row of a `rows`-row call computed exactly as that row alone?"""
        if self.seams is not None and self.seams.linear is not None:
            return False
        return rows_independent(self.weight, rows)
