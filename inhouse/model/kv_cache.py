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
        if self.window is not None and not self._fits(T):
            return self._extend_past_room(k, v)
        at, first, k_start = self.reserve(T)
        self.k[:, at:at + T] = k
        self.v[:, at:at + T] = v
        return self.k[:, first:at + T], self.v[:, first:at + T], k_start

    def reserve(self, T: int) -> tuple[int, int, int]:
        """Room for T new positions, the bookkeeping advanced as if they were written: returns
        (where in the buffer they go, where the keys to attend over begin (they end with the new
        ones), the first of those keys' position). The caller writes the new keys and values
        there before anything else touches this cache (decode_step writes them in C). A sliding
        layer takes at most the room of its buffer (`_fits`); longer chunks go through extend."""
        held, first = self.length, self.start
        need = held + T
        if self.window is not None and not self._fits(T):
            raise ValueError(f"{T} new positions do not fit a window of {self.window}")
        self.make_room(T)
        if self.window is None:
            self.length = need
            return held, 0, first
        a = self.offset
        keep = min(need, self.window)  # the next query needs fewer than `window` back
        self.offset, self.start, self.length = a + need - keep, first + need - keep, keep
        return a + held, a, first

    def _capacity(self) -> int:
        return self.window + max(1, self.window // 8)

    def _fits(self, T: int) -> bool:
        return self.length + T <= self._capacity()

    def _extend_past_room(self, k: torch.Tensor,
                          v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A chunk longer than a sliding layer's room (prefill): attend over a one-off
        concatenation and keep its last `window` positions in a fresh buffer."""
        first, need = self.start, self.length + k.shape[1]
        keep = min(need, self.window)
        keys = torch.cat([self._held(self.k), k], dim=1)
        vals = torch.cat([self._held(self.v), v], dim=1)
        self.k = self._roomy(keys[:, -keep:], self._capacity())
        self.v = self._roomy(vals[:, -keep:], self._capacity())
        self.offset, self.start, self.length = 0, first + need - keep, keep
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

    def positions(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of the keys and values (Hkv, end - start, D) of absolute positions [start, end),
        or None where this layer no longer holds them all (a sliding layer keeps its window)."""
        if start < self.start or end > self.end or start > end:
            return None
        a = self.offset + start - self.start
        return self.k[:, a:a + end - start], self.v[:, a:a + end - start]

    def load(self, parts: list[tuple[torch.Tensor, torch.Tensor]], end: int) -> None:
        """Fill an empty cache with the keys and values of the positions just before `end`, given
        in order as (Hkv, T_i, D) parts (a reused prefix: all `end` positions for a full layer,
        at least the window for a sliding one, whose last `window` are kept). One copy."""
        if self.length:
            raise ValueError("a prefix is loaded into an empty cache only")
        total = sum(k.shape[1] for k, _ in parts)
        keep = total if self.window is None else min(total, self.window)
        if self.window is None and total != end:
            raise ValueError(f"a full layer needs all {end} positions, got {total}")
        if self.window is not None and keep < min(end, self.window):
            raise ValueError(f"a sliding layer needs the {min(end, self.window)} positions "
                             f"before {end}, got {total}")
        capacity = self._capacity() if self.window is not None else max(keep, 16)
        if self.window is None and self.max_tokens is not None:
            capacity = max(keep, min(2 * keep, self.max_tokens))
        self.k = self.k.new_empty(self.k.shape[0], capacity, self.k.shape[2])
        self.v = self.v.new_empty(self.k.shape)
        skip, at = total - keep, 0  # leading positions a sliding layer does not keep
        for k, v in parts:
            n = k.shape[1]
            if skip >= n:
                skip -= n
                continue
            self.k[:, at:at + n - skip] = k[:, skip:]
            self.v[:, at:at + n - skip] = v[:, skip:]
            at, skip = at + n - skip, 0
        self.offset, self.start, self.length = 0, end - keep, keep

    def make_room(self, T: int) -> None:
        """Room in the buffers for T more positions after the held ones: a full layer grows (by
        doubling, never past max_tokens), a sliding layer moves its held keys to the front
        when there is no room after them. Called first, it makes sure the next T positions,
        reserved one at a time, move nothing: the buffers keep their addresses (decode_step
        took them) and a sliding layer keeps, in place, the positions it drops, so that
        `truncate` can take back any of the T."""
        need = self.length + T
        if self.window is None:
            if need > self.k.shape[1]:
                capacity = max(need, 2 * self.k.shape[1], 16)
                if self.max_tokens is not None:
                    capacity = max(need, min(capacity, self.max_tokens))
                self._grow(capacity)
        elif self.offset + need > self.k.shape[1]:  # no room after the held keys: move them back
            capacity = max(self._capacity(), need)
            self.k = self._roomy(self._held(self.k), capacity)
            self.v = self._roomy(self._held(self.v), capacity)
            self.offset = 0

    def truncate(self, end: int) -> None:
        """Forget the positions from `end` on (rejected draft tokens). A sliding layer takes back
        the window before `end`, which must still be in its buffer (`make_room` before the
        positions were reserved). Buffer index i holds position start - offset + i: positions
        are appended in place, and a move copies the held ones to the front."""
        if self.window is None:
            if not 0 <= end <= self.end:
                raise ValueError(f"cannot truncate {self.end} positions to {end}")
            self.length = end
            return
        base = self.start - self.offset  # the position at buffer index 0
        start = max(0, end - self.window)
        if start < base or end > self.end:
            raise ValueError(f"positions {start}..{end} are no longer in the buffer")
        self.offset, self.start, self.length = start - base, start, end - start

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

    def make_room(self, T: int) -> None:
        for layer in self.layers:
            layer.make_room(T)

    def truncate(self, num_tokens: int) -> None:
        """Back to the first `num_tokens` positions (at most the positions made room for and
        reserved since `make_room`)."""
        for layer in self.layers:
            layer.truncate(num_tokens)
        self.num_tokens = num_tokens

    def load_prefix(self, layers: list[list[tuple[torch.Tensor, torch.Tensor]]],
                    num_tokens: int) -> None:
        """Start this (empty) cache from a reused prefix of `num_tokens` positions: per layer,
        the parts `LayerKVCache.load` takes. The keys and values are copied in, so the prefix's
        owner may keep or drop its own."""
        if self.num_tokens:
            raise ValueError("a prefix is loaded into an empty cache only")
        for layer, parts in zip(self.layers, layers, strict=True):
            layer.load(parts, num_tokens)
        self.num_tokens = num_tokens

    def __repr__(self) -> str:
        return f"KVCache(num_tokens={self.num_tokens}, layers={len(self.layers)}, bytes={self.nbytes()})"
