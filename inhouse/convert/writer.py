"""Write tensors (HF names, streamed layer by layer) as a checkpoint in one of the real layouts.

  hf          config.json + model.safetensors (MXFP4 experts as *_blocks/*_scales uint8)
  hf-sharded  the same, split into model-0000k-of-0000n.safetensors + model.safetensors.index.json
  hf-bf16     experts dequantised to bf16 in transformers' orientation [E, in, out]; no
              quantization_config (what transformers saves after Mxfp4Config(dequantize=True))
  original    original/config.json + original/model.safetensors, gpt_oss.torch names, qkv fused
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from inhouse.config import ModelConfig
from inhouse.model.mxfp4 import dequantize
from inhouse.model.weights import INDEX_FILE, original_name

LAYOUTS = ("hf", "hf-sharded", "hf-bf16", "original")


def write_checkpoint(path: str | Path, config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                     layout: str = "hf", max_shard_bytes: int = 2 << 30) -> Path:
    """Write into `path` (created; must not hold a checkpoint yet). Returns the directory whose
    config.json describes the weights (`path/original` for the original layout).

    Written into a temporary sibling directory and renamed at the end, so a failure never leaves a
    half-written checkpoint behind.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    final = Path(path)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        root = tmp / "original" if layout == "original" else tmp
        root.mkdir(exist_ok=True)
        if layout == "original":
            cfg = config.to_original_dict()
            stream = _to_original(tensors, config)
        elif layout == "hf-bf16":
            cfg = config.replace(quantization=None).to_hf_dict()
            stream = _dequantized(tensors)
        else:
            cfg = config.replace(quantization="mxfp4").to_hf_dict()
            stream = tensors
        (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shard_limit = max_shard_bytes if layout == "hf-sharded" else None
        _write_shards(root, stream, shard_limit)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / "original" if layout == "original" else final


def _write_shards(root: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                  shard_limit: int | None) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[list[str]] = []
    size = 0
    total = 0

    def flush() -> None:
        idx = len(written)
        save_file(shards[0], str(root / f"shard-{idx}.tmp"), metadata={"format": "pt"})
        written.append(list(shards[0]))
        shards[0] = {}

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard_limit is not None and shards[0] and size + nbytes > shard_limit:
            flush()
            size = 0
        shards[0][name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if shard_limit is None:
        (root / "shard-0.tmp").rename(root / "model.safetensors")
        return
    n = len(written)
    weight_map = {}
    for i, names in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (root / f"shard-{i}.tmp").rename(root / fname)
        weight_map |= {name: fname for name in names}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _dequantized(tensors: Iterable[tuple[str, torch.Tensor]]):
    """Replace each blocks/scales pair by the dense bf16 weight, transposed to [E, in, out]."""
    pending: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        if name.endswith(("_blocks", "_scales")):
            base, kind = name.rsplit("_", 1)
            pending[f"{base}_{kind}"] = t
            blocks, scales = pending.get(f"{base}_blocks"), pending.get(f"{base}_scales")
            if blocks is not None and scales is not None:
                del pending[f"{base}_blocks"], pending[f"{base}_scales"]
                dense = dequantize(blocks, scales, torch.bfloat16)  # (E, out, in)
                yield base, dense.transpose(1, 2).contiguous()  # (E, in, out)
        else:
            yield name, t


def _to_original(tensors: Iterable[tuple[str, torch.Tensor]], config: ModelConfig):
    """Rename to gpt_oss.torch names and fuse each layer's q, k, v (rows in that order)."""
    parts: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        for proj in ("q_proj", "k_proj", "v_proj"):
            marker = f".self_attn.{proj}."
            if marker in name:
                prefix, kind = name.split(marker)
                parts[f"{prefix}|{kind}|{proj}"] = t
                trio = [parts.get(f"{prefix}|{kind}|{p}") for p in ("q_proj", "k_proj", "v_proj")]
                if all(x is not None for x in trio):
                    for p in ("q_proj", "k_proj", "v_proj"):
                        del parts[f"{prefix}|{kind}|{p}"]
                    yield original_name(f"{prefix}.self_attn.qkv_proj.{kind}"), torch.cat(trio)
                break
        else:
            yield original_name(name), t
    if parts:
        raise ValueError(f"incomplete q/k/v projections: {sorted(parts)[:3]}")
