"""What `inhouse inspect` reports: layout, shape, parameter counts, bytes on disk and in memory.

Counts follow OpenAI's model card convention: "active" parameters are those one token uses,
i.e. everything except the embedding table and the experts the router did not pick
(gpt-oss-20b: 20.9 B total, 3.6 B active).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from inhouse.config import ModelConfig
from inhouse.model.mxfp4 import num_bytes as mxfp4_bytes
from inhouse.model.weights import CheckpointInfo, find_checkpoint


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int
    experts: int  # all experts' weights and biases
    embedding: int


def parameter_counts(config: ModelConfig) -> ParameterCounts:
    E, H, I, V = config.num_experts, config.hidden_size, config.intermediate_size, config.vocab_size
    Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attn = (H * Hq * D + Hq * D) + 2 * (H * Hkv * D + Hkv * D) + (Hq * D * H + H) + Hq
    per_expert = (H * 2 * I + 2 * I) + (I * H + H)
    router = E * H + E
    norms = 2 * H
    L = config.num_hidden_layers
    embedding = V * H
    experts = L * E * per_expert
    total = embedding + V * H + H + L * (attn + router + norms) + experts
    active = total - embedding - L * (E - config.experts_per_token) * per_expert
    return ParameterCounts(total, active, experts, embedding)


def kv_bytes(config: ModelConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes per token of context, fixed bytes of the sliding-window layers at full window)."""
    per_layer_token = 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize
    full = sum(1 for i in range(config.num_hidden_layers) if not config.is_sliding(i))
    sliding = config.num_hidden_layers - full
    return full * per_layer_token, sliding * config.sliding_window * per_layer_token


def weight_bytes(config: ModelConfig, experts_format: str, dtype: torch.dtype,
                 embed_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the weights take once loaded by `load_model` with compute dtype `dtype`."""
    counts = parameter_counts(config)
    E, H, I, L = config.num_experts, config.hidden_size, config.intermediate_size, config.num_hidden_layers
    fp32 = (2 * L + 1) * H + L * config.num_attention_heads  # norms and sinks
    expert_weights = L * E * 3 * H * I
    expert_bias = counts.experts - expert_weights
    rest = counts.total - counts.embedding - counts.experts - fp32
    if experts_format == "mxfp4":
        experts = L * E * (mxfp4_bytes(2 * I, H) + mxfp4_bytes(H, I))
    else:
        experts = expert_weights * dtype.itemsize
    return (counts.embedding * embed_dtype.itemsize + experts + (rest + expert_bias) * dtype.itemsize
            + fp32 * 4)


# What a GPU keeps beside the weights and the KV cache: activations, CUDA graphs, the sampler,
# CUDA's own context. vLLM leaves 10% (its default gpu_memory_utilization 0.9).
GPU_RESERVE_FRACTION = 0.08
GPU_RESERVE_MIN = 2 << 30


def gpu_reserve(total_bytes: int) -> int:
    """Bytes of a GPU of total_bytes kept out of the KV budget."""
    return max(GPU_RESERVE_MIN, int(total_bytes * GPU_RESERVE_FRACTION))


def kv_budget_on_gpu(free_bytes: int, total_bytes: int) -> int:
    """The KV budget of a GPU whose weights are loaded: what is free, less the reserve."""
    return max(0, free_bytes - gpu_reserve(total_bytes))


def users_at_context(config: ModelConfig, dtype: torch.dtype, device_bytes: int,
                     context: int, experts_format: str = "mxfp4") -> int:
    """How many sequences of `context` tokens one GPU of device_bytes holds the keys and values
    of, beside the weights (MXFP4 experts stay packed) and the reserve."""
    per_token, sliding = kv_bytes(config, dtype)
    free = device_bytes - weight_bytes(config, experts_format, dtype)
    budget = kv_budget_on_gpu(free, device_bytes)
    return budget // (per_token * min(context, config.max_position_embeddings) + sliding)


@dataclass(frozen=True)
class ModelSummary:
    info: CheckpointInfo
    counts: ParameterCounts
    dtype: torch.dtype
    ram_bytes: int
    kv_bytes_per_token: int
    kv_sliding_bytes: int

    @property
    def config(self) -> ModelConfig:
        return self.info.config


def summarize(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> ModelSummary:
    """Read only config and headers: cheap even for gpt-oss-120b."""
    info = find_checkpoint(path)
    per_token, sliding = kv_bytes(info.config, dtype)
    return ModelSummary(info, parameter_counts(info.config), dtype,
                        weight_bytes(info.config, info.experts_format, dtype),
                        per_token, sliding)
