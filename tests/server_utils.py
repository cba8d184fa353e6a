"""A real uvicorn server on 127.0.0.1 (a free port), and a scripted engine for exact sequences."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator

import uvicorn

from inhouse.config import ModelConfig, preset
from inhouse.engine import EngineClient, QueueFull, RequestOutput, SamplingParams
from inhouse.engine.engine import EngineStats
from inhouse.harmony import load_encoding
from inhouse.server import UVICORN_IMPL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, port: int, timeout_s: float) -> None:
    """Wait for a server process on 127.0.0.1:port to answer /ready; RuntimeError if it exits
    first or is not up in time (then it is killed)."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start in {timeout_s:.0f} s")


@contextlib.contextmanager
def running_server(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", **UVICORN_IMPL))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def harmony_ids(text: str) -> list[int]:
    return load_encoding().encode(text, allowed_special="all")


class ScriptedEngine(EngineClient):
    """Replays scripted completions (harmony text with special tokens), one per request, in order;
    records each prompt it was given. `queue_full=True` refuses everything with QueueFull."""

    def __init__(self, *scripts: str, config: ModelConfig | None = None, delay: float = 0.0,
                 queue_full: bool = False) -> None:
        self.scripts = [harmony_ids(s) for s in scripts]
        self.prompts: list[list[int]] = []
        self.params: list[SamplingParams] = []
        self.aborted: set[str] = set()
        self.delay = delay
        self.queue_full = queue_full
        self._config = config or preset("tiny")
        self._next = 0

    @property
    def model_config(self) -> ModelConfig:
        return self._config

    def prompt_text(self, i: int = -1) -> str:
        return load_encoding().decode(self.prompts[i])

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self.queue_full:
            raise QueueFull("the request queue is full (scripted)")
        self.prompts.append(list(prompt_ids))
        self.params.append(params)
        script = self.scripts[self._next % len(self.scripts)] if self.scripts else []
        self._next += 1
        out: list[int] = []
        finished = False
        try:  # the EngineClient contract: leaving the iteration early aborts the request
            for token in script[:params.max_tokens]:
                if request_id in self.aborted:
                    break
                out.append(token)
                last = token in params.stop_token_ids or len(out) == params.max_tokens or \
                    len(out) == len(script)
                reason = None
                if last:
                    reason = "stop" if token in params.stop_token_ids else "length"
                    finished = True
                yield RequestOutput(request_id, (token,), (), last, reason, len(prompt_ids),
                                    len(out), params.seed or 0)
                if self.delay:
                    await asyncio.sleep(self.delay)
                if last:
                    return
            finished = True
            yield RequestOutput(request_id, (), (), True, "abort", len(prompt_ids), len(out), 0)
        finally:
            if not finished:
                self.aborted.add(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def shutdown(self) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 1)
