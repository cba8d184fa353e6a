"""Checkpoints: find the layout, read tensors memory-mapped through safetensors, translate names.

Layouts (see shared/reference/gpt-oss-facts.md):
  hf          config.json (model_type gpt_oss) + model.safetensors
  hf-sharded  config.json + model.safetensors.index.json + model-*.safetensors
  original    original/config.json (16 flat keys) + original/model.safetensors (gpt_oss.torch names)
Experts are either packed MXFP4 (`*_blocks`/`*_scales` uint8) or dense (the dequantised variant).
Our modules carry the HF names; `ORIGINAL_TO_HF` is the one table that translates the other layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from inhouse.config import ModelConfig
from inhouse.errors import CheckpointError, ConfigError
from inhouse.model.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK

INDEX_FILE = "model.safetensors.index.json"

# The one name table: original/ name <-> HF name ({n}: layer, {p}: weight|bias).
# `qkv_proj` does not exist in HF: q/k/v rows are fused in original/ and split by `_split_qkv`.
NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("embedding.weight", "model.embed_tokens.weight"),
    ("unembedding.weight", "lm_head.weight"),
    ("norm.scale", "model.norm.weight"),
    ("block.{n}.attn.norm.scale", "model.layers.{n}.input_layernorm.weight"),
    ("block.{n}.attn.qkv.{p}", "model.layers.{n}.self_attn.qkv_proj.{p}"),
    ("block.{n}.attn.sinks", "model.layers.{n}.self_attn.sinks"),
    ("block.{n}.attn.out.{p}", "model.layers.{n}.self_attn.o_proj.{p}"),
    ("block.{n}.mlp.norm.scale", "model.layers.{n}.post_attention_layernorm.weight"),
    ("block.{n}.mlp.gate.{p}", "model.layers.{n}.mlp.router.{p}"),
    ("block.{n}.mlp.mlp1_weight.blocks", "model.layers.{n}.mlp.experts.gate_up_proj_blocks"),
    ("block.{n}.mlp.mlp1_weight.scales", "model.layers.{n}.mlp.experts.gate_up_proj_scales"),
    ("block.{n}.mlp.mlp1_bias", "model.layers.{n}.mlp.experts.gate_up_proj_bias"),
    ("block.{n}.mlp.mlp2_weight.blocks", "model.layers.{n}.mlp.experts.down_proj_blocks"),
    ("block.{n}.mlp.mlp2_weight.scales", "model.layers.{n}.mlp.experts.down_proj_scales"),
    ("block.{n}.mlp.mlp2_bias", "model.layers.{n}.mlp.experts.down_proj_bias"),
)


def _template_regex(template: str) -> re.Pattern[str]:
    rx = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx + r"\Z")


_TO_HF = tuple((_template_regex(o), h) for o, h in NAME_TABLE)
_TO_ORIGINAL = tuple((_template_regex(h), o) for o, h in NAME_TABLE)


@dataclass(frozen=True)
class CheckpointInfo:
    """What `find_checkpoint` learned from a directory without reading any tensor data."""

    root: Path  # the directory holding config.json and the safetensors files
    layout: str  # "hf" | "hf-sharded" | "original"
    experts_format: str  # "mxfp4" | "dense"
    config: ModelConfig
    files: tuple[Path, ...]
    tensor_files: dict[str, Path]  # tensor name as stored -> file
    int8: bool = False  # attention and unembedding weights stored int8 + per-row `weight_scale`

    @property
    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def find_checkpoint(path: str | Path) -> CheckpointInfo:
    """Detect the layout under `path` (a checkpoint directory, its config.json or a weights file)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such file or directory: {p}")
    if p.is_file():
        p = p.parent
    cfg_file = p / "config.json"
    if not cfg_file.is_file() and (p / "original" / "config.json").is_file():
        p, cfg_file = p / "original", p / "original" / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{p} has no config.json: expected a gpt-oss checkpoint directory "
                              "(HF layout, or the original/ layout)")
    raw = _read_json(cfg_file)
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object")
    if "model_type" in raw:
        config = _with_file(cfg_file, ModelConfig.from_hf_dict, raw)
        layout = "hf-sharded" if (p / INDEX_FILE).is_file() else "hf"
    elif "num_experts" in raw and "experts_per_token" in raw:
        config = _with_file(cfg_file, ModelConfig.from_original_dict, raw)
        layout = "original"
    else:
        raise ConfigError(f"{cfg_file}: not a gpt-oss config (no model_type, and not the "
                          "original/ layout)")
    tensor_files = _index_tensors(p, layout)
    files = tuple(sorted(set(tensor_files.values())))
    packed = any(n.endswith(("_blocks", ".blocks")) for n in tensor_files)
    int8 = any(n.endswith("weight_scale") for n in tensor_files)
    return CheckpointInfo(p, layout, "mxfp4" if packed else "dense", config, files, tensor_files,
                          int8)


