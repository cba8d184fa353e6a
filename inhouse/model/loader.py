"""`load_model`: checkpoint directory -> ready `Transformer`, weights read into memory (or kept
memory-mapped with mmap=True)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from inhouse.model.transformer import Transformer
from inhouse.model.int8 import use_int8
from inhouse.model import resident
from inhouse.model.weights import CheckpointInfo, find_checkpoint, int8_weight_names, read_tensors

log = logging.getLogger(__name__)

_FP32_SUFFIXES = ("layernorm.weight", "model.norm.weight", ".sinks")


def target_dtype(name: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """Dtype a tensor takes in memory: packed bytes stay uint8; norms and sinks are fp32; the
    embedding table keeps its stored dtype (rows are cast on lookup); all else is `dtype`."""
    if stored in (torch.uint8, torch.int8):
        return stored
    if name.endswith(_FP32_SUFFIXES):
        return torch.float32
    if name == "model.embed_tokens.weight":
        return stored
    return dtype


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, mmap: bool = False,
               backend: str = "auto") -> Transformer:
    """Load a gpt-oss checkpoint (HF single/sharded, MXFP4 or dense, or original/) for inference.

    Every tensor is read into memory of its own at load (see resident.py: a decode step never
    waits for the disk), one at a time, so peak RSS stays near the model's size. mmap=True keeps
    tensors whose stored dtype is already the target (packed experts always; everything in bf16
    runs) as views of the memory-mapped files: no copy, pages load as they are first used, and the
    OS may drop them again (for machines with less RAM than the model). Weights larger than the
    memory available now are kept mapped, with a warning, rather than copied into an OOM kill.
    `backend` (kernels.backend): whose kernels the model runs; "auto" takes Triton's on CUDA.
    """
    info = find_checkpoint(path)
    free = resident.available_memory()
    if not mmap and free is not None and info.num_bytes > free:
        log.warning("checkpoint %s: %.1f GiB of weights, %.1f GiB of memory available: keeping "
                    "them memory-mapped (pages load as they are used; decode may wait for the "
                    "disk)", info.root, info.num_bytes / 2**30, free / 2**30)
        mmap = True
    return build_model(info, read_tensors(info), device, dtype, mapped=not mmap, backend=backend)


def build_model(info: CheckpointInfo, tensors: dict[str, torch.Tensor],
                device: str | torch.device, dtype: torch.dtype, mapped: bool = False,
                backend: str = "auto") -> Transformer:
    """mapped=True: `tensors` are views of memory-mapped files (read_tensors), each to be copied
    out of its mapping (resident.copy_out); the dict is emptied as they are."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(info.config, info.experts_format, dtype)
        if info.int8:
            use_int8(model, int8_weight_names(info.config))
    state = {}
    for name in list(tensors):
        t = tensors.pop(name) if mapped else tensors[name]
        target = target_dtype(name, t.dtype, dtype)
        state[name] = (resident.copy_out(t, device, target) if mapped
                       else t.to(device=device, dtype=target))
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary.to(device)
    model.eval()
    model.requires_grad_(False)
    model.use_backend(backend)
    model.source = info
    return model
