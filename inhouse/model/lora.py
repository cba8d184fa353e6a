"""LoRA adapters (https://arxiv.org/abs/2106.09685) on the attention projections and the experts.

W' = W + scale * B @ A with A (r, in), B (out, r), scale = alpha / r. The base weights are never
touched (packed MXFP4 experts stay packed); each adapted projection adds scale * (x @ A.T) @ B.T.
For experts every expert e has its own A[e] (r, in) and B[e] (out, r).

Several named adapters can be attached at once; an `AdapterRouting` says which adapter (or none)
each sequence of a batch uses, so one batch can mix requests for different adapters. Deltas are
computed sequence by sequence: a row's numerics never depend on the other sequences.

Internal names (also the keys of `adapter_tensors`):
  model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}       A (r, in), B (out, r)
  model.layers.N.mlp.experts.{gate_up,down}_proj.lora_{A,B} A (E, r, in), B (E, out, r)
peft_format.py translates to and from PEFT's files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PROJS = ("gate_up_proj", "down_proj")
TARGETS = ("attn", "experts")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, not {self.rank}")
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise ValueError(f"LoRA targets must be among {', '.join(TARGETS)}, not {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class AdapterRouting:
    """Which adapter each row of the current forward uses: a list of (row slice, name or None).
    Set by the transformer before its layers run; `default` applies when nothing was set."""

    def __init__(self) -> None:
        self.default: str | None = None
        self.assignment: list[tuple[slice, str | None]] | None = None

    def groups(self, num_rows: int) -> list[tuple[slice, str]]:
        """(rows, adapter name) for every row range that uses an adapter."""
        if self.assignment is None:
            return [(slice(0, num_rows), self.default)] if self.default else []
        return [(rows, name) for rows, name in self.assignment if name]


def _lora_pair(r: int, n_in: int, n_out: int, lead: tuple[int, ...] = ()) -> nn.ParameterDict:
    """A initialised like nn.Linear (kaiming uniform), B zero: the adapter starts as a no-op."""
    a = torch.empty(*lead, r, n_in)
    bound = 1 / math.sqrt(n_in)
    nn.init.uniform_(a, -bound, bound)
    return nn.ParameterDict({"A": nn.Parameter(a), "B": nn.Parameter(torch.zeros(*lead, n_out, r))})


class _LoraHolder(nn.Module):
    """One layer's named adapters: adapters[name][proj] = {A, B}; scales[name] = alpha / r."""

    def __init__(self, routing: AdapterRouting) -> None:
        super().__init__()
        self.routing = routing
        # NOTE: a plain dict, not a ModuleDict: adapter names are users' (any string, "train"
        # included), and adapters are not part of the model's own state dict
        self.adapters: dict[str, nn.ModuleDict] = {}
        self.scales: dict[str, float] = {}


