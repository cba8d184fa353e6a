"""The gpt-oss transformer. Module names follow the HF checkpoint, so its state dict *is* the HF
layout (`model.layers.N.self_attn.q_proj.weight`, ...); weights.py translates the other layouts."""

from __future__ import annotations

import torch
from torch import nn

from inhouse.config import ModelConfig
from inhouse.errors import InhouseError
from inhouse.model.attention import attention
from inhouse.model.kv_cache import KVCache, LayerKVCache
from inhouse.model.layers import RMSNorm, RotaryEmbedding, apply_rotary
from inhouse.model.moe import MLP


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, D)
        self.window = config.window(layer)
        self.scale = D ** -0.5
        self.q_proj = nn.Linear(H, self.num_heads * D)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D)
        self.o_proj = nn.Linear(self.num_heads * D, H)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: LayerKVCache | None) -> torch.Tensor:
        """x (T, H) at positions start..start+T-1 -> (T, H)."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # (Hkv, T, D)
        k_start = start
        if cache is not None:
            k, v, k_start = cache.extend(k, v)
        o = attention(q, k, v, self.sinks, start, k_start, self.window, self.scale)  # (T, Hq*D)
        return self.o_proj(o)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, experts_format: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, experts_format)

    def forward(self, x, cos, sin, start, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssModel(nn.Module):
    def __init__(self, config: ModelConfig, experts_format: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, experts_format)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """gpt-oss for causal LM. `model(ids)` -> logits (T, vocab) of a fresh sequence.

    With `cache`, the ids continue the cached sequence and the cache is extended.
    `last_only=True` computes the logits of the last position only (prefill).
    `dtype` is the compute dtype; norms and sinks stay fp32, packed experts stay uint8, and the
    embedding table stays in its stored dtype (rows are cast as they are looked up).
    """

    def __init__(self, config: ModelConfig, experts_format: str = "mxfp4",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if experts_format not in ("mxfp4", "dense"):
            raise ValueError(f"experts_format must be 'mxfp4' or 'dense', not {experts_format!r}")
        self.config = config
        self.experts_format = experts_format
        self.dtype = dtype
        self.model = GptOssModel(config, experts_format)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        with torch.device("cpu"):  # NOTE: not on meta even when the rest is built there
            self.rotary = RotaryEmbedding(config)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self) -> KVCache:
        return KVCache(self.config, self.dtype, self.device)

    def forward(self, token_ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        if token_ids.dim() != 1:
            raise InhouseError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        T = token_ids.shape[0]
        start = cache.num_tokens if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise InhouseError(f"sequence of {start + T} tokens exceeds the context window of "
                               f"{self.config.max_position_embeddings}")
        positions = torch.arange(start, start + T, device=self.device)
        cos, sin = self.rotary.cos_sin(positions)
        x = self.model.embed_tokens(token_ids.to(self.device)).to(self.dtype)  # (T, H)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, start, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.num_tokens += T
        if last_only:
            x = x[-1:]
        return self.lm_head(self.model.norm(x))  # (T, V)
