"""Prefix caching: the keys and values of token blocks that earlier requests computed, kept so
that a request starting with the same tokens (a system prompt, the earlier turns of a
conversation, the same document) does not compute them again.

A block is `block_size` tokens. Its key hashes its parent's key with its own token ids, so a key
names the whole prefix up to the block's end; the chain's root hashes the namespace (the
tenant, so one tenant can never hit, or time, another's prompts) and the LoRA adapter. A block
holds, per layer, the keys and values of its own positions: always for a full-attention layer;
for a sliding-window layer only where the layer still held them when the block was captured
(the last `window` positions of a step). A hit at position P needs every block before P and, for
the sliding layers, the blocks of the window before P.

Blocks are evicted when the KV budget needs their room (`KVBlockManager`): the least recently
used of those no other cached block continues (a block's descendants are of no use without it).
A hit copies the blocks into the sequence's own cache, so a cached block is never in use and
always evictable.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field

import torch

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values (Hkv, T, D) of one layer


@dataclass
class CachedBlock:
    key: bytes
    parent: bytes | None  # the key of the block before (None: the first block)
    layers: list[KV | None]  # None: a sliding layer that no longer held these positions
    nbytes: int
    last_used: int = 0
    num_children: int = 0  # cached blocks that continue this one

    @property
    def is_complete(self) -> bool:
        return all(kv is not None for kv in self.layers)


@dataclass(frozen=True)
class PrefixHit:
    """What a sequence starts from: its first `num_tokens` positions, per layer the parts
    `KVCache.load_prefix` takes."""

    num_tokens: int
    key: bytes  # the key of the last block used (where the sequence's own blocks chain on)
    layers: list[list[KV]] = field(repr=False)


def kv_nbytes(layers: list[KV | None]) -> int:
    """Bytes of the keys and values given (None: a layer without them)."""
    return sum(t.numel() * t.element_size() for kv in layers if kv is not None for t in kv)


class PrefixCache:
    """Blocks by key; budgeting is the KV manager's."""

    def __init__(self, block_size: int, windows: list[int | None]) -> None:
        self.block_size = block_size
        self.windows = windows  # per layer: the sliding window, None for full attention
        self._blocks: dict[bytes, CachedBlock] = {}
        self._leaves: list[tuple[int, bytes]] = []  # (last_used, key): eviction candidates
        self.clock = 0  # ticks at each use of a block
        self.nbytes = 0
        self.num_queried_tokens = 0  # prompt tokens looked up
        self.num_hit_tokens = 0  # of which were found

    def __len__(self) -> int:
        return len(self._blocks)

    @staticmethod
    def root(namespace: str) -> bytes:
        """The key before a sequence's first block."""
        return hashlib.blake2b(namespace.encode(), digest_size=16).digest()

    @staticmethod
    def next_key(key: bytes, block_ids: list[int]) -> bytes:
        """The key of the block of `block_ids` that follows the block (or root) `key`."""
        data = b"".join(t.to_bytes(4, "little") for t in block_ids)
        return hashlib.blake2b(key + data, digest_size=16).digest()

    def block_keys(self, token_ids: list[int], namespace: str, num_blocks: int) -> list[bytes]:
        """The chain keys of the first `num_blocks` blocks of token_ids."""
        key, keys, B = self.root(namespace), [], self.block_size
        for i in range(num_blocks):
            key = self.next_key(key, token_ids[i * B:(i + 1) * B])
            keys.append(key)
        return keys

    def match(self, token_ids: list[int], namespace: str, align: int, limit: int) -> PrefixHit | None:
        """The longest cached prefix of token_ids whose length is a multiple of `align` and at
        most `limit`, with every layer's keys it needs; None if there is none. The blocks used
        become the most recently used."""
        self.num_queried_tokens += len(token_ids)
        B = self.block_size
        found: list[CachedBlock] = []
        for key in self.block_keys(token_ids, namespace, limit // B):
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
        for j in range(len(found), 0, -1):
            end = j * B
            if end % align == 0 and self._window_held(found, j):
                used = found[:j]
                for block in used:
                    self._touch(block)
                self.num_hit_tokens += end
                return PrefixHit(end, used[-1].key, self._parts(used, end))
        return None

    def _window_held(self, blocks: list[CachedBlock], j: int) -> bool:
        """Do the blocks before block j hold every sliding layer's window before j's end?"""
        end = j * self.block_size
        for i, w in enumerate(self.windows):
            if w is None:
                continue
            first = max(0, end - w) // self.block_size
            if any(b.layers[i] is None for b in blocks[first:j]):
                return False
        return True

    def _parts(self, blocks: list[CachedBlock], end: int) -> list[list[KV]]:
        out = []
        for i, w in enumerate(self.windows):
            first = 0 if w is None else max(0, end - w) // self.block_size
            out.append([b.layers[i] for b in blocks[first:]])
        return out

    def insert(self, key: bytes, parent: bytes | None, layers: list[KV | None]) -> bool:
        """Keep a block (its tensors copied, so the sequence's cache stays its own); where the
        key is cached already, fill in sliding layers it lacked. False, and nothing kept, where
        the parent block is no longer cached (the block could never be reached)."""
        if parent is not None and parent not in self._blocks:
            return False
        block = self._blocks.get(key)
        if block is not None:
            added = 0
            for i, kv in enumerate(layers):
                if block.layers[i] is None and kv is not None:
                    block.layers[i] = (kv[0].clone(), kv[1].clone())
                    added += kv_nbytes([kv])
            block.nbytes += added
            self.nbytes += added
            self._touch(block)
            return True
        copied = [None if kv is None else (kv[0].clone(), kv[1].clone()) for kv in layers]
        block = CachedBlock(key, parent, copied, kv_nbytes(copied))
        self._blocks[key] = block
        self.nbytes += block.nbytes
        if parent is not None:
            self._blocks[parent].num_children += 1
        self._touch(block)
        return True

    def is_complete(self, key: bytes) -> bool:
        """Is the block cached with every layer's keys?"""
        block = self._blocks.get(key)
        return block is not None and block.is_complete

    def evict_one(self, used_before: int | None = None) -> int:
        """Drop the least recently used block that no cached block continues, if it was last
        used before tick `used_before` (None: whenever); returns the bytes freed (0: none)."""
        while self._leaves:
            used, key = self._leaves[0]
            block = self._blocks.get(key)
            if block is None or block.num_children or block.last_used != used:
                heapq.heappop(self._leaves)  # stale: the block was used again, continued or evicted
                continue
            if used_before is not None and used >= used_before:
                return 0
            heapq.heappop(self._leaves)
            del self._blocks[key]
            self.nbytes -= block.nbytes
            parent = self._blocks.get(block.parent) if block.parent is not None else None
            if parent is not None:
                parent.num_children -= 1
                if not parent.num_children:
                    heapq.heappush(self._leaves, (parent.last_used, parent.key))
            return block.nbytes
        return 0

    def _touch(self, block: CachedBlock) -> None:
        self.clock += 1
        block.last_used = self.clock
        if not block.num_children:
            heapq.heappush(self._leaves, (block.last_used, block.key))
        if len(self._leaves) > 4 * len(self._blocks) + 64:  # drop stale entries
            self._leaves = [(b.last_used, k) for k, b in self._blocks.items()
                            if not b.num_children]
            heapq.heapify(self._leaves)

