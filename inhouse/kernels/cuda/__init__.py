"""Triton kernels of the cuda backend. Importing its modules imports triton: callers ask
`backend.triton_available()` first. Under TRITON_INTERPRET=1 (set before triton is imported) the
same kernels run on CPU tensors through Triton's interpreter."""

import os

# NOTE: whether the compiler contracts a*b+c into one FMA changes the kernels' bits, and Triton's
# default flips in 3.10 (on until 3.9): pinned on, so that `cuda-triton-v1` means the same
# arithmetic whichever Triton compiles it (set before any kernel compiles: at this import).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def dot_in_fp32(dtype) -> bool:
    """Should the kernels' products run in fp32 (IEEE) rather than the rows' dtype: for fp32 rows
    (no TF32), and under the interpreter, whose bf16 tl.dot reads the raw bits as numbers. bf16
    values multiply exactly in fp32 and the sums are fp32 either way; only the order differs."""
    import torch

    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
