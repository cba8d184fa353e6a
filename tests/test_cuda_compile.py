"""The cuda backend's Triton kernels compiled for an H100/H200 (sm_90) here, without a GPU.

Triton's interpreter runs the kernels' Python on CPU tensors (tests/test_cuda_kernels.py), which
says nothing of whether the compiler takes them: a construct the compiler refuses would surface
only on the GPU, where whoever runs benchmarks/gpu.py has no time to debug it. So every launch
the backend makes at small shapes (fp32 and bf16, contiguous and paged, decode and prefill, each
sampling filter) is recorded under the interpreter with its argument types and constexprs, and
Triton compiles each down to a cubin for sm_90 (tests/cuda_compile.py, in a process without the
interpreter), with bf16 rows' products on the tensor cores as on a GPU (`IEEE` off).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inhouse.kernels import backend

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's exp

ROOT = Path(__file__).resolve().parents[1]
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8",
         torch.bool: "i1"}


def _spec(fn, args, kwargs) -> dict:
    """A launch -> the kernel's module and name, its signature and constexprs."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    signature, constexprs = {}, {}
    for name, value in bound.arguments.items():
        param = inspect.signature(fn).parameters[name]
        if "constexpr" in str(param.annotation) or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature,
            "constexprs": constexprs}


def _launches(monkeypatch) -> list[dict]:
    """Every kernel launch of the backend's entry points at small shapes, as specs."""
    if not backend.triton_available():
        pytest.fail("triton is not installed (make setup-test installs it)")
    from triton.runtime.interpreter import InterpretedFunction

    from inhouse.kernels.cuda import attention, mxfp4_moe, norm, sampling
    from tests.conftest import random_moe_layer

    recorded = []
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        recorded.append(_spec(self.fn, args, kwargs))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    g = torch.Generator().manual_seed(0)
    i32 = dict(dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        norm.rmsnorm(torch.randn(3, 2880).to(dtype), torch.ones(2880), 1e-5)
        # gpt-oss's heads: 64 query heads of 64 dims over 8 kv heads (G = 8)
        q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((3, 64, 64), (8, 9, 64),
                                                                     (8, 9, 64)))
        sinks = torch.randn(64)
        for window in (None, 4):
            attention.attention(q, k, v, sinks, 6, 0, window, 0.125)
        pages = torch.zeros(2, 8, attention.PAGE, 64).to(dtype)
        attention.paged_attention(q, pages, pages.clone(), sinks, torch.zeros(1, 1, **i32),
                                  torch.tensor([0], **i32), torch.tensor([3], **i32),
                                  torch.tensor([6], **i32), torch.tensor([9], **i32), 4, 0.125,
                                  max_q=3)
        mlp = random_moe_layer(dtype, num_experts=4, experts_per_token=2)
        x = torch.randn(5, 64, generator=g).to(dtype)
        with torch.no_grad():
            w, idx = mlp.router(x)
            e = mlp.experts
            mxfp4_moe.moe(x, w, idx, (e.gate_up_proj_blocks, e.gate_up_proj_scales,
                                      e.gate_up_proj_bias),
                          (e.down_proj_blocks, e.down_proj_scales, e.down_proj_bias),
                          e.alpha, e.limit)
    logits = torch.randn(4, 300, generator=g)
    f32 = dict(dtype=torch.float32)
    sampling.sample(logits, torch.tensor([1.0, 0.0, 0.7, 1.0], **f32),
                    torch.tensor([0, 0, 20, 0], **i32), torch.tensor([1.0, 1.0, 0.9, 0.5], **f32),
                    torch.tensor([0.0, 0.0, 0.0, 0.1], **f32),
                    torch.tensor([sampling.draw_key(1, i) for i in range(4)]))
    for spec in recorded:  # what a GPU launch would take where the interpreter takes another:
        if "IEEE" in spec["constexprs"]:  # bf16 products on the tensor cores (dot_in_fp32)
            spec["constexprs"]["IEEE"] = "*bf16" not in spec["signature"].values()
        if spec["name"] == "_sample_kernel":  # the GPU's block, not the interpreter's
            spec["constexprs"]["BLOCK"] = sampling.BLOCK
    unique = {json.dumps(s, sort_keys=True): s for s in recorded}
    return list(unique.values())


def test_every_kernel_launch_compiles_for_sm_90(monkeypatch):
    specs = _launches(monkeypatch)
    names = {s["name"] for s in specs}
    assert names >= {"_rmsnorm_kernel", "_attention_kernel", "_gate_up_kernel", "_down_kernel",
                     "_combine_kernel", "_sample_kernel"}, names
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_compile.py")],
                          input=json.dumps(specs), capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.splitlines()[-1])
    failed = {f"{s['name']} {s['signature']} {s['constexprs']}": e
              for s, e in zip(specs, errors) if e is not None}
    assert not failed, json.dumps(failed, indent=1)[:4000]
