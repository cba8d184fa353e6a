"""Backends of the model's arithmetic, chosen once when a model is loaded (`backend.select`).

`cpu` (cpu/): plain C kernels with run-time SIMD dispatch, loaded through ctypes; `arithmetic`
names their arithmetic for audit records.
`cuda` (cuda/): Triton kernels written here: MXFP4 experts straight from the packed blocks,
attention with sinks and the sliding window (contiguous or paged keys), RMSNorm. They also run on
CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how the default suite tests
them against the references.
"""
