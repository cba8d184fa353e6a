"""Scale-out on Ray Serve, as an operator runs it: `inhouse serve --replicas 2` of the trained demo
on a local Ray, with the audit log, keys and stored responses on a real PostgreSQL. 40 concurrent
requests spread over both replicas; one replica's process is killed (SIGKILL) under load. The
requests the dead replica held that had no token yet run again on the survivor; only those it was
generating (at most its batch, 8) end with an error the client sees (and the log records). Every
request answered 200 has its complete record in the one log, `audit verify` passes, and Serve
brings the replica back. Whether the kill finds requests without output on the victim is timing;
the client's retry rules are also tested on scripted streams, below."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.governance.audit_log import AuditLog, load_signing_key
from tests.postgres import postgres_url  # noqa: F401 - the fixture
from tests.server_utils import free_port, wait_ready

pytest.importorskip("ray", reason="the scale-out test needs ray[serve]: pip install -e '.[test]'")

REPLICA = "ServeReplica:inhouse:EngineReplica"  # the process title Ray gives each replica


def replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", REPLICA], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def wait_for(what, timeout: float, every: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(every)
    return what()


@pytest.fixture
def cluster(demo_cache, postgres_url, tmp_path):  # noqa: F811 - the fixture
    port = free_port()
    key_file = tmp_path / "audit.key"
    env = dict(os.environ, INHOUSE_CACHE=str(demo_cache), RAY_USAGE_STATS_ENABLED="0")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inhouse.cli", "serve", "--port", str(port), "--replicas", "2",
             "--database-url", postgres_url, "--audit-content", "full",
             "--audit-signing-key", str(key_file), "--audit-salt", str(tmp_path / "audit-salt"),
             "--audit-seal-seconds", "1",
             "--max-batch", "8", "--draft-tokens", "0"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        try:
            wait_ready(proc, port, 240)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {log.read_text()[-4000:]}") from None
        yield f"http://127.0.0.1:{port}", postgres_url, key_file, proc, log
    finally:
        proc.send_signal(signal.SIGINT)  # the server takes its replicas and its Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in replica_pids():  # nothing of this test's Ray may outlive it
            os.kill(pid, signal.SIGKILL)


def ask(url: str, i: int, results: dict) -> None:
    body = {"model": "inhouse-demo", "max_tokens": 24, "seed": i, "temperature": 1.0,
            "messages": [{"role": "user", "content": f"Write a short note number {i}."}]}
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=180)
        results[i] = (r.status_code, r.json())
    except httpx.HTTPError as e:
        results[i] = (0, {"error": {"message": repr(e)}})


def test_two_replicas_share_the_load_survive_a_killed_one_and_keep_one_verifiable_log(cluster):
    url, db, key_file, proc, log = cluster
    pids = wait_for(lambda: len(replica_pids()) == 2 and replica_pids(), 60)
    assert pids and len(pids) == 2, f"two replica processes: {replica_pids()}"
    # both replicas answer: the server's stats see two pids once the load has run a while
    results: dict[int, tuple[int, dict]] = {}
    threads = [threading.Thread(target=ask, args=(url, i, results)) for i in range(40)]
    for t in threads:
        t.start()
    # kill one replica once requests are in flight on both
    busy = wait_for(lambda: _running_on_both(url), 60, every=0.2)
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 40
    statuses = Counter(status for status, _ in results.values())
    ok = {i: body for i, (status, body) in results.items() if status == 200}
    failed = {i: body for i, (status, body) in results.items() if status != 200}
    assert busy, "the load never ran on both replicas at once"
    # only the victim's running batch can be lost: its queue had no token out and ran again
    assert len(failed) <= 8, statuses
    for body in failed.values():  # a replica's death is an error the client is told of
        assert "replica" in body["error"]["message"], body
    # every answered request is in the one log, complete
    audit = AuditLog(db, load_signing_key(key_file))
    for body in ok.values():
        kinds = [leaf["kind"] for leaf in audit.get(f"{body['id']}-0")]
        assert kinds == ["request", "completion"], (body["id"], kinds)
    errored = [r for r in audit.list(limit=1000)
               if r["kind"] == "completion" and r.get("finish_reason") == "error"]
    assert len(errored) >= len(failed)  # the lost ones are recorded as lost
    res = CliRunner().invoke(cli, ["audit", "verify", "--database-url", db,
                                   "--public-key", str(_public_key(key_file, log.parent))])
    assert res.exit_code == 0 and "ok:" in res.stdout, res.output
    # Serve replaces the dead replica, and the pair serves again
    back = wait_for(lambda: len(replica_pids()) == 2 and victim not in replica_pids(), 120)
    assert back, f"the replica did not come back: {replica_pids()}"
    after: dict[int, tuple[int, dict]] = {}
    ask(url, 99, after)
    assert after[99][0] == 200, after
    # a stop string aborts the rest of the generation on its replica, as in one process
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "inhouse-demo", "temperature": 0, "max_tokens": 200, "stop": ["capital"],
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "The ", r.text
    ends = [leaf for leaf in audit.get(f"{r.json()['id']}-0") if leaf["kind"] == "completion"]
    assert [leaf["finish_reason"] for leaf in ends] == ["abort"], ends


def _running_on_both(url: str) -> bool:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("inhouse_engine_replicas_busy "):
            return float(line.split()[1]) >= 2
    return False


def _public_key(key_file: Path, where: Path) -> Path:
    from inhouse.governance.audit_log import public_key_pem

    pub = where / "audit.pub"
    pub.write_bytes(public_key_pem(load_signing_key(key_file).public_key()))
    return pub


# ---- the client's retry, without Ray's timing: a handle whose streams fail as scripted ---------
class _Stream:
    """One replica call: yields `outs`, then raises `fail` (if any)."""

    def __init__(self, outs, fail=None):
        self.outs, self.fail, self.cancelled = list(outs), fail, False

    async def __anext__(self):
        if self.outs:
            return self.outs.pop(0)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class _Handle:
    """Serve's handle as RayEngineClient uses it; each generate call takes the next stream."""

    def __init__(self, *streams):
        self.streams, self.calls = list(streams), 0
        self.generate = self

    def options(self, stream):
        return self

    def remote(self, *args):
        self.calls += 1
        return self.streams.pop(0)


