"""Which native arithmetic this process runs, as one string for audit records.

Replay reproduces a record bit for bit only on the same arithmetic: the MXFP4 expert path and the
bf16 decode-projection path each sum in their own order (see mxfp4_kernel, dense_kernel). int8
weights meet rows rounded to int16 at decode and torch's GEMM on converted weights at prefill
("int8-a16-gemm", the same bits on every path; "int8-gemm" without the decode kernel). Records
made before carry "int8-a16" (prefill by torch's int8 kernel) or no such part, and are refused.
Decode attention runs our kernel ("attend-c": fp32 sums in a fixed order, one rounding at the
end) where it is built, and RMSNorm and the router's top-k and softmax ("rows-route-c") likewise;
records made before the router's kernel carry "rows-c" (torch's topk and softmax) and are refused.
Where bf16 GEMMs run in fp32 (no AVX-512 BF16: dense_kernel.gemm_dtype), prefill's projections and
experts do ("+gemm-f32"); records made there before carry no such part and are refused.
An int8 model's packed experts meet int16 rows too ("+experts-a16": mxfp4_kernel's a16 path, the
same bits on every SIMD level); its records made before that carry no such part and are refused.
The whole-step decode kernel (decode_step) makes these kernels' calls, so it needs no name."""

from __future__ import annotations

import torch

from inhouse.kernels.backend import CUDA_PATH
from inhouse.kernels.cpu import attend_kernel, dense_kernel, mxfp4_kernel, rows_kernel

REFERENCE_PATH = "reference-torch"  # the reference backend's arithmetic: PyTorch everywhere


def path_name(int8: bool = False, backend: str = "cpu") -> str:
    """The arithmetic of a model with bf16 projections, or with int8 ones (`int8`, a checkpoint
    from `convert --quantize int8`): e.g. "avx2-fused+dense-avx512+int8-a16-gemm+attend-c+
    rows-route-c" (+experts-a16 for int8 models); "torch+dense-torch+int8-gemm+torch+torch"
    where nothing was built. A model on the cuda backend (Transformer.backend) runs the Triton
    kernels' arithmetic at its seams and PyTorch's elsewhere: one id, CUDA_PATH; on the
    reference backend PyTorch's everywhere, whatever was built: REFERENCE_PATH."""
    if backend == "cuda":
        return CUDA_PATH
    if backend == "reference":
        return REFERENCE_PATH
    dense = dense_kernel.path_name()
    projections = "+int8-gemm" if dense == "torch" else "+int8-a16-gemm"
    experts = "+experts-a16" if int8 and mxfp4_kernel.available() else ""
    gemm = "+gemm-f32" if dense_kernel.gemm_in_fp32(torch.bfloat16) else ""
    return (f"{mxfp4_kernel.path_name()}+dense-{dense}{projections}{experts}{gemm}"
            f"+{attend_kernel.path_name()}+{rows_kernel.path_name()}")
