"""The `python` tool: stateful sessions of a sandboxed interpreter (one per conversation), each a
notebook whose variables and /mnt/data persist between calls.

A call that runs past `wall_seconds`, exhausts the memory or CPU limit, or kills its own
interpreter ends the session: the caller is told, and the next call starts a fresh one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from inhouse.errors import InhouseError
from inhouse.tools.sandbox import SandboxLimits, probe, spawn

log = logging.getLogger("inhouse.tools")

_DRIVER = (Path(__file__).parent / "python_driver.py").read_text()


@dataclass(frozen=True)
class Execution:
    """What one call printed, and how it ended."""

    output: str
    truncated: bool = False  # more was printed than the output limit
    error: bool = False  # the code raised (the traceback is in `output`)
    timed_out: bool = False
    restarted: bool = False  # the session died with this call; its state is gone
    duration_s: float = 0.0

    def text(self) -> str:
        """The tool message the model reads."""
        parts = [self.output]
        if self.truncated:
            parts.append("\n[output truncated]")
        if self.timed_out:
            parts.append(f"\n[execution timed out after {self.duration_s:.0f} s; the session "
                         "was restarted and its variables are gone]")
        elif self.restarted:
            parts.append("\n[the interpreter stopped (memory or CPU limit, or it was killed); "
                         "the session was restarted and its variables are gone]")
        text = "".join(parts) if self.output else "".join(parts[1:]).lstrip("\n")
        return text if text.strip() else "[no output: use print() to see values]"


class PythonSession:
    """One sandboxed interpreter. `run` is blocking (the server calls it in a thread) and
    serialised per session."""

    def __init__(self, limits: SandboxLimits = SandboxLimits()) -> None:
        self.limits = limits
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.last_used = time.monotonic()

    def run(self, code: str) -> Execution:
        with self._lock:
            self.last_used = time.monotonic()
            t0 = time.monotonic()
            if self._proc is None or self._proc.poll() is not None:
                self._proc = spawn(["-c", _DRIVER], self.limits)
            body = json.dumps({"code": code, "limit": self.limits.output_bytes}).encode()
            try:
                os.write(self._proc.stdin.fileno(), struct.pack(">Q", len(body)) + body)
                reply = self._read_reply(t0 + self.limits.wall_seconds)
            except TimeoutError:
                self._kill()
                return Execution("", timed_out=True, restarted=True,
                                 duration_s=time.monotonic() - t0)
            except (OSError, EOFError, ValueError) as e:
                self._kill(why=type(e).__name__)
                return Execution("", restarted=True, duration_s=time.monotonic() - t0)
            return Execution(str(reply.get("output", "")), bool(reply.get("truncated")),
                             bool(reply.get("error")), duration_s=time.monotonic() - t0)

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd, buf = self._proc.stdout.fileno(), b""
        # poll, not select: select() refuses descriptors past 1024, which a busy server's pipes
        # reach (the full test suite did: every call then read as a dead interpreter)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError("the interpreter exited")
            buf += chunk
        return buf

    def _read_reply(self, deadline: float) -> dict:
        (size,) = struct.unpack(">Q", self._read_exact(8, deadline))
        # the reply holds at most output_bytes of text; JSON escaping can grow it up to 6x
        if size > 6 * self.limits.output_bytes + 4096:
            raise ValueError("oversized reply")
        reply = json.loads(self._read_exact(size, deadline))
        if not isinstance(reply, dict):
            raise ValueError("malformed reply")
        return reply

    def _kill(self, why: str = "") -> None:
        p, self._proc = self._proc, None
        if p is None:
            return
        exited = p.poll()
        try:
            os.killpg(p.pid, signal.SIGKILL)  # bwrap; --die-with-parent takes the rest
        except ProcessLookupError:
            pass
        p.wait()
        if why:  # the sandbox stopped under a call: say how, for the operator (bwrap's own
            # complaint, never the code's output, which the driver keeps off stderr)
            said = p.stderr.read(4096).decode(errors="replace").strip().splitlines()
            bwrap = [line for line in said if line.startswith("bwrap:")]
            log.warning("python sandbox stopped (%s; exit code %s)%s", why, exited,
                        f": {bwrap[-1][:300]}" if bwrap else f"; {len(said)} line(s) on stderr")
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()

    def close(self) -> None:
        with self._lock:
            self._kill()


class SessionNotFound(InhouseError):
    pass


class PythonSessions:
    """Sessions by id, each owned by one tenant (another tenant's id is not found). The least
    recently used session is closed when `max_sessions` are open; idle ones after
    `idle_seconds`. `probe()` runs at construction: no sandbox, no tool."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), max_sessions: int = 16,
                 idle_seconds: float = 1200.0) -> None:
        probe()
        self.limits, self.max_sessions, self.idle_seconds = limits, max_sessions, idle_seconds
        self._sessions: dict[str, tuple[str, PythonSession]] = {}
        self._lock = threading.Lock()

    def new_id(self) -> str:
        return f"cntr_{secrets.token_hex(16)}"

    def get(self, session_id: str, owner: str) -> PythonSession:
        """The session of that id for `owner`, created on first use."""
        with self._lock:
            self._expire()
            held = self._sessions.get(session_id)
            if held is not None:
                if held[0] != owner:
                    raise SessionNotFound(f"no python session {session_id!r}")
                return held[1]
            while len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions, key=lambda k: self._sessions[k][1].last_used)
                self._sessions.pop(oldest)[1].close()
            session = PythonSession(self.limits)
            self._sessions[session_id] = (owner, session)
            return session

    def owns(self, session_id: str, owner: str) -> bool:
        with self._lock:
            held = self._sessions.get(session_id)
            return held is not None and held[0] == owner

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, s) in self._sessions.items()
                    if now - s.last_used > self.idle_seconds]:
            self._sessions.pop(key)[1].close()

    def close(self) -> None:
        with self._lock:
            for _, s in self._sessions.values():
                s.close()
            self._sessions.clear()
