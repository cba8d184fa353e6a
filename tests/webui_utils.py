"""A real `inhouse serve` of the demo model on 127.0.0.1, and Debian's chromium driven by
Playwright (no browser download), for the web UI's tests and its air-gapped check."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.server_utils import free_port, wait_ready

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    """Debian's chromium (`make test` installs it); a missing browser fails, never skips."""
    path = os.environ.get("INHOUSE_CHROMIUM") or shutil.which("chromium")
    if not path:
        raise RuntimeError("chromium is missing: `make test` installs it (apt-get install "
                           "chromium), or set INHOUSE_CHROMIUM to a Chromium binary")
    return path


@dataclass
class Served:
    url: str
    database_url: str
    proc: subprocess.Popen
    log: Path


@contextlib.contextmanager
def serve_demo(demo_cache: Path, workdir: Path, *extra: str):
    """`inhouse serve` of the trained demo with its own server and audit database in `workdir`
    (the demo cache is only read), full audit content (so records replay), a checkpoint every
    second (so records have proofs at once)."""
    port = free_port()
    db = f"sqlite:///{workdir / 'server.db'}"
    env = dict(os.environ, INHOUSE_CACHE=str(demo_cache))
    log = workdir / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inhouse.cli", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--database-url", db, "--audit-content", "full",
             "--audit-signing-key", str(workdir / "audit.key"), "--audit-seal-seconds", "1",
             *extra],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_ready(proc, port, 120)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {log.read_text()[-3000:]}") from None
        yield Served(f"http://127.0.0.1:{port}", db, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
