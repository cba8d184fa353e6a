"""Builds the optional fused MXFP4 kernel (plain C, OpenMP). Metadata lives in pyproject.toml.

`optional=True`: on a machine without a C compiler the install still succeeds and inhouse falls
back to decoding experts with PyTorch (slower, same results within float rounding)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "inhouse.model._mxfp4",
    sources=["inhouse/model/csrc/mxfp4.c"],
    extra_compile_args=["-O3", "-fopenmp", "-std=c11"],
    extra_link_args=["-fopenmp"],
    optional=True,
)])
