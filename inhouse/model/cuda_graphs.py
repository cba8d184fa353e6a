"""Decode steps replayed from CUDA graphs, one per batch-size bucket (the cuda backend, paged caches).

A decode step of the 20b model is about a thousand small kernel launches, each with its Python
around it: for one user that, not the GPU, sets the pace. A graph records the whole step (embed,
rotary, every layer, final norm, unembedding) once per bucket of batch sizes and replays it with
one launch. What a step needs from the host goes through static buffers, refilled before each
replay: the token ids and positions, and the paged caches' block tables and write addresses
(model.paged_cache). Rows past the batch (a bucket is rounded up) write into a scratch page of
their own and are dropped.

Nothing in the step waits for the host: the routing plan is built on the device (kernels/cuda),
the page tables come in the buffers, and the bucket's sizes are fixed. A step is captured at the
first use of its bucket and mode (reproducible mode runs row-wise operations row by row, so it
is a graph of its own). `capture=False` runs the same function on the same buffers without a
graph: how the CPU tests check everything but the capture itself.
"""

from __future__ import annotations

import torch

from inhouse.model.paged_cache import PagedBatch, PagedKVCache, block_tables

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket_of(rows: int) -> int | None:
    return next((b for b in BUCKETS if b >= rows), None)


class _Step:
    """One bucket's static buffers and its captured (or, without capture, eager) step."""

    def __init__(self, model, rows: int, width: int, independent: bool, capture: bool,
                 pool, scratch: tuple[int, int]) -> None:
        dev, i32 = model.device, dict(dtype=torch.int32, device=model.device)
        self.model, self.rows = model, rows
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        # until filled, every row is padding: one key at position 0, in the scratch pages (the
        # warm-up and the capture write there, never into a sequence's pages)
        self.full = torch.full((rows, width), scratch[0], **i32)
        self.sliding = torch.full((rows, width), scratch[1], **i32)
        self.numbers = torch.stack([torch.arange(rows, **i32), torch.ones(rows, **i32),
                                    torch.zeros(rows, **i32), torch.ones(rows, **i32)])
        self.numbers = self.numbers.contiguous()  # q_row0, num_q, q_start, num_k
        self.writes = torch.tensor([[scratch[0]] * rows, [scratch[1]] * rows, [0] * rows],
                                   dtype=torch.long, device=dev)  # full page, sliding page, slot
        self.groups = [slice(i, i + 1) for i in range(rows)] if independent else None
        self.out: torch.Tensor | None = None
        self.graph = None
        if capture:
            self._capture(pool)

    def body(self) -> torch.Tensor:
        """The step on the buffers -> logits (rows, V)."""
        m = self.model
        paged = PagedBatch(m.pages, self.full, self.sliding, *self.numbers, *self.writes, 1)
        cos, sin = m.rotary.cos_sin(self.positions)
        x = m.model.embed_tokens(self.ids).to(m.dtype)
        x = m._layers(x, cos, sin, [], self.groups, paged)
        return m.logits_of(x, self.groups)

    def _capture(self, pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compiles the Triton kernels) off the graph
            for _ in range(2):
                self.body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = self.body()

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.body()
        self.graph.replay()
        return self.out


class DecodeGraphs:
    """The decode steps of a model on paged caches. `run` takes a step of up to BUCKETS[-1]
    sequences with one new token each and returns its logits, or None where it does not apply
    (the caller runs the step as usual)."""

    def __init__(self, model, capture: bool = True, max_tokens: int | None = None) -> None:
        """max_tokens: the longest sequence a step will see (the block tables' width)."""
        self.model, self.capture = model, capture
        pools = model.pages
        longest = max_tokens or model.config.max_position_embeddings
        self.width = max(1, min(max(pools.full.num_pages, pools.sliding.num_pages),
                                -(-longest // pools.page_size)))
        self.max_tokens = longest
        self._tables: dict[tuple[int, bool], tuple] = {}  # what each step's tables hold now
        # padding rows write here; never read by a real row
        self.scratch = (pools.full.allocate() if pools.full.num_pages else 0,
                        pools.sliding.allocate() if pools.sliding.num_pages else 0)
        self.steps: dict[tuple[int, bool], _Step] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # why a capture failed ("TypeError: ..."), after which every step runs launch by
        # launch: a GPU stack that cannot capture a step must still serve (the engine logs it)
        self.failure: str | None = None

    def run(self, feeds: list[tuple[torch.Tensor, PagedKVCache]],
            independent: bool) -> torch.Tensor | None:
        rows = bucket_of(len(feeds))
        caches = [c for _, c in feeds]
        if (rows is None or self.failure is not None or any(ids.shape[0] != 1 for ids, _ in feeds)
                or not all(isinstance(c, PagedKVCache) for c in caches)
                or len({id(c) for c in caches}) < len(caches) or torch.is_grad_enabled()
                or any(c.num_tokens + 1 > self.max_tokens for c in caches)):
            return None
        key = (rows, independent)
        if key not in self.steps:
            try:
                self.steps[key] = _Step(self.model, rows, self.width, independent,
                                        self.capture, self.pool, self.scratch)
            except Exception as e:  # noqa: BLE001 - any capture error: run without graphs
                self.failure = f"{type(e).__name__}: {e}"
                return None
        step = self.steps[key]
        self._fill(step, key, feeds)
        logits = step.run()
        for c in caches:
            c.num_tokens += 1
        return logits[:len(feeds)]

    def _fill(self, step: _Step, key, feeds) -> None:
        """The host's part of the step. The block tables are copied only when some sequence
        got a new page or the batch changed (every page_size steps or so, not every step): a
        table entry a sliding window gave back stays as it was, never read again."""
        P = self.model.pages.page_size
        n, rows = len(feeds), step.rows
        numbers = torch.zeros(4, rows, dtype=torch.int32)
        writes = torch.zeros(3, rows, dtype=torch.long)
        ids = torch.zeros(rows, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        for _, cache in feeds:
            cache.ensure(cache.num_tokens + 1)
        held = tuple((c.serial, c.version) for _, c in feeds)
        if self._tables.get(key) != held:
            full, sliding = block_tables([c for _, c in feeds], rows, self.width)
            full[n:, 0], sliding[n:, 0] = self.scratch  # padding rows: the scratch pages
            step.full.copy_(full, non_blocking=True)
            step.sliding.copy_(sliding, non_blocking=True)
            self._tables[key] = held
        for i, (token, cache) in enumerate(feeds):
            at = cache.num_tokens
            numbers[:, i] = torch.tensor([i, 1, at, at + 1])
            page = at // P
            writes[:, i] = torch.tensor([_entry(cache.full, page), _entry(cache.sliding, page),
                                         at % P])
            ids[i], positions[i] = token[0], at
        for i in range(n, rows):  # padding: one key at position 0, in the scratch pages
            numbers[:, i] = torch.tensor([i, 1, 0, 1])
            writes[:, i] = torch.tensor([self.scratch[0], self.scratch[1], 0])
        for dst, src in ((step.numbers, numbers), (step.writes, writes), (step.ids, ids),
                         (step.positions, positions)):
            dst.copy_(src, non_blocking=True)


def _entry(table: list[int], page: int) -> int:
    return max(table[page], 0) if table else 0


def graphs_for(model, max_tokens: int | None = None) -> DecodeGraphs | None:
    """A model's DecodeGraphs where they apply: on a CUDA device, the cuda backend, pages."""
    if model.backend != "cuda" or model.pages is None or model.device.type != "cuda":
        return None
    return DecodeGraphs(model, max_tokens=max_tokens)