class AttentionLoRA(_LoraHolder):
    """Adapters of one layer's q/k/v/o projections: A (r, in), B (out, r)."""

    def delta(self, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (N, out) = base projection of x (N, in) -> y plus each row's adapter delta."""
        n = x.shape[0]
        for rows, name in self.routing.groups(n):
            pairs = self.adapters[name] if name in self.adapters else None
            if pairs is None or proj not in pairs:
                continue
            pair = pairs[proj]
            d = (x[rows] @ pair["A"].T) @ pair["B"].T * self.scales[name]  # (n_rows, out)
            if rows.start == 0 and rows.stop >= n:
                y = y + d
            else:
                y = torch.cat([y[:rows.start], y[rows] + d, y[rows.stop:]])
        return y


class ExpertsLoRA(_LoraHolder):
    """Adapters of one layer's experts: A (E, r, in), B (E, out, r)."""

    def __init__(self, routing: AdapterRouting) -> None:
        super().__init__(routing)
        self._row_adapter: list[tuple[slice, str]] = []

    def begin(self, num_rows: int) -> bool:
        """Called once per forward of the experts; False when no row uses an adapter here."""
        self._row_adapter = [(rows, name) for rows, name in self.routing.groups(num_rows)
                             if name in self.adapters]
        return bool(self._row_adapter)

    def delta(self, proj: str, e: int, rows: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
        """Expert e's output y (n, out) for input x (n, in) of flat rows `rows` (n,), plus deltas."""
        for span, name in self._row_adapter:
            if proj not in self.adapters[name]:
                continue
            pair = self.adapters[name][proj]
            sel = (rows >= span.start) & (rows < span.stop)  # (n,) rows of this sequence
            if not bool(sel.any()):
                continue
            a, b = pair["A"][e], pair["B"][e]  # (r, in), (out, r)
            if bool(sel.all()):
                y = y + (x @ a.T) @ b.T * self.scales[name]
            else:
                idx = sel.nonzero().squeeze(1)
                y = y.index_add(0, idx, (x[idx] @ a.T) @ b.T * self.scales[name])
        return y


def attach(model: nn.Module) -> AdapterRouting:
    """Give every layer of `model` (a Transformer) its (empty) LoRA holders; idempotent."""
    routing = getattr(model, "lora_routing", None)
    if routing is None:
        routing = AdapterRouting()
        model.lora_routing = routing
        for layer in model.model.layers:
            layer.self_attn.lora = AttentionLoRA(routing).to(model.device)
            layer.mlp.experts.lora = ExpertsLoRA(routing).to(model.device)
    return routing


def add_adapter(model: nn.Module, name: str, spec: LoraSpec,
                tensors: dict[str, torch.Tensor] | None = None, seed: int = 0) -> None:
    """Attach adapter `name`: new (A random, B zero; seeded) or from `tensors` (internal names)."""
    attach(model)
    cfg = model.config
    E, H, I, D = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"q_proj": (H, cfg.num_attention_heads * D), "k_proj": (H, cfg.num_key_value_heads * D),
              "v_proj": (H, cfg.num_key_value_heads * D), "o_proj": (cfg.num_attention_heads * D, H),
              "gate_up_proj": (H, 2 * I), "down_proj": (I, H)}
    torch.manual_seed(seed)
    for i, layer in enumerate(model.model.layers):
        for holder, projs, lead, prefix in (
                (layer.self_attn.lora, ATTN_PROJS, (), f"model.layers.{i}.self_attn"),
                (layer.mlp.experts.lora, EXPERT_PROJS, (E,), f"model.layers.{i}.mlp.experts")):
            target = "attn" if projs is ATTN_PROJS else "experts"
            if target not in spec.targets:
                continue
            pairs = nn.ModuleDict()
            for p in projs:
                n_in, n_out = shapes[p]
                pair = _lora_pair(spec.rank, n_in, n_out, lead)
                if tensors is not None:
                    for ab in ("A", "B"):
                        t = tensors[f"{prefix}.{p}.lora_{ab}"]
                        if t.shape != pair[ab].shape:
                            raise ValueError(f"{prefix}.{p}.lora_{ab}: shape {tuple(t.shape)}, "
                                             f"expected {tuple(pair[ab].shape)}")
                        pair[ab] = nn.Parameter(t.float().clone())
                pairs[p] = pair
            holder.adapters[name] = pairs.to(model.device)
            holder.scales[name] = spec.scale


def remove_adapter(model: nn.Module, name: str) -> None:
    for layer in model.model.layers:
        for holder in (layer.self_attn.lora, layer.mlp.experts.lora):
            if name in holder.adapters:
                del holder.adapters[name]
                del holder.scales[name]


def adapter_names(model: nn.Module) -> list[str]:
    if getattr(model, "lora_routing", None) is None:
        return []
    names: set[str] = set()
    for layer in model.model.layers:
        names |= set(layer.self_attn.lora.adapters) | set(layer.mlp.experts.lora.adapters)
    return sorted(names)


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights under their internal names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for holder, prefix in ((layer.self_attn.lora, f"model.layers.{i}.self_attn"),
                               (layer.mlp.experts.lora, f"model.layers.{i}.mlp.experts")):
            for proj, pair in holder.adapters[name].items() if name in holder.adapters else ():
                out[f"{prefix}.{proj}.lora_A"] = pair["A"].detach()
                out[f"{prefix}.{proj}.lora_B"] = pair["B"].detach()
    return out


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    params = []
    for layer in model.model.layers:
        for holder in (layer.self_attn.lora, layer.mlp.experts.lora):
            if name in holder.adapters:
                params += list(holder.adapters[name].parameters())
    return params


def merged_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A: (out, in), or (E, out, in) for experts; computed in fp32."""
    return torch.matmul(b.float(), a.float()) * scale
