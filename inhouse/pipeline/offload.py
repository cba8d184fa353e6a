"""CPU-heavy steps of a turn off the server's process when their input is large.

harmony's tokenizer is Rust that holds the GIL for the whole call (1.1 s for 7 MB of text), and
the PII scans are regexes that hold it for each long search: in a worker thread they stop the
event loop (and /health) as surely as on the loop. Inputs above `threshold_chars` therefore run
in a worker process (spawned once, on the first large input; it imports harmony and the PII
detector, not torch); small ones in a thread, where each call is shorter than a scheduling tick.
A worker that dies fails only the request it was working for.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from inhouse.harmony import ChatMessage, ConversationError, PromptOptions, render_prompt


class Offload:
    def __init__(self, threshold_chars: int = 256_000, workers: int = 1) -> None:
        self.threshold_chars, self.workers = threshold_chars, workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    async def run(self, size: int, fn, *args):
        """fn(*args) in a thread, or in the worker process when `size` (characters) is large;
        fn and args must pickle, and fn's module must not import torch."""
        if size < self.threshold_chars:
            return await asyncio.to_thread(fn, *args)
        pool = self._get_pool()
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool:
            self._drop(pool)
            raise ConversationError("the request could not be prepared (its worker process "
                                    "stopped)") from None

    async def render(self, messages: list[ChatMessage], options: PromptOptions) -> list[int]:
        """A `Renderer` for stream_chat."""
        size = sum(len(m.content) + len(m.reasoning or "")
                   + sum(len(c.arguments) for c in m.tool_calls) for m in messages)
        return await self.run(size, render_prompt, messages, options)

    def _get_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers,
                                                 mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
