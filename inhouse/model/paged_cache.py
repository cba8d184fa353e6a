"""KV cache in pages, for the cuda backend (its attention reads keys through a block table).

Two pools of pages, one for the full-attention layers and one for the sliding ones: a page id
names the same slot in every layer of its group, so a sequence has one block table per group
(logical page j -> the page holding its positions j*P..j*P+P-1). Full layers keep every page;
sliding layers give back the pages wholly behind the window of the next query, so their memory
stays bounded. Pages are allocated as a sequence reaches them and returned when it is truncated
(rejected drafts) or dropped: a finished request's pages are free again at once.

`PagedKVCache` has KVCache's interface where the engine uses it (`num_tokens`, `make_room`,
`truncate`, `load_prefix`, `layers[i].positions`, `nbytes`); the attention writes and reads go
through `PagedBatch`, the device-side tables of one forward, built once for all layers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from inhouse.config import ModelConfig
from inhouse.errors import InhouseError
from inhouse.kernels.backend import PAGE_SIZE


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PagePool:
    """k/v (num_layers, num_pages, Hkv, page_size, D) of one group of layers; a stack of free ids."""

    def __init__(self, num_layers: int, num_pages: int, num_kv_heads: int, page_size: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self.free = list(range(num_pages - 1, -1, -1))
        self.page_bytes = 2 * num_layers * num_kv_heads * page_size * head_dim * dtype.itemsize

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    def allocate(self) -> int:
        if not self.free:
            raise InhouseError(f"the KV page pool is full ({self.num_pages} pages)")
        return self.free.pop()

    def release(self, page: int) -> None:
        self.free.append(page)


class PagedPools:
    """The two pools of a model and where each layer's keys live in them."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 full_pages: int, sliding_pages: int, page_size: int) -> None:
        L = config.num_hidden_layers
        self.windows = [config.window(i) for i in range(L)]
        full = [i for i in range(L) if self.windows[i] is None]
        sliding = [i for i in range(L) if self.windows[i] is not None]
        self.window = max((w for w in self.windows if w is not None), default=None)
        self.page_size = page_size
        args = (config.num_key_value_heads, page_size, config.head_dim, dtype, device)
        self.full = PagePool(len(full), full_pages if full else 0, *args)
        self.sliding = PagePool(len(sliding), sliding_pages if sliding else 0, *args)
        # layer -> (is sliding, index in its pool)
        self.where = {i: (False, full.index(i)) if i in full else (True, sliding.index(i))
                      for i in range(L)}

    @classmethod
    def sized(cls, config: ModelConfig, dtype: torch.dtype, device: torch.device,
              budget_bytes: int, max_num_seqs: int, max_chunk: int,
              page_size: int = PAGE_SIZE) -> "PagedPools":
        """Full layers' pages from the KV budget (their tokens are what the engine's budget
        counts); sliding layers' pages for every running sequence's window plus a prefill chunk."""
        per_token = 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize
        num_full = sum(1 for i in range(config.num_hidden_layers) if not config.is_sliding(i))
        full = max(1, budget_bytes // max(1, per_token * page_size * num_full))
        sliding = max_num_seqs * (ceil_div(config.sliding_window + max_chunk, page_size) + 2)
        return cls(config, dtype, device, full, sliding, page_size)


class PagedLayer:
    """Layer i of a PagedKVCache, as the prefix cache reads it."""

    def __init__(self, cache: "PagedKVCache", layer: int) -> None:
        self.cache, self.layer = cache, layer
        self.window = cache.pools.windows[layer]

    def positions(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Copies of the keys and values (Hkv, end - start, D) of positions [start, end), or None
        where this layer gave back some of them (behind a sliding window)."""
        c = self.cache
        if not 0 <= start <= end <= c.num_tokens:
            return None
        sliding, index = c.pools.where[self.layer]
        pool, table = (c.pools.sliding, c.sliding) if sliding else (c.pools.full, c.full)
        P = pool.page_size
        pages = table[start // P:ceil_div(end, P)]
        if any(p < 0 for p in pages):
            return None
        ids = torch.tensor(pages, device=pool.k.device)
        k = pool.k[index][ids].transpose(0, 1).flatten(1, 2)  # (Hkv, pages*P, D)
        v = pool.v[index][ids].transpose(0, 1).flatten(1, 2)
        a = start - (start // P) * P
        return k[:, a:a + end - start].clone(), v[:, a:a + end - start].clone()


class PagedKVCache:
    """One sequence's pages. `full`, `sliding`: its block tables (-1: given back). `serial`:
    unique for the process's life (an id() may come back after a cache is dropped)."""

    _serials = itertools.count()

    def __init__(self, pools: PagedPools) -> None:
        self.pools = pools
        self.serial = next(self._serials)
        self.version = 0  # bumped whenever a table gains or loses a page
        self.num_tokens = 0
        self.full: list[int] = []
        self.sliding: list[int] = []

    @property
    def layers(self) -> list[PagedLayer]:
        """Made on demand: a list held here would be a cycle, and a dropped cache must give its
        pages back at once (reference counting), not at the next garbage collection."""
        return [PagedLayer(self, i) for i in range(len(self.pools.windows))]

    def ensure(self, end: int) -> None:
        """Pages for every position before `end`, after the sliding layers' pages wholly behind
        the window of the next query (position num_tokens) are given back: first, so that a
        sliding layer never holds more than its window and one chunk (what the pool is sized
        for) while a long prompt is prefilled chunk after chunk."""
        self._release_behind()
        need = ceil_div(end, self.pools.page_size)
        for table, pool in ((self.full, self.pools.full), (self.sliding, self.pools.sliding)):
            if pool.num_pages:
                while len(table) < need:
                    table.append(pool.allocate())
                    self.version += 1

    def _release_behind(self) -> None:
        if self.pools.window is None:
            return
        first_seen = self.num_tokens - self.pools.window + 1  # the next query's oldest key
        for j in range(min(len(self.sliding), max(0, first_seen) // self.pools.page_size)):
            if self.sliding[j] >= 0:
                self.pools.sliding.release(self.sliding[j])
                self.sliding[j] = -1

    def make_room(self, T: int) -> None:
        self.ensure(self.num_tokens + T)

    def truncate(self, num_tokens: int) -> None:
        """Back to the first `num_tokens` positions (not behind the committed ones: a sliding
        layer has given those back)."""
        if not 0 <= num_tokens <= len(self.full or self.sliding) * self.pools.page_size:
            raise ValueError(f"cannot truncate {self.num_tokens} positions to {num_tokens}")
        keep = ceil_div(num_tokens, self.pools.page_size)
        for table, pool in ((self.full, self.pools.full), (self.sliding, self.pools.sliding)):
            for page in table[keep:]:
                if page >= 0:
                    pool.release(page)
            if len(table) > keep:
                del table[keep:]
                self.version += 1
        self.num_tokens = num_tokens

    def load_prefix(self, layers: list[list[tuple[torch.Tensor, torch.Tensor]]],
                    num_tokens: int) -> None:
        """Start this (empty) cache from a reused prefix (KVCache.load_prefix's parts: per layer,
        (Hkv, T_i, D) pieces ending at position num_tokens; a sliding layer's may start later)."""
        if self.num_tokens:
            raise ValueError("a prefix is loaded into an empty cache only")
        self.ensure(num_tokens)
        for i, parts in enumerate(layers):
            k = torch.cat([k for k, _ in parts], dim=1)
            v = torch.cat([v for _, v in parts], dim=1)
            positions = torch.arange(num_tokens - k.shape[1], num_tokens)
            pool, index, pages, slots = self._addresses(i, positions)
            pool.k[index][pages, :, slots] = k.transpose(0, 1).to(pool.k.dtype)
            pool.v[index][pages, :, slots] = v.transpose(0, 1).to(pool.v.dtype)
        self.num_tokens = num_tokens
        self._release_behind()

    def _addresses(self, layer: int, positions: torch.Tensor):
        sliding, index = self.pools.where[layer]
        pool, table = (self.pools.sliding, self.sliding) if sliding else (self.pools.full, self.full)
        P = pool.page_size
        pages = torch.tensor(table, dtype=torch.long)[positions // P].to(pool.k.device)
        return pool, index, pages, (positions % P).to(pool.k.device)

    def nbytes(self) -> int:
        held = sum(1 for p in self.full if p >= 0), sum(1 for p in self.sliding if p >= 0)
        return held[0] * self.pools.full.page_bytes + held[1] * self.pools.sliding.page_bytes

    def free(self) -> None:
        """Give every page back (also done when the cache is dropped)."""
        self.truncate(0)

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to give back to
            pass

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_tokens={self.num_tokens}, pages={len(self.full)}+"
                f"{sum(1 for p in self.sliding if p >= 0)}, bytes={self.nbytes()})")


def block_tables(caches: list[PagedKVCache], rows: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full and sliding block tables of `caches`, one row each, as int32 (rows, width) on the
    host: entries given back (-1) and rows or columns past the caches are 0, a page that exists
    and is never read there (the kernel reads no position past num_k or behind a window)."""
    tables = torch.zeros(2, rows, width, dtype=torch.int32)
    for i, cache in enumerate(caches):
        for t, table in enumerate((cache.full, cache.sliding)):
            if table:
                tables[t, i, :len(table)] = torch.tensor(table, dtype=torch.int32).clamp(min=0)
    return tables[0], tables[1]


@dataclass(frozen=True)
class PagedBatch:
    """The device-side numbers of one forward over paged caches, shared by every layer:
    per segment its rows (q_row0, num_q), first query position (q_start), keys (num_k: positions
    0..num_k-1) and block tables (full, sliding: (segments, max pages), 0-padded, never read
    past num_k or behind a window); per row the page and slot its new key goes to."""

    pools: PagedPools
    full: torch.Tensor
    sliding: torch.Tensor
    q_row0: torch.Tensor
    num_q: torch.Tensor
    q_start: torch.Tensor
    num_k: torch.Tensor
    write_full: torch.Tensor
    write_sliding: torch.Tensor
    write_slot: torch.Tensor
    max_q: int

    @classmethod
    def build(cls, segments: list, device: torch.device) -> "PagedBatch":
        """segments: transformer.Segment with PagedKVCache caches (pages are allocated here)."""
        pools = segments[0].cache.pools
        P = pools.page_size
        for seg in segments:
            seg.cache.ensure(seg.start + seg.num_tokens)
        width = max(1, max(len(s.cache.full or s.cache.sliding) for s in segments))
        full, sliding = block_tables([s.cache for s in segments], len(segments), width)
        positions = torch.cat([torch.arange(s.start, s.start + s.num_tokens) for s in segments])
        owner = torch.cat([torch.full((s.num_tokens,), i) for i, s in enumerate(segments)])
        i32 = dict(dtype=torch.int32)
        numbers = torch.tensor([[s.row0 for s in segments], [s.num_tokens for s in segments],
                                [s.start for s in segments],
                                [s.start + s.num_tokens for s in segments]], **i32)  # (4, S)
        # one copy to the device for all of it
        host = [full, sliding, numbers, full[owner, positions // P].long(),
                sliding[owner, positions // P].long(), (positions % P).long()]
        dev = [t.to(device, non_blocking=True) for t in host]
        # NOTE: the kernel reads these per segment as contiguous int32 rows
        return cls(pools, dev[0], dev[1], *dev[2], dev[3], dev[4], dev[5],
                   max(s.num_tokens for s in segments))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k pages, v pages, block table, each new row's page) of layer `layer`."""
        sliding, index = self.pools.where[layer]
        if sliding:
            pool, table, write = self.pools.sliding, self.sliding, self.write_sliding
        else:
            pool, table, write = self.pools.full, self.full, self.write_full
        return pool.k[index], pool.v[index], table, write
