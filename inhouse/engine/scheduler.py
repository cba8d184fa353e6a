"""Continuous batching: which tokens of which sequences run in the next step.

Each step: every running sequence that is decoding gets its one token; sequences still prefilling
get a chunk of their prompt; then waiting sequences are admitted (first come, first served) while
the KV budget, the batch size and the step's token budget allow. So a request joins or leaves the
batch at any step, and a long prompt never stalls running decodes for more than one chunk.
"""

from __future__ import annotations

from collections import deque
import time
from dataclasses import dataclass

from inhouse.config import EngineConfig
from inhouse.engine.kv_manager import KVBlockManager
from inhouse.engine.request import Sequence, Status
from inhouse.errors import InhouseError


class QueueFull(InhouseError):
    """The bounded waiting queue is full: try again later (HTTP 429)."""


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # feed token_ids[num_computed : num_computed + num_tokens]


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    num_waiting: int

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVBlockManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # NOTE: in reproducible mode a prompt chunk always has the same size, whatever else runs;
        # a chunk that does not fit this step's budget waits a step instead of shrinking.
        self._fixed_chunks = config.mode == "reproducible"

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"the request queue is full ({self.config.max_waiting} waiting)")
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in self.running:  # decodes first: one token each
            if not seq.is_prefilling:
                chunks.append(ScheduledChunk(seq, 1))
                budget -= 1
        for seq in self.running:  # then prompts under way
            if seq.is_prefilling:
                n, budget = self._chunk(seq, budget)
                if n:
                    chunks.append(ScheduledChunk(seq, n))
        while (self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0
               and self.kv.can_allocate(self.waiting[0].reserve_tokens)):
            seq = self.waiting.popleft()
            self.kv.allocate(seq.request_id, seq.reserve_tokens)
            seq.status = Status.RUNNING
            seq.admitted_at = time.monotonic()
            self.running.append(seq)
            n, budget = self._chunk(seq, budget)
            if n:
                chunks.append(ScheduledChunk(seq, n))
        return SchedulerOutput(tuple(chunks), len(self.waiting))

    def _chunk(self, seq: Sequence, budget: int) -> tuple[int, int]:
        n = min(seq.num_pending, self.config.prefill_chunk)
        if n > budget:
            if self._fixed_chunks:
                return 0, budget
            n = budget
        return n, budget - n
