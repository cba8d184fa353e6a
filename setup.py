"""Builds the optional C kernels (plain C, OpenMP) as one library, inhouse.kernels.cpu._native
(metadata lives in pyproject.toml):

  mxfp4.c   fused MXFP4 matmul (experts straight from the packed blocks), a whole MoE layer
  mxfp4_a16.c  the same against rows rounded to int16 (the experts of int8 models)
  dense.c   bf16 and int8 matrix-vector products (attention, router, unembedding at decode)
  attend.c  attention of one query row per head over the KV cache (decode), rotary
  rows.c    row-wise ops (RMSNorm, the router's top-k and softmax)
  step.c    a whole decode step: the kernels above in sequence for every layer

`optional=True`: on a machine without a C compiler the install still succeeds and inhouse falls
back to PyTorch for all of them (slower, same results within float rounding)."""

from pathlib import Path

from setuptools import Extension, setup

CSRC = "inhouse/kernels/cpu/csrc"
KERNELS = Extension(
    "inhouse.kernels.cpu._native",
    sources=[f"{CSRC}/{name}.c"
             for name in ("mxfp4", "mxfp4_a16", "dense", "attend", "rows", "step")],
    depends=[str(p) for p in Path(CSRC).glob("*.h")],
    extra_compile_args=["-O3", "-fopenmp", "-std=c11"],
    extra_link_args=["-fopenmp"], optional=True)

setup(ext_modules=[KERNELS])
