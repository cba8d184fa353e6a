"""kill -9 the server mid-stream under concurrent load, restart it: `verify` passes and every
response a client received in full has a complete audit record."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.config import cache_root
from inhouse.governance.audit_log import AuditLog, load_signing_key
from tests.server_utils import free_port, wait_ready


def _start(port, url):
    proc = subprocess.Popen([sys.executable, "-m", "inhouse.cli", "serve", "--port", str(port),
                             "--database-url", url, "--audit-content", "full"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(proc, port, 120)
    return proc


def _client(port, max_tokens, results, i):
    body = {"model": "inhouse-demo", "messages": [{"role": "user", "content": f"story {i}"}],
            "max_tokens": max_tokens, "stream": True, "seed": i}
    got = {"id": None, "done": False}
    results[i] = got
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                          timeout=60) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    got["done"] = True
                elif line.startswith("data: "):
                    got["id"] = got["id"] or json.loads(line[6:]).get("id")
    except httpx.HTTPError:
        pass  # the server died under us


def test_kill_dash_9_mid_stream_leaves_an_honest_verifiable_log(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    port = free_port()
    proc = _start(port, url)
    results = {}
    # short answers finish before the kill, long ones are cut by it
    threads = [threading.Thread(target=_client, args=(port, 6 if i % 2 else 4000, results, i))
               for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for t in threads:
        t.join()
    finished = [r["id"] for r in results.values() if r["done"]]
    cut = [r for r in results.values() if not r["done"]]
    assert finished and cut  # the test really crashed mid-stream

    proc = _start(free_port(), url)  # it comes back up on the same database
    proc.terminate()
    proc.wait()
    log = AuditLog(url, load_signing_key(cache_root() / "audit-signing.key"))
    for rid in finished:
        kinds = [leaf["kind"] for leaf in log.get(f"{rid}-0")]
        assert kinds == ["request", "completion"], rid
    incomplete = [r for r in log.list(limit=1000) if r["kind"] == "request"
                  and len(log.get(r["record_id"])) == 1]
    assert len(incomplete) >= 1  # the cut streams: a start without an end, honestly
    res = CliRunner().invoke(cli, ["audit", "verify", "--database-url", url])
    assert res.exit_code == 0 and "ok:" in res.stdout, res.output
