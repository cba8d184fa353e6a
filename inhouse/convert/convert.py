"""`inhouse convert`: layouts (HF <-> original/), merging a LoRA adapter into the base, and
re-quantisation (experts -> MXFP4; attention and unembedding -> int8).

Tensors stream one at a time from the memory-mapped source through the steps below into the
writer, which writes a temporary directory and renames it at the end.
  merge:    W += scale * B @ A on every adapted projection (fp32 arithmetic, stored in the
            source's float dtype); packed experts are decoded first.
  mxfp4:    dense experts [E, in, out] -> *_blocks/*_scales (quantize.quantize_mxfp4).
  int8:     q/k/v/o and lm_head weights -> int8 rows + `weight_scale` (HF layouts only).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from inhouse.convert.quantize import quantize_int8, quantize_mxfp4
from inhouse.convert.writer import LAYOUTS, write_checkpoint
from inhouse.errors import InhouseError
from inhouse.model.lora import EXPERT_PROJS, LoraSpec, adapter_shapes, merged_delta
from inhouse.model.mxfp4 import dequantize
from inhouse.model.peft_format import load_adapter
from inhouse.model.weights import find_checkpoint, int8_weight_names, read_tensors

QUANTIZE = ("none", "mxfp4", "int8")


def convert(src: str | Path, dst: str | Path, layout: str = "hf",
            merge_adapter: str | Path | None = None, quantize: str = "none") -> Path:
    """Write `src` as a new checkpoint in `dst`; returns the directory to load."""
    if layout not in LAYOUTS:
        raise InhouseError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if quantize not in QUANTIZE:
        raise InhouseError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise InhouseError(f"{dst} is not empty: choose a new output directory")
    info = find_checkpoint(src)
    if Path(src).resolve() == dst.resolve():
        raise InhouseError("the output directory must differ from the source")
    if info.int8:
        raise InhouseError(f"{src} already holds int8 weights: convert from the checkpoint it "
                           "was made from")
    tensors = read_tensors(info)
    adapter = load_adapter(merge_adapter) if merge_adapter else None
    if adapter is not None:
        _check_adapter_fits(*adapter, info.config)
    dense_experts = (info.experts_format == "dense"
                     or (adapter is not None and "experts" in adapter[0].targets))
    if dense_experts and quantize != "mxfp4" and layout != "hf-bf16":
        raise InhouseError(f"the experts will be dense (bf16): add --quantize mxfp4 to store them "
                           f"as MXFP4, or write --layout hf-bf16")
    if quantize == "int8" and layout not in ("hf", "hf-sharded"):
        raise InhouseError("int8 weights are written in the HF layouts only (hf, hf-sharded)")
    stream = _stream(tensors, info, adapter, quantize)
    config = info.config.replace(quantization=None if layout == "hf-bf16" else "mxfp4")
    return write_checkpoint(dst, config, stream, layout)


def _stream(tensors: dict[str, torch.Tensor], info, adapter: tuple[LoraSpec, dict] | None,
            quantize: str) -> Iterator[tuple[str, torch.Tensor]]:
    spec, lora = adapter if adapter else (None, {})
    int8_names = set(int8_weight_names(info.config))
    for name, t in tensors.items():
        if name.endswith("_scales"):
            continue  # handled with its blocks
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            scales = tensors[base + "_scales"]
            key = f"{base}.lora_A"
            if key in lora:  # decode, merge, then re-quantise or keep dense
                w = dequantize(t, scales, torch.float32)  # (E, out, in)
                w = w + merged_delta(lora[key], lora[f"{base}.lora_B"], spec.scale)
                yield from _experts_out(base, w, quantize)
            else:
                yield name, t
                yield base + "_scales", scales
            continue
        proj = name.rsplit(".", 1)[0]  # "...experts.gate_up_proj" or "...q_proj" (+".weight")
        if name.split(".")[-1] in EXPERT_PROJS:  # dense experts [E, in, out]
            if f"{name}.lora_A" in lora:
                delta = merged_delta(lora[f"{name}.lora_A"], lora[f"{name}.lora_B"], spec.scale)
                t = (t.float() + delta.transpose(1, 2)).to(t.dtype)
            yield from _experts_out(name, t.transpose(1, 2), quantize)
            continue
        if name.endswith(".weight") and f"{proj}.lora_A" in lora:
            t = (t.float() + merged_delta(lora[f"{proj}.lora_A"], lora[f"{proj}.lora_B"],
                                          spec.scale)).to(t.dtype)
        if name in int8_names and quantize == "int8":
            q, scale = quantize_int8(t)
            yield name, q
            yield name + "_scale", scale
        else:
            yield name, t


def _check_adapter_fits(spec: LoraSpec, lora: dict[str, torch.Tensor], config) -> None:
    expected = adapter_shapes(config, spec)
    for key, t in lora.items():
        if key not in expected:
            raise InhouseError(f"the adapter adapts {key.rpartition('.lora_')[0]}, which this "
                               "model does not have")
        if tuple(t.shape) != expected[key]:
            raise InhouseError(f"the adapter's {key} has shape {tuple(t.shape)}, which does not "
                               f"fit this model (expected {expected[key]})")


def _experts_out(base: str, w: torch.Tensor, quantize: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Experts (E, out, in) as MXFP4 parts, or dense bf16 in transformers' [E, in, out]."""
    if quantize == "mxfp4":
        blocks, scales = quantize_mxfp4(w)
        yield base + "_blocks", blocks
        yield base + "_scales", scales
    else:
        yield base, w.transpose(1, 2).to(torch.bfloat16).contiguous()
