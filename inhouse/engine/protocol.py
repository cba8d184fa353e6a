"""The engine as the server and the CLI see it: an async stream of token ids per request."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from inhouse.config import ModelConfig
from inhouse.engine.engine import EngineStats
from inhouse.engine.request import RequestOutput
from inhouse.engine.sampling import SamplingParams


class EngineClient(abc.ABC):
    """Contract:
    - `generate` yields `RequestOutput`s for one request until one has `finished=True`; the
      outputs' `new_token_ids` concatenated are the completion (stop token included).
    - Leaving the iteration early (break, exception, task cancelled, client gone) aborts the
      request and frees its KV memory.
    - `generate` raises `InvalidRequest` for a request the engine refuses and `QueueFull` when
      the waiting queue is full, before yielding anything.
    """

    @property
    @abc.abstractmethod
    def model_config(self) -> ModelConfig: ...

    @abc.abstractmethod
    def generate(self, request_id: str, prompt_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]: ...

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def shutdown(self) -> None: ...

    def stats(self) -> EngineStats:
        """Queue depth and KV use, for metrics; engines without a queue report zeros."""
        return EngineStats(0, 0, 0, 0)
