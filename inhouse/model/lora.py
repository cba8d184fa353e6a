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


def adapter_shapes(config, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """Internal name -> shape of every tensor an adapter of `spec` has on a model of `config`."""
    E, H, I, D = config.num_experts, config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    dims = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_up_proj": (H, 2 * I), "down_proj": (I, H)}  # (in, out)
    out: dict[str, tuple[int, ...]] = {}
    for i in range(config.num_hidden_layers):
        for prefix, projs, lead in _holders(i, E):
            if ("attn" if projs is ATTN_PROJS else "experts") in spec.targets:
                for p in projs:
                    n_in, n_out = dims[p]
                    out[f"{prefix}.{p}.lora_A"] = (*lead, spec.rank, n_in)
                    out[f"{prefix}.{p}.lora_B"] = (*lead, n_out, spec.rank)
    return out


def _holders(layer: int, num_experts: int):
    """(name prefix, projections, leading dims) of a layer's two LoRA holders."""
    return ((f"model.layers.{layer}.self_attn", ATTN_PROJS, ()),
            (f"model.layers.{layer}.mlp.experts", EXPERT_PROJS, (num_experts,)))


def _lora_pair(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> nn.ParameterDict:
    """A initialised like nn.Linear (kaiming uniform), B zero: the adapter starts as a no-op."""
    a = torch.empty(*a_shape)
    bound = 1 / math.sqrt(a_shape[-1])
    nn.init.uniform_(a, -bound, bound)
    return nn.ParameterDict({"A": nn.Parameter(a), "B": nn.Parameter(torch.zeros(*b_shape))})


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
            pairs = self.adapters.get(name)
            if pairs is None or proj not in pairs:
                continue
            pair = pairs[proj]
            # NOTE: adapters are kept in fp32 whatever the model runs in; the delta is computed
            # in fp32 and rounded once to the base output's dtype (bf16 serving)
            d = ((x[rows].float() @ pair["A"].T) @ pair["B"].T * self.scales[name]).to(y.dtype)
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

    def adapted_rows(self, num_rows: int) -> list[slice]:
        """The row ranges that use one of this layer's adapters."""
        return [rows for rows, name in self.routing.groups(num_rows) if name in self.adapters]

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
            a, b = pair["A"][e], pair["B"][e]  # (r, in), (out, r); fp32, as in AttentionLoRA
            if bool(sel.all()):
                y = y + ((x.float() @ a.T) @ b.T * self.scales[name]).to(y.dtype)
            else:
                idx = sel.nonzero().squeeze(1)
                y = y.index_add(0, idx, ((x[idx].float() @ a.T) @ b.T
                                         * self.scales[name]).to(y.dtype))
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
    shapes = adapter_shapes(model.config, spec)
    torch.manual_seed(seed)
    for i, layer in enumerate(model.model.layers):
        for holder, (prefix, projs, _) in zip((layer.self_attn.lora, layer.mlp.experts.lora),
                                              _holders(i, model.config.num_experts)):
            pairs = nn.ModuleDict()
            for p in projs:
                names = (f"{prefix}.{p}.lora_A", f"{prefix}.{p}.lora_B")
                if names[0] not in shapes:
                    continue
                pair = _lora_pair(shapes[names[0]], shapes[names[1]])
                if tensors is not None:
                    for ab, n in zip(("A", "B"), names):
                        t = tensors[n]
                        if tuple(t.shape) != shapes[n]:
                            raise ValueError(f"{n}: shape {tuple(t.shape)}, expected {shapes[n]}")
                        pair[ab] = nn.Parameter(t.float().clone())
                pairs[p] = pair
            if len(pairs):
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
        for holder, (prefix, _, _) in zip((layer.self_attn.lora, layer.mlp.experts.lora),
                                          _holders(i, model.config.num_experts)):
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
