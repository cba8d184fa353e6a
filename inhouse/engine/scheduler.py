"""Continuous batching: which tokens of which sequences run in the next step.

Each step: every running sequence that is decoding gets its one token; sequences still prefilling
get a chunk of their prompt; then waiting sequences are admitted (first come, first served) while
the KV budget, the batch size and the step's token budget allow. So a request joins or leaves the
batch at any step, and a long prompt never stalls running decodes for more than one chunk.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from inhouse.config import EngineConfig
from inhouse.engine.kv_manager import KVBlockManager
from inhouse.engine.request import Sequence, Status
from inhouse.errors import InhouseError


class QueueFull(InhouseError):
    """The bounded waiting queue is full: try again later (HTTP 429)."""


# Draft tokens are given only while a step's decode rows stay within this many: the native
# decode step takes up to 16 rows in one call, and more rows read more distinct experts.
MAX_DECODE_ROWS = 16


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # feed token_ids[num_computed : num_computed + num_tokens], then the draft
    draft: tuple[int, ...] = ()  # guessed tokens after the pending one, verified a row each


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
        # where a reused prefix may end: there a hit computes the rest as a fresh request would
        self.prefix_align = (math.lcm(config.block_size, config.prefill_chunk)
                             if self._fixed_chunks else config.block_size)

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
        decoding = [seq for seq in self.running if not seq.is_prefilling]
        spare = MAX_DECODE_ROWS - len(decoding)  # rows left for drafts
        for seq in decoding:  # decodes first: one token each, and a draft where it may pay
            draft = self._draft(seq, min(spare, budget - len(decoding)))
            chunks.append(ScheduledChunk(seq, 1 + len(draft), draft))
            budget -= 1 + len(draft)
            spare -= len(draft)
        for seq in self.running:  # then prompts under way
            if seq.is_prefilling:
                n, budget = self._chunk(seq, budget)
                if n:
                    chunks.append(ScheduledChunk(seq, n))
        while (self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0
               and self.kv.can_allocate(self.waiting[0].reserve_tokens)):
            seq = self.waiting.popleft()
            self._match_prefix(seq)
            self.kv.allocate(seq.request_id, seq.reserve_tokens)
            seq.status = Status.RUNNING
            seq.admitted_at = time.monotonic()
            self.running.append(seq)
            n, budget = self._chunk(seq, budget)
            if n:
                chunks.append(ScheduledChunk(seq, n))
        return SchedulerOutput(tuple(chunks), len(self.waiting))

    def _draft(self, seq: Sequence, room: int) -> tuple[int, ...]:
        """Up to `seq.draft_size` guessed tokens (never past max_tokens or the context, so the
        KV reservation holds them), after a back-off when recent drafts all missed."""
        if seq.drafter is None or room <= 0:
            return ()
        if seq.draft_wait:
            seq.draft_wait -= 1
            return ()
        k = min(seq.draft_size, room,
                seq.params.max_tokens - len(seq.output_ids) - 1,
                seq.reserve_tokens - seq.num_tokens - 1)
        return tuple(seq.drafter.propose(seq.token_ids, k)) if k > 0 else ()

    def _match_prefix(self, seq: Sequence) -> None:
        """Start the sequence after the longest prefix of its prompt the cache holds (at least
        its last prompt token is computed: its logits give the first output token)."""
        prefix = self.kv.prefix
        if prefix is None:
            return
        seq.cache_tick = prefix.clock + 1  # the blocks it uses from here on are not evicted for it
        hit = prefix.match(seq.prompt_ids, seq.cache_namespace, self.prefix_align,
                           len(seq.prompt_ids) - 1)
        seq.chain_key = prefix.root(seq.cache_namespace)
        if hit is not None:
            seq.prefix, seq.chain_key = hit, hit.key
            seq.num_computed = seq.num_cached = seq.num_captured = hit.num_tokens

    def _chunk(self, seq: Sequence, budget: int) -> tuple[int, int]:
        n = min(seq.num_pending, self.config.prefill_chunk)
        if n > budget:
            if self._fixed_chunks:
                return 0, budget
            n = budget
        if self.kv.prefix is not None and not self._fixed_chunks:
            # batched mode: a chunk ends on a block boundary where it can (the prompt's last
            # few tokens then go in a chunk of their own), since only there do the sliding
            # layers still hold the window that a later hit at that boundary needs
            end = seq.num_computed + n
            if end - end % self.prefix_align > seq.num_computed:
                n = end - end % self.prefix_align - seq.num_computed
        return n, budget - n
