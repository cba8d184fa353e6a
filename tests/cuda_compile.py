"""Compiles Triton kernels for a GPU that is not here: `python tests/cuda_compile.py < specs.json`.

Each spec names a kernel (module and attribute), its signature and constexprs, as recorded from
a launch under the interpreter (tests/test_cuda_compile.py). Triton compiles them ahead of time
for NVIDIA sm_90 (H100, H200) down to a cubin, which needs no GPU and no driver: what the
interpreter cannot catch (an unsupported construct, a type the compiler refuses) fails here.
Run without TRITON_INTERPRET, so that the kernels are JIT functions. Prints a JSON list: per
spec, null or the first line of the error.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time


def compile_all(specs: list[dict], arch: int = 90) -> list[str | None]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    errors = []
    for spec in specs:
        t0 = time.perf_counter()
        kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
        try:
            triton.compile(ASTSource(kernel, spec["signature"], spec["constexprs"]),
                           target=target)
            errors.append(None)
            print(f"{spec['name']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - reported per kernel
            text = str(e).strip().splitlines()
            errors.append(f"{type(e).__name__}: {text[-1] if text else ''}"[:400])
    return errors


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: the kernels must be JIT functions")
    print(json.dumps(compile_all(json.load(sys.stdin))))
