"""LoRA adapters in PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`),
with the module names of transformers' GptOssForCausalLM, so `PeftModel.from_pretrained` loads
ours and we load theirs.

PEFT names (checked against peft 0.21 with transformers 5.23):
  attention  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight  (r, in)
             ...lora_B.weight                                                (out, r)
  experts    target_parameters on GptOssExperts ([E, in, out] parameters): one wrapper per
             parameter, nested in the order of `target_parameters`, the last outermost:
             with [gate_up_proj, down_proj], gate_up's tensors sit under
             `mlp.experts.base_layer.lora_{A,B}.weight` and down's under `mlp.experts.lora_{A,B}`.
             lora_A.weight (E*r, in): rows in (expert, rank) order;
             lora_B.weight (out, r*E): columns in (rank, expert) order.
Internal names and shapes: see lora.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from inhouse.errors import InhouseError
from inhouse.model.lora import ATTN_PROJS, EXPERT_PROJS, LoraSpec, add_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_EXPERT_PARAMS = [f"mlp.experts.{p}" for p in EXPERT_PROJS]


class AdapterError(InhouseError):
    """An adapter directory that cannot be used."""


def save_adapter(path: str | Path, spec: LoraSpec, tensors: dict[str, torch.Tensor],
                 base_model: str = "") -> Path:
    """Write the adapter (internal names) into directory `path` (created if needed; other files
    there are left alone). Each file is written aside and renamed into place."""
    path = Path(path)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
        "target_modules": list(ATTN_PROJS) if "attn" in spec.targets else [],
        "target_parameters": list(_EXPERT_PARAMS) if "experts" in spec.targets else None,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    }
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        out[_to_peft(name, len(_EXPERT_PARAMS))] = _to_peft_layout(name, t).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / (WEIGHTS_FILE + ".tmp")), metadata={"format": "pt"})
    (path / (CONFIG_FILE + ".tmp")).write_text(json.dumps(config, indent=2) + "\n")
    os.replace(path / (WEIGHTS_FILE + ".tmp"), path / WEIGHTS_FILE)
    os.replace(path / (CONFIG_FILE + ".tmp"), path / CONFIG_FILE)
    return path


def load_adapter(path: str | Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter directory -> (spec, tensors under internal names)."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights_file.is_file():
        raise AdapterError(f"{path}: not a LoRA adapter (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file}: invalid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA is supported")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise AdapterError(f"{cfg_file}: {key} is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError(f"{cfg_file}: per-module rank_pattern/alpha_pattern are not supported")
    params = cfg.get("target_parameters") or []
    unknown = [p for p in params if not any(p == e or p.endswith("." + e) for e in _EXPERT_PARAMS)]
    if unknown:
        raise AdapterError(f"{cfg_file}: target_parameters {unknown} are not gpt-oss experts")
    try:
        raw = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights_file}: cannot read ({e})") from None
    order = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in params))  # wrapper nesting order
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for key, t in raw.items():
        name = _from_peft(key, order)
        if name is None:
            raise AdapterError(f"{weights_file}: unexpected tensor {key!r}")
        tensors[name] = t
        targets.add("experts" if ".mlp.experts." in name else "attn")
    if not tensors:
        raise AdapterError(f"{weights_file}: no LoRA tensors")
    r = int(cfg.get("r", 8))
    num_experts = _num_experts(tensors, r)
    tensors = {n: _from_peft_layout(n, t, r, num_experts) for n, t in tensors.items()}
    spec = LoraSpec(rank=r, alpha=float(cfg.get("lora_alpha", r)),
                    targets=tuple(t for t in ("attn", "experts") if t in targets))
    return spec, tensors


ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")


def parse_adapter_option(option: str) -> tuple[str, Path]:
    """"NAME=DIR" (the serve option) -> (name, dir); the name becomes part of "MODEL:NAME"."""
    name, sep, path = option.partition("=")
    if not sep or not path:
        raise AdapterError(f"--adapter {option!r}: expected NAME=DIR")
    if not ADAPTER_NAME.match(name):
        raise AdapterError(f"--adapter {option!r}: the name must be letters, digits, '_', '.' or "
                           "'-' (no ':'), at most 64 characters")
    return name, Path(path)


def attach_adapter(model, name: str, path: str | Path,
                   loaded: tuple[LoraSpec, dict[str, torch.Tensor]] | None = None) -> str:
    """Attach the adapter at `path` (or its `loaded` contents, read already by `load_adapter`)
    to `model` under `name`; returns its digest."""
    spec, tensors = loaded or load_adapter(path)
    try:
        add_adapter(model, name, spec, tensors)
    except (KeyError, ValueError) as e:
        raise AdapterError(f"{path}: the adapter does not fit this model ({e})") from None
    return adapter_digest(path)


def adapter_digest(path: str | Path) -> str:
    """sha256 over the adapter's config and weights files: names the adapter in audit records."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update(name.encode() + b"\0")
        with open(Path(path) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _to_peft(name: str, num_params: int) -> str:
    m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\w+)\.lora_([AB])", name)
    if m:
        depth = num_params - 1 - EXPERT_PROJS.index(m.group(2))
        return f"{_PREFIX}{m.group(1)}.{'base_layer.' * depth}lora_{m.group(3)}.weight"
    return f"{_PREFIX}{name}.weight"


def _from_peft(key: str, order: list[str]) -> str | None:
    m = re.fullmatch(r"base_model\.model\.(model\.layers\.\d+\.self_attn\.(\w+))\.lora_([AB])"
                     r"\.weight", key)
    if m and m.group(2) in ATTN_PROJS:
        return f"{m.group(1)}.lora_{m.group(3)}"
    m = re.fullmatch(r"base_model\.model\.(model\.layers\.\d+\.mlp\.experts)\.((?:base_layer\.)*)"
                     r"lora_([AB])\.weight", key)
    if m and order:
        depth = m.group(2).count("base_layer.")
        index = len(order) - 1 - depth
        if 0 <= index < len(order) and order[index] in EXPERT_PROJS:
            return f"{m.group(1)}.{order[index]}.lora_{m.group(3)}"
    return None


def _to_peft_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        return t
    E, a, b = t.shape
    if name.endswith("lora_A"):  # (E, r, in) -> (E*r, in)
        return t.reshape(E * a, b)
    return t.permute(1, 2, 0).reshape(a, b * E)  # B (E, out, r) -> (out, r*E)


def _from_peft_layout(name: str, t: torch.Tensor, r: int, E: int) -> torch.Tensor:
    if ".mlp.experts." not in name:
        return t
    if name.endswith("lora_A"):  # (E*r, in) -> (E, r, in)
        return t.reshape(E, r, t.shape[1])
    return t.reshape(t.shape[0], r, E).permute(2, 0, 1).contiguous()  # (out, r*E) -> (E, out, r)


def _num_experts(tensors: dict[str, torch.Tensor], r: int) -> int:
    for name, t in tensors.items():
        if ".mlp.experts." in name and name.endswith("lora_A"):
            return t.shape[0] // r
    return 1