def _with_file(cfg_file: Path, parse, raw):
    try:
        return parse(raw)
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _index_tensors(root: Path, layout: str) -> dict[str, Path]:
    if layout == "hf-sharded":
        index = _read_json(root / INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{root / INDEX_FILE}: has no 'weight_map' object")
        files = {root / f for f in weight_map.values()}
        for f in sorted(files):
            if not f.is_file():
                raise CheckpointError(f"{f} is listed in {INDEX_FILE} but missing")
        mapping = {name: root / f for name, f in weight_map.items()}
        for f in sorted(files):  # every shard must be readable and hold what the index says
            names = _keys(f)
            listed = {n for n, g in mapping.items() if g == f}
            if listed - names:
                raise CheckpointError(f"{f} lacks tensor '{sorted(listed - names)[0]}' that "
                                      f"{INDEX_FILE} places there")
        return mapping
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root} has no .safetensors weights file")
    mapping: dict[str, Path] = {}
    for f in files:
        for name in _keys(f):
            if name in mapping:
                raise CheckpointError(f"tensor '{name}' appears in both {mapping[name]} and {f}")
            mapping[name] = f
    return mapping


def _keys(file: Path) -> set[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it may be "
                              "truncated or corrupt: copy or download it again") from None


def hf_name(name: str) -> str:
    """original/ tensor name -> HF name (through NAME_TABLE)."""
    for rx, template in _TO_HF:
        if m := rx.match(name):
            return template.format(**m.groupdict())
    raise CheckpointError(f"unexpected tensor '{name}' in an original/ checkpoint")


def original_name(name: str) -> str:
    """HF tensor name (or the fused `qkv_proj`) -> original/ name (through NAME_TABLE)."""
    for rx, template in _TO_ORIGINAL:
        if m := rx.match(name):
            return template.format(**m.groupdict())
    raise CheckpointError(f"tensor '{name}' has no name in the original/ layout")


