"""Witnesses: every signed checkpoint, sent somewhere the database's owner cannot rewrite.

`serve --audit-witness PATH` appends each checkpoint as one JSON line to PATH (put it on WORM
storage, another host's mount, or a log shipper's input); `--audit-witness https://...` POSTs it
(JSON) to a URL, retried in the background with backoff, never delaying an answer. Later,
`audit verify --witness PATH` checks the database against every line (audit_verify.py): a
rollback, a truncation, a fork or a deleted checkpoint then shows even to someone who holds the
signing key. The idea is Certificate Transparency's gossip and Go's checksum-database witnesses.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.request
from pathlib import Path
from typing import Protocol

log = logging.getLogger("inhouse.audit")


class Witness(Protocol):
    def send(self, checkpoint: dict) -> None: ...

    def close(self) -> None: ...


class FileWitness:
    """Appends one JSON line per checkpoint, flushed to the disk before `send` returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def send(self, checkpoint: dict) -> None:
        line = json.dumps(checkpoint, sort_keys=True, separators=(",", ":")) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        pass


class HttpWitness:
    """POSTs each checkpoint to a URL from a background thread, retrying with backoff (1 s up to
    60 s) until it is accepted (2xx); `send` only queues."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inhouse-witness", daemon=True)
        self._thread.start()

    def send(self, checkpoint: dict) -> None:
        self._queue.put(checkpoint)

    def _run(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            try:
                cp = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            delay = 1.0
            while not self._post(cp):
                if self._stop.wait(delay):
                    log.warning("witness %s: checkpoint %s not delivered before shutdown",
                                self.url, cp.get("tree_size"))
                    break
                delay = min(delay * 2, 60.0)

    def _post(self, cp: dict) -> bool:
        req = urllib.request.Request(self.url, data=json.dumps(cp).encode(), method="POST",
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return 200 <= r.status < 300
        except OSError as e:  # refused, timed out, HTTP errors: retried
            log.warning("witness %s: checkpoint %s not accepted (%s); retrying", self.url,
                        cp.get("tree_size"), type(e).__name__)
            return False

    def close(self, wait_s: float = 5.0) -> None:
        deadline = time.time() + wait_s
        while not self._queue.empty() and time.time() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=max(0.1, deadline - time.time()))


def open_witness(spec: str) -> Witness:
    """A URL (http:// or https://) or a file path."""
    if spec.startswith(("http://", "https://")):
        return HttpWitness(spec)
    return FileWitness(spec)


def read_witness(path: str | Path) -> list[dict]:
    """The checkpoints a witness file holds; a line that is not JSON comes back as a dict that
    verification reports (a witness file is evidence: nothing in it is skipped)."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"unreadable_line": n})
    return out
