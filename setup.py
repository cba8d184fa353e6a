"""Builds the optional C kernels (plain C, OpenMP). Metadata lives in pyproject.toml.

  inhouse.model._mxfp4  fused MXFP4 matmul (experts straight from the packed blocks)
  inhouse.model._dense  bf16 and int8 matrix-vector products (attention, router, unembedding at
                        decode)
  inhouse.model._attend attention of one query row per head over the KV cache (decode), rotary
  inhouse.model._rows   row-wise ops (RMSNorm)

`optional=True`: on a machine without a C compiler the install still succeeds and inhouse falls
back to PyTorch for all of them (slower, same results within float rounding)."""

from setuptools import Extension, setup


def kernel(name: str) -> Extension:
    return Extension(f"inhouse.model._{name}", sources=[f"inhouse/model/csrc/{name}.c"],
                     depends=["inhouse/model/csrc/simd.h", "inhouse/model/csrc/common.h"],
                     extra_compile_args=["-O3", "-fopenmp", "-std=c11"],
                     extra_link_args=["-fopenmp"], optional=True)


setup(ext_modules=[kernel(n) for n in ("mxfp4", "dense", "attend", "rows")])