def int8_weight_names(config: ModelConfig) -> list[str]:
    """The weights `--quantize int8` stores as int8 rows with a scale each: attention, unembedding."""
    return [f"model.layers.{n}.self_attn.{p}.weight" for n in range(config.num_hidden_layers)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + ["lm_head.weight"]


def expected_tensors(config: ModelConfig, experts_format: str,
                     int8: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, kind) where kind is "float", "uint8" or "int8": the complete list a
    model needs. With `int8`, each of `int8_weight_names` is int8 and has a `_scale` (rows,)."""
    E, H, I, V = config.num_experts, config.hidden_size, config.intermediate_size, config.vocab_size
    Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((V, H), "float"),
        "lm_head.weight": ((V, H), "float"),
        "model.norm.weight": ((H,), "float"),
    }
    for n in range(config.num_hidden_layers):
        a, m = f"model.layers.{n}.self_attn", f"model.layers.{n}.mlp"
        layer = {
            f"model.layers.{n}.input_layernorm.weight": (H,),
            f"model.layers.{n}.post_attention_layernorm.weight": (H,),
            f"{a}.q_proj.weight": (Hq * D, H), f"{a}.q_proj.bias": (Hq * D,),
            f"{a}.k_proj.weight": (Hkv * D, H), f"{a}.k_proj.bias": (Hkv * D,),
            f"{a}.v_proj.weight": (Hkv * D, H), f"{a}.v_proj.bias": (Hkv * D,),
            f"{a}.o_proj.weight": (H, Hq * D), f"{a}.o_proj.bias": (H,),
            f"{a}.sinks": (Hq,),
            f"{m}.router.weight": (E, H), f"{m}.router.bias": (E,),
            f"{m}.experts.gate_up_proj_bias": (E, 2 * I), f"{m}.experts.down_proj_bias": (E, H),
        }
        out |= {k: (s, "float") for k, s in layer.items()}
        if experts_format == "mxfp4":
            out[f"{m}.experts.gate_up_proj_blocks"] = ((E, 2 * I, H // BLOCK_SIZE, BYTES_PER_BLOCK), "uint8")
            out[f"{m}.experts.gate_up_proj_scales"] = ((E, 2 * I, H // BLOCK_SIZE), "uint8")
            out[f"{m}.experts.down_proj_blocks"] = ((E, H, I // BLOCK_SIZE, BYTES_PER_BLOCK), "uint8")
            out[f"{m}.experts.down_proj_scales"] = ((E, H, I // BLOCK_SIZE), "uint8")
        else:
            out[f"{m}.experts.gate_up_proj"] = ((E, H, 2 * I), "float")
            out[f"{m}.experts.down_proj"] = ((E, I, H), "float")
    if int8:
        for name in int8_weight_names(config):
            shape = out[name][0]
            out[name] = (shape, "int8")
            out[name + "_scale"] = ((shape[0],), "float")
    return out


def read_tensors(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """All tensors under their HF names, as zero-copy views of memory-mapped files, validated
    against the config (names, shapes, dtypes)."""
    raw: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in info.tensor_files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    raw[name] = f.get_tensor(name)  # a view on the file's mmap, no copy
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: could not read tensors ({e}); the file may be "
                                  "truncated or corrupt") from None
    if info.layout == "original":
        raw = _split_qkv({hf_name(n): t for n, t in raw.items()}, info.config)
    _validate(raw, expected_tensors(info.config, info.experts_format, info.int8), info)
    return raw


def _split_qkv(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """original/ fuses q, k, v rows (in that order) into one qkv projection."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    out = {}
    for name, t in tensors.items():
        if ".self_attn.qkv_proj." not in name:
            out[name] = t
            continue
        if t.shape[0] != q_rows + 2 * kv_rows:
            raise CheckpointError(f"tensor '{name}' has {t.shape[0]} rows, config implies "
                                  f"{q_rows + 2 * kv_rows} (q + k + v)")
        prefix, kind = name.split(".qkv_proj.")
        q, k, v = t.split([q_rows, kv_rows, kv_rows], dim=0)
        out[f"{prefix}.q_proj.{kind}"], out[f"{prefix}.k_proj.{kind}"] = q, k
        out[f"{prefix}.v_proj.{kind}"] = v
    return out


def _validate(tensors: dict[str, torch.Tensor], expected: dict, info: CheckpointInfo) -> None:
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{info.root}: checkpoint ({info.layout}) is missing tensor "
                              f"'{missing[0]}'" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{info.root}: unexpected tensor '{extra[0]}' for this config")
    for name, (shape, kind) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor '{name}' has shape {list(t.shape)}, config.json implies "
                                  f"{list(shape)}")
        if kind == "uint8" and t.dtype != torch.uint8:
            raise CheckpointError(f"tensor '{name}' must be uint8 (MXFP4), is {t.dtype}")
        if kind == "int8" and t.dtype != torch.int8:
            raise CheckpointError(f"tensor '{name}' must be int8 (it has a weight_scale), is {t.dtype}")
        if kind == "float" and not t.dtype.is_floating_point:
            raise CheckpointError(f"tensor '{name}' must be floating point, is {t.dtype}")
