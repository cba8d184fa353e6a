"""KV memory bookkeeping in blocks: plain Python over ints, no tensors.

A sequence of n tokens holds, per full-attention layer, ceil(n / block) blocks and, per
sliding-window layer, ceil(min(n, window) / block) + 1 blocks (the window plus the block being
filled). A request reserves its worst case (prompt + max_tokens, capped by the context) when it is
admitted, so running requests never run out: when the budget is full, new ones wait instead.

The room no sequence holds keeps the prefix cache's blocks (real tensors, owned here), which give
way, least recently used first, to any sequence that needs the room.
"""

from __future__ import annotations

from dataclasses import dataclass

from inhouse.engine.prefix_cache import PrefixCache


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
    """Counts blocks per sequence against a fixed budget; the rest holds the prefix cache."""

    def __init__(self, layout: KVLayout, budget_bytes: int,
                 prefix: PrefixCache | None = None) -> None:
        self.layout = layout
        self.num_blocks = budget_bytes // layout.bytes_per_block
        self.prefix = prefix
        self._held: dict[str, int] = {}
        # kept as a sum: metrics read it from another thread, where iterating _held could fail
        self.num_held = 0

    @property
    def num_cached(self) -> int:
        """Blocks' worth of budget the prefix cache's tensors take."""
        return ceil_div(self.prefix.nbytes, self.layout.bytes_per_block) if self.prefix else 0

    @property
    def num_used(self) -> int:
        return self.num_held + self.num_cached

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used

    def fits_at_all(self, num_tokens: int) -> bool:
        return self.layout.blocks_for(num_tokens) <= self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        """Cached prefix blocks count as free: they are evicted for a sequence that needs room."""
        return self.layout.blocks_for(num_tokens) <= self.num_blocks - self.num_held

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        if seq_id in self._held:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        need = self.layout.blocks_for(num_tokens)
        self._make_room(need)
        if need > self.num_free:
            raise ValueError(f"need {need} blocks, {self.num_free} free")
        self._held[seq_id] = need
        self.num_held += need

    def room_for_cache(self, nbytes: int, used_before: int) -> bool:
        """Make room for `nbytes` more of prefix cache, evicting blocks last used before tick
        `used_before` (so that sequences running together do not evict each other's blocks as
        they capture them); False where there is no such room."""
        if self.prefix is None:
            return False
        room = (self.num_blocks - self.num_held) * self.layout.bytes_per_block
        while self.prefix.nbytes + nbytes > room:
            if not self.prefix.evict_one(used_before):
                return False
        return True

    def _make_room(self, num_blocks: int) -> None:
        while self.prefix is not None and num_blocks > self.num_free and self.prefix.evict_one():
            pass

    def free(self, seq_id: str) -> None:
        self.num_held -= self._held.pop(seq_id, 0)

    def holds(self, seq_id: str) -> bool:
        return seq_id in self._held
