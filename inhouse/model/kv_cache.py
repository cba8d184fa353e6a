"""KV cache of one sequence, heads-first (Hkv, S, D) so that slices feed attention without copies.

Full-attention layers keep every position (a buffer that grows by doubling); sliding-window layers
keep only the last `window` positions, so their memory is bounded whatever the sequence length.
A sliding layer's buffer has room for the window plus `window // 8` more positions: new keys go
after the held ones, and only when the room runs out are the held keys moved back to the front
(one copy of the window every `window // 8` tokens at decode, instead of a concatenation and a copy
of it every token). The keys handed to attention are the same, in the same order.
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
        self.start = 0  # absolute position of the first held key
        self.length = 0  # positions held
        self.offset = 0  # where the first held key is in the buffer (sliding layers; else 0)

    @property
    def end(self) -> int:
        return self.start + self.length

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """k/v (Hkv, T, D) for positions end..end+T-1 -> (keys, values, first key position)."""
        T = k.shape[1]
        if self.window is not None:
            return self._extend_window(k, v)
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

    def _extend_window(self, k: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        held, first, window = self.length, self.start, self.window
        need = held + k.shape[1]  # the keys this step attends over: the held ones, then the new
        keep = min(need, window)  # the next query needs fewer than `window` back
        capacity = window + max(1, window // 8)
        if self.offset + need > self.k.shape[1]:  # no room after the held keys
            if need > capacity:  # a chunk longer than the room (prefill): a one-off buffer
                keys = torch.cat([self._held(self.k), k], dim=1)
                vals = torch.cat([self._held(self.v), v], dim=1)
                self.k = self._roomy(keys[:, -keep:], capacity)
                self.v = self._roomy(vals[:, -keep:], capacity)
                self.offset, self.start, self.length = 0, first + need - keep, keep
                return keys, vals, first
            self.k = self._roomy(self._held(self.k), capacity)
            self.v = self._roomy(self._held(self.v), capacity)
            self.offset = 0
        a = self.offset
        self.k[:, a + held:a + need] = k
        self.v[:, a + held:a + need] = v
        keys, vals = self.k[:, a:a + need], self.v[:, a:a + need]
        self.offset, self.start, self.length = a + need - keep, first + need - keep, keep
        return keys, vals, first

    def _held(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[:, self.offset:self.offset + self.length]

    @staticmethod
    def _roomy(held: torch.Tensor, capacity: int) -> torch.Tensor:
        """A new (Hkv, capacity, D) buffer that starts with `held`."""
        out = held.new_empty(held.shape[0], capacity, held.shape[2])
        out[:, :held.shape[1]] = held
        return out

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
