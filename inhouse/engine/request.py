"""A request's life in the engine, and what the engine reports back for it."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field

import torch

from inhouse.engine.constraint import GrammarMatcher
from inhouse.engine.draft import Drafter
from inhouse.engine.prefix_cache import PrefixHit
from inhouse.engine.sampling import SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Engine-side state of one request. `num_computed` tokens of `token_ids` are in the cache."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    reserve_tokens: int  # KV reserved at admission: prompt + max_tokens, capped by the context
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    cache: object | None = None  # the model's KVCache, created when the sequence first runs
    generator: torch.Generator | None = None
    matcher: GrammarMatcher | None = None  # the grammar's state for this sequence
    prefix: PrefixHit | None = None  # cached keys and values to start from (until loaded)
    num_cached: int = 0  # prompt tokens reused from the prefix cache
    num_captured: int = 0  # tokens whose blocks were offered to the prefix cache
    chain_key: bytes = b""  # the prefix cache key of the last block offered (or the root)
    is_capturing: bool = True  # False once a block of its chain could not be kept
    cache_tick: int = 0  # the prefix cache's clock at admission: it evicts only older blocks
    drafter: Drafter | None = None  # speculative decoding's guesser (None: no drafts)
    draft_size: int = 1  # tokens to draft next: grows while whole drafts are kept
    draft_misses: int = 0  # drafts in a row of which no token was kept
    draft_wait: int = 0  # steps to decode without a draft (backing off after misses)
    arrived_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # when the scheduler first ran it

    @property
    def queue_wait_s(self) -> float:
        return (self.admitted_at if self.admitted_at is not None else time.monotonic()) - self.arrived_at

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def cache_namespace(self) -> str:
        """What a prefix must share besides its tokens: the salt (tenant) and the adapter, in an
        encoding where no salt and adapter can pass for another pair."""
        return json.dumps([self.params.cache_salt, self.params.adapter])

    @property
    def num_pending(self) -> int:
        """Tokens not yet fed to the model (the prompt's rest, or the last sampled token)."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def __repr__(self) -> str:  # ids and sizes only, never token content
        return (f"Sequence(id={self.request_id}, prompt={len(self.prompt_ids)}, "
                f"out={len(self.output_ids)}, computed={self.num_computed}, {self.status.value})")


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request (token ids only; no text here)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprob, ...]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    seed: int
    error: str | None = None
    queue_wait_s: float = 0.0  # time between arrival and admission
    num_cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
