"""The "reference" backend: the model's PyTorch references at every seam, no native code at all
(every C kernel's entry point is made to raise here), giving the CPU backend's values."""

from __future__ import annotations

import pytest
import torch

from inhouse.config import EngineConfig
from inhouse.engine import LLMEngine, SamplingParams
from inhouse.kernels import arithmetic
from inhouse.kernels.cpu import attend_kernel, dense_kernel, mxfp4_kernel, rows_kernel
from inhouse.model import load_model
from tests.conftest import random_ids

NATIVE = {dense_kernel: ("bf16_matmul", "int8_matmul", "linear_many", "gemm"),
          mxfp4_kernel: ("matmul", "moe_rows", "decode", "dense_matmul"),
          rows_kernel: ("rmsnorm", "route"), attend_kernel: ("attend_one", "rotary")}


def forbid_native(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a native kernel ran on the reference backend")

    for module, names in NATIVE.items():
        for name in names:
            monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_the_reference_backend_runs_no_native_code_and_gives_the_cpu_logits(
        checkpoints, tiny_config, dtype, tol, monkeypatch):
    ids = random_ids(40, tiny_config.vocab_size)
    with torch.no_grad():
        cpu = load_model(checkpoints["hf"], dtype=dtype, backend="cpu")
        want = [cpu(ids[:37], c := cpu.new_cache(), last_only=True), cpu(ids[37:38], c)]
    forbid_native(monkeypatch)
    ref = load_model(checkpoints["hf"], dtype=dtype, backend="reference")
    assert ref.backend == "reference"
    # its records could never replay on the native arithmetic: an id of its own
    assert arithmetic.path_name(backend="reference") not in (arithmetic.path_name(),
                                                            arithmetic.path_name(backend="cuda"))
    with torch.no_grad():
        cache = ref.new_cache()
        got = [ref(ids[:37], cache, last_only=True), ref(ids[37:38], cache)]
        batch = ref.forward_batch([(ids[:9], ref.new_cache()), (ids[3:20], ref.new_cache())],
                                  independent=True)
    for g, w in zip(got, want):
        assert torch.allclose(g.float(), w.float(), atol=tol, rtol=tol)
    assert batch.shape == (2, tiny_config.vocab_size) and batch.isfinite().all()


def test_the_engine_on_the_reference_backend_answers_as_on_the_cpu(checkpoints, tiny_config,
                                                                    monkeypatch):
    cfg = EngineConfig(prefill_chunk=8, max_num_batched_tokens=24)
    outs = []
    for backend in ("cpu", "reference"):
        if backend == "reference":
            forbid_native(monkeypatch)
        engine = LLMEngine(load_model(checkpoints["hf"], backend=backend), cfg)
        for i in range(2):
            engine.add_request(f"r{i}", random_ids(12 + 7 * i, tiny_config.vocab_size, i).tolist(),
                               SamplingParams(max_tokens=4, temperature=0))
        out = {}
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        outs.append(out)
    assert outs[0] == outs[1]
