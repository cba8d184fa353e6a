"""`EngineReplica`: one engine as a Ray Serve replica (the deployment is made in deploy.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from inhouse.config import EngineConfig
from inhouse.engine.engine import EngineStats
from inhouse.engine.request import RequestOutput
from inhouse.engine.sampling import SamplingParams


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads: the same checkpoint, dtype, engine settings and adapters, so any
    replica gives the bits another would (the audit record's digest and kernel hold for all)."""

    checkpoint: str  # a directory every machine of the cluster sees at this path
    dtype: str  # torch dtype name: "bfloat16" | "float32"
    engine: EngineConfig
    adapters: tuple[tuple[str, str], ...] = ()  # (name, directory)
    mmap: bool = False


@dataclass(frozen=True)
class ReplicaStats:
    pid: int
    node: str
    stats: EngineStats


class EngineReplica:
    """Loads the model once per replica process; `generate` streams a request's outputs."""

    def __init__(self, spec: ReplicaSpec) -> None:
        import torch

        from inhouse.engine import AsyncEngine, LLMEngine
        from inhouse.harmony.grammar import GrammarBackend
        from inhouse.model import load_model
        from inhouse.model.peft_format import attach_adapter

        threads = _ray_cpus()  # torch threads: the CPUs Ray reserved for this replica
        if threads:
            torch.set_num_threads(threads)
        model = load_model(spec.checkpoint, dtype=getattr(torch, spec.dtype), mmap=spec.mmap)
        for name, directory in spec.adapters:
            attach_adapter(model, name, directory)
        self.client = AsyncEngine(LLMEngine(model, spec.engine, grammars=GrammarBackend()))
        self.node = os.uname().nodename

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        # Serve cancels this generator when the caller leaves: AsyncEngine's own `finally` then
        # aborts the request and frees its KV memory, as in one process
        async for out in self.client.generate(request_id, prompt_ids, params):
            yield out

    def stats(self) -> ReplicaStats:
        return ReplicaStats(os.getpid(), self.node, self.client.stats())

    def check_health(self) -> None:
        """Serve calls this periodically: a replica whose engine thread died is replaced."""
        if not self.client.is_running():
            raise RuntimeError("the engine thread of this replica has stopped")

    def __del__(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.shutdown()


def _ray_cpus() -> int:
    try:
        import ray

        return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    except Exception:  # noqa: BLE001 - outside Ray (tests call the class directly)
        return 0
