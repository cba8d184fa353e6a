"""Generation engine: token ids in, token ids out. No harmony, no HTTP.

    engine = LLMEngine(model, EngineConfig())            # synchronous core: add_request, step
    client = AsyncEngine(engine)                         # EngineClient: async streams, abort
    async for out in client.generate("r1", ids, SamplingParams(seed=7)): ...
"""

from inhouse.engine.async_engine import AsyncEngine
from inhouse.engine.engine import EngineStats, LLMEngine
from inhouse.engine.protocol import EngineClient
from inhouse.engine.request import RequestOutput
from inhouse.engine.sampling import (InvalidRequest, SamplingParams, TokenLogprob,
                                     check_prompt_length)
from inhouse.engine.scheduler import QueueFull

__all__ = ["AsyncEngine", "EngineClient", "EngineStats", "InvalidRequest", "LLMEngine",
           "QueueFull", "RequestOutput", "SamplingParams", "TokenLogprob", "check_prompt_length"]
