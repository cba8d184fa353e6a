"""`load_model`: checkpoint directory -> ready `Transformer`, weights memory-mapped where possible."""

from __future__ import annotations

from pathlib import Path

import torch

from inhouse.model.transformer import Transformer
from inhouse.model.int8 import use_int8
from inhouse.model.weights import CheckpointInfo, find_checkpoint, int8_weight_names, read_tensors

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
               dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a gpt-oss checkpoint (HF single/sharded, MXFP4 or dense, or original/) for inference.

    Tensors whose stored dtype is already the target (packed experts always; everything in bf16
    runs) stay views of the memory-mapped files: no copy, and pages load as they are first used.
    """
    info = find_checkpoint(path)
    return build_model(info, read_tensors(info), device, dtype)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """NOTE: torch's int8 weight kernel (_weight_int8pack_mm) faults on weights that are not
    64-byte aligned, which a view into a memory-mapped file may not be: those are copied."""
    if t.dtype == torch.int8 and t.device.type == "cpu" and t.data_ptr() % 64:
        return t.clone()
    return t


def build_model(info: CheckpointInfo, tensors: dict[str, torch.Tensor],
                device: str | torch.device, dtype: torch.dtype) -> Transformer:
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(info.config, info.experts_format, dtype)
        if info.int8:
            use_int8(model, int8_weight_names(info.config))
    state = {name: _aligned(t.to(device=device, dtype=target_dtype(name, t.dtype, dtype)))
             for name, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary.to(device)
    model.eval()
    model.requires_grad_(False)
    model.source = info
    return model
