"""`AsyncEngine`: runs `LLMEngine.step()` in a background thread and streams outputs to asyncio."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from inhouse.config import ModelConfig
from inhouse.engine.engine import LLMEngine
from inhouse.engine.protocol import EngineClient
from inhouse.engine.request import RequestOutput
from inhouse.engine.sampling import SamplingParams

log = logging.getLogger("inhouse.engine")


class AsyncEngine(EngineClient):
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Condition()
        self._commands: list[tuple] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._finished_at: deque[float] = deque(maxlen=512)  # when requests finished (monotonic)
        self._thread = threading.Thread(target=self._loop, name="inhouse-engine", daemon=True)
        self._thread.start()

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model.config

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self._send(("add", request_id, prompt_ids, params, loop, queue, accepted))
        await accepted  # raises InvalidRequest / QueueFull from the engine thread
        finished = False
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    finished = True
                    return
                # NOTE: a suspension point per output. `queue.get()` on a non-empty queue does
                # not suspend, and a task that never suspends never sees a cancel (Ctrl-C in the
                # chat, a client gone): with the engine ahead of a slow consumer (a slow
                # terminal) the answer streamed on to max_tokens.
                await asyncio.sleep(0)
        finally:
            if not finished:
                self._send(("abort", request_id))

    def stats(self):
        # ints read without the lock: a snapshot for metrics and Retry-After
        return dataclasses.replace(self.engine.stats(), finished_per_s=self._drain_rate())

    def _drain_rate(self, window_s: float = 120.0) -> float:
        now = time.monotonic()
        recent = [t for t in list(self._finished_at) if now - t < window_s]
        if len(recent) < 2:
            return 0.0
        return len(recent) / max(now - recent[0], 1.0)

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def is_running(self) -> bool:
        """Is the step loop alive (a replica's health check)?"""
        return self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # ---- engine thread -------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        with self._lock:
            self._commands.append(command)
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._commands and not self.engine.has_unfinished() and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return
                commands, self._commands = self._commands, []
            for cmd in commands:
                self._apply(cmd)
            if self.engine.has_unfinished():
                try:
                    outs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - the thread must live on; fail the requests
                    log.exception("engine step failed outside the model run")
                    outs = self.engine.fail_all(f"{type(e).__name__}: {e}")
                for out in outs:
                    self._deliver(out)

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params, loop, queue, accepted = cmd
            try:
                self.engine.add_request(rid, prompt, params)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_set_exception, accepted, e)
                return
            self._streams[rid] = (loop, queue)
            loop.call_soon_threadsafe(_set_result, accepted)
        elif cmd[0] == "abort":
            out = self.engine.abort_request(cmd[1])
            if out is not None:
                self._deliver(out)
                log.info("request %s aborted after %d tokens", out.request_id, out.num_output_tokens)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is None:
            return
        loop, queue = target
        if out.finished:
            del self._streams[out.request_id]
            self._finished_at.append(time.monotonic())
        try:
            loop.call_soon_threadsafe(queue.put_nowait, out)
        except RuntimeError:  # the caller's loop is closed: nothing to deliver to
            pass


def _set_result(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future, e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
