"""KV memory bookkeeping in blocks: plain Python over ints, no tensors.

A sequence of n tokens holds, per full-attention layer, ceil(n / block) blocks and, per
sliding-window layer, ceil(min(n, window) / block) + 1 blocks (the window plus the block being
filled). A request reserves its worst case (prompt + max_tokens, capped by the context) when it is
admitted, so running requests never run out: when the budget is full, new ones wait instead.
"""

from __future__ import annotations

from dataclasses import dataclass


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVLayout:
    num_full_layers: int
    num_sliding_layers: int
    window: int
    block_size: int
    bytes_per_token_layer: int  # k and v of one token in one layer

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token_layer

    def blocks_for(self, num_tokens: int) -> int:
        full = ceil_div(num_tokens, self.block_size) * self.num_full_layers
        sliding_tokens = min(num_tokens, self.window)
        sliding = (ceil_div(sliding_tokens, self.block_size) + (1 if num_tokens > self.window else 0)
                   ) * self.num_sliding_layers
        return full + sliding


class KVBlockManager:
    """Counts blocks per sequence against a fixed budget."""

    def __init__(self, layout: KVLayout, budget_bytes: int) -> None:
        self.layout = layout
        self.num_blocks = budget_bytes // layout.bytes_per_block
        self._held: dict[str, int] = {}

    @property
    def num_used(self) -> int:
        return sum(self._held.values())

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used

    def fits_at_all(self, num_tokens: int) -> bool:
        return self.layout.blocks_for(num_tokens) <= self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        return self.layout.blocks_for(num_tokens) <= self.num_free

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        if seq_id in self._held:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        need = self.layout.blocks_for(num_tokens)
        if need > self.num_free:
            raise ValueError(f"need {need} blocks, {self.num_free} free")
        self._held[seq_id] = need

    def free(self, seq_id: str) -> None:
        self._held.pop(seq_id, None)

    def holds(self, seq_id: str) -> bool:
        return seq_id in self._held
