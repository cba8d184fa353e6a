"""KV cache of one sequence, heads-first (Hkv, S, D) so that slices feed attention without copies.

Full-attention layers keep every position (a buffer that grows by doubling); sliding-window layers
keep only the last `window` positions, so their memory is bounded whatever the sequence length.
"""

from __future__ import annotations

import torch

from inhouse.config import ModelConfig


class LayerKVCache:
    """Keys/values of one layer. `extend` appends T new positions and returns what to attend over."""

    def __init__(self, num_kv_heads: int, head_dim: int, window: int | None,
                 dtype: torch.dtype, device: torch.device, max_tokens: int | None = None) -> None:
        self.window = window
        self.max_tokens = max_tokens  # full layers never allocate beyond this (None: no cap)
        self.k = torch.empty(num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.start = 0  # absolute position of self.k[:, 0]
        self.length = 0  # positions held

    @property
    def end(self) -> int:
        return self.start + self.length

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """k/v (Hkv, T, D) for positions end..end+T-1 -> (keys, values, first key position)."""
        T = k.shape[1]
        if self.window is not None:
            keys = torch.cat([self.k[:, :self.length], k], dim=1)  # (Hkv, held+T, D)
            vals = torch.cat([self.v[:, :self.length], v], dim=1)
            first = self.start
            keep = min(keys.shape[1], self.window)  # the next query needs < window back
            self.k, self.v = keys[:, -keep:].clone(), vals[:, -keep:].clone()
            self.start, self.length = self.end + T - keep, keep
            return keys, vals, first
        need = self.length + T
        if need > self.k.shape[1]:
            capacity = max(need, 2 * self.k.shape[1], 16)
            if self.max_tokens is not None:
                capacity = max(need, min(capacity, self.max_tokens))
            self._grow(capacity)
        self.k[:, self.length:need] = k
        self.v[:, self.length:need] = v
        self.length = need
        return self.k[:, :need], self.v[:, :need], self.start

    def _grow(self, capacity: int) -> None:
        Hkv, _, D = self.k.shape
        k = self.k.new_empty(Hkv, capacity, D)
        v = self.v.new_empty(Hkv, capacity, D)
        k[:, :self.length] = self.k[:, :self.length]
        v[:, :self.length] = self.v[:, :self.length]
        self.k, self.v = k, v

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class KVCache:
    """One `LayerKVCache` per layer; `num_tokens` is the sequence length processed so far."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_tokens: int | None = None) -> None:
        """`max_tokens`: the most positions this sequence will hold (the engine passes what it
        reserved for the request), so that growth by doubling never overshoots it."""
        device = torch.device(device)
        self.layers = [LayerKVCache(config.num_key_value_heads, config.head_dim, config.window(i),
                                    dtype, device, max_tokens)
                       for i in range(config.num_hidden_layers)]
        self.num_tokens = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def __repr__(self) -> str:
        return f"KVCache(num_tokens={self.num_tokens}, layers={len(self.layers)}, bytes={self.nbytes()})"