def _out(tokens, finished=False):
    from inhouse.engine.request import RequestOutput

    return RequestOutput("r", tuple(tokens), (), finished, "stop" if finished else None, 3,
                         len(tokens), 0)


def _run(handle):
    import asyncio

    from inhouse.config import preset
    from inhouse.engine.sampling import SamplingParams
    from inhouse.scaleout import client as client_mod

    client = client_mod.RayEngineClient(handle, preset("tiny"))

    async def collect():
        return [o async for o in client.generate("r", [1, 2, 3], SamplingParams(seed=0))]

    try:
        return asyncio.run(collect())
    finally:
        client.shutdown()


def test_a_request_lost_before_any_output_runs_again_on_another_replica(monkeypatch):
    from ray.exceptions import ActorDiedError

    from inhouse.scaleout import client as client_mod

    monkeypatch.setattr(client_mod, "LOST_BACKOFF_S", 0.0)
    handle = _Handle(_Stream([], ActorDiedError()), _Stream([], ActorDiedError()),
                     _Stream([_out([5]), _out([6], finished=True)]))
    outs = _run(handle)
    assert handle.calls == 3 and [o.new_token_ids for o in outs] == [(5,), (6,)]
    assert outs[-1].finish_reason == "stop"


def test_a_request_lost_after_an_output_ends_in_error_and_is_not_run_again(monkeypatch):
    from ray.exceptions import ActorDiedError

    from inhouse.scaleout import client as client_mod

    monkeypatch.setattr(client_mod, "LOST_BACKOFF_S", 0.0)
    handle = _Handle(_Stream([_out([5])], ActorDiedError()), _Stream([_out([9], True)]))
    outs = _run(handle)
    assert handle.calls == 1 and [o.new_token_ids for o in outs] == [(5,), ()]
    assert outs[-1].finish_reason == "error" and "replica" in outs[-1].error


def test_replicas_lost_every_time_end_the_request_in_error(monkeypatch):
    from ray.exceptions import ActorDiedError

    from inhouse.scaleout import client as client_mod

    monkeypatch.setattr(client_mod, "LOST_BACKOFF_S", 0.0)
    tries = client_mod.LOST_RETRIES + 1
    handle = _Handle(*[_Stream([], ActorDiedError()) for _ in range(tries)])
    (out,) = _run(handle)
    assert handle.calls == tries and out.finish_reason == "error"
    assert f"tried {tries} times" in out.error


def test_a_replicas_refusal_is_raised_as_itself_not_retried():
    from ray.exceptions import RayTaskError

    from inhouse.engine.sampling import InvalidRequest

    refusal = RayTaskError("generate", "traceback", InvalidRequest("prompt too long"))
    handle = _Handle(_Stream([], refusal), _Stream([_out([9], True)]))
    with pytest.raises(InvalidRequest, match="prompt too long"):
        _run(handle)
    assert handle.calls == 1
