"""`RayEngineClient`: the engine replicas as one `EngineClient` for the API process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator

from inhouse.config import ModelConfig
from inhouse.engine.engine import EngineStats
from inhouse.engine.protocol import EngineClient
from inhouse.engine.request import RequestOutput
from inhouse.engine.sampling import SamplingParams

log = logging.getLogger("inhouse.scaleout")

STATS_EVERY_S = 2.0
STATS_KEPT_S = 15.0  # a replica not heard from for this long is taken as gone from the sums
LOST_RETRIES = 3  # a request whose replica died before its first token runs again elsewhere
LOST_BACKOFF_S = 0.25


class _LostUnseen(Exception):
    """The replica was lost before the request yielded anything."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


class RayEngineClient(EngineClient):
    """Streams each request from whichever replica Serve picks. A replica that dies before a
    request's first token costs it nothing: it runs again on another replica (up to
    LOST_RETRIES times). One that dies after ends that request with finish_reason "error" (the
    governed turn records it and the client sees a server error); the other requests go on."""

    def __init__(self, handle, model_config: ModelConfig, on_shutdown=None) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._config = model_config
        self._on_shutdown = on_shutdown
        self._replicas: dict[int, tuple[float, object]] = {}  # pid -> (seen at, ReplicaStats)
        self._live: dict[str, object] = {}  # request id -> its stream, for abort()
        self._aborted: set[str] = set()
        self._stopped = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="inhouse-replica-stats",
                                        daemon=True)
        self._poller.start()

    @property
    def model_config(self) -> ModelConfig:
        return self._config

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        for attempt in range(LOST_RETRIES + 1):
            try:
                async for out in self._attempt(request_id, prompt_ids, params):
                    yield out
                return
            except _LostUnseen as e:
                lost = e.cause
            # nothing of the request reached the caller: another replica runs it from the start
            # and gives the same bits (batch-invariant)
            log.warning("request %s: engine replica lost before its first output (%s); "
                        "retry %d on another replica", request_id, type(lost).__name__,
                        attempt + 1)
            await asyncio.sleep(LOST_BACKOFF_S * 2 ** attempt)  # Serve drops the dead one
        yield self._ended(request_id, prompt_ids, params, 0, "error",
                          f"the engine replicas serving it stopped ({type(lost).__name__}); "
                          f"tried {LOST_RETRIES + 1} times")

    async def _attempt(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """One try on one replica. A replica lost before any output raises _LostUnseen (the
        caller may retry); lost later, the request ends in error."""
        from ray.exceptions import RayTaskError

        gen = self._stream.generate.remote(request_id, list(prompt_ids), params)
        self._live[request_id] = gen
        finished, sent, yielded = False, 0, False
        try:
            while True:
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as e:  # noqa: BLE001 - aborted, refused, or the replica lost
                    finished = True
                    if request_id in self._aborted:  # abort() cancelled it, as asked
                        yield self._ended(request_id, prompt_ids, params, sent, "abort")
                    elif isinstance(e, RayTaskError) and not yielded \
                            and isinstance(e.cause, Exception):
                        raise e.cause from None  # raised in the replica: InvalidRequest, ...
                    elif not yielded:  # the caller has seen nothing of it: it may run again
                        raise _LostUnseen(e) from e
                    else:
                        log.warning("request %s: engine replica lost after %d tokens (%s)",
                                    request_id, sent, type(e).__name__)
                        yield self._ended(request_id, prompt_ids, params, sent, "error",
                                          f"the engine replica serving it stopped "
                                          f"({type(e).__name__})")
                    return
                sent += len(out.new_token_ids)
                yielded = True
                yield out
                if out.finished:
                    finished = True
                    return
            if not finished:
                yield self._ended(request_id, prompt_ids, params, sent, "error",
                                  "the engine replica ended the stream early")
                finished = True
        finally:
            self._live.pop(request_id, None)
            self._aborted.discard(request_id)
            if not finished:
                gen.cancel()  # the replica's generator is cancelled: it aborts the request

    @staticmethod
    def _ended(request_id: str, prompt_ids: list[int], params: SamplingParams, sent: int,
               reason: str, error: str | None = None) -> RequestOutput:
        """The last output of a request the replica did not finish itself."""
        return RequestOutput(request_id, (), (), True, reason, len(prompt_ids), sent,
                             params.seed if params.seed is not None else 0, error=error)

    async def abort(self, request_id: str) -> None:
        """Cancel the request's stream (its replica aborts it); its iteration ends with
        finish_reason "abort", as the in-process engine's does. A stop string needs this."""
        gen = self._live.get(request_id)
        if gen is not None:
            self._aborted.add(request_id)
            gen.cancel()

    # ---- stats: the replicas' sums, polled from every replica (Ray >= 2.5x broadcasts; before,
    # whichever replica Serve picks, which reaches them all over a few polls) -------------------
    def _poll(self) -> None:
        while not self._stopped.wait(STATS_EVERY_S):
            try:
                if hasattr(self._handle, "broadcast"):
                    got = self._handle.broadcast("stats").results(timeout_s=10,
                                                                  return_exceptions=True)
                else:
                    got = [self._handle.stats.remote().result(timeout_s=10)]
            except Exception:  # noqa: BLE001 - a replica going or coming: the next poll
                continue
            now = time.monotonic()
            for r in got:
                if not isinstance(r, BaseException):
                    self._replicas[r.pid] = (now, r)

    def replicas(self) -> list:
        """The replicas heard from lately (their pid, node and stats)."""
        now = time.monotonic()
        return [r for seen, r in list(self._replicas.values()) if now - seen < STATS_KEPT_S]

    def stats(self) -> EngineStats:
        got = [r.stats for r in self.replicas()]
        summed = {f.name: sum(getattr(s, f.name) for s in got)
                  for f in dataclasses.fields(EngineStats)}
        return EngineStats(**summed | {"num_replicas": len(got)})

    def shutdown(self) -> None:
        self._stopped.set()
        if self._on_shutdown is not None:
            self._on_shutdown()
