"""Backends of the model's arithmetic, chosen once when a model is loaded (`backend.select`).

`cuda`: Triton kernels written here (cuda/): MXFP4 experts straight from the packed blocks,
attention with sinks and the sliding window (contiguous or paged keys), RMSNorm. They also run on
CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how the default suite tests
them against the references. The CPU backend's C kernels still live in model/ (see
docs/architecture.md).
"""
