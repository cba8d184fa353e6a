"""Requests per second through `inhouse serve` with the engine in-process and as 1 and 2 Ray Serve
replicas, side by side in one run; then what a client sees when a replica is killed under load.

    python benchmarks/replicas.py [--model DIR] [--requests 40] [--concurrency 16]
                                  [--max-tokens 32] [--replicas 0,1,2] [--threads-per-replica 1]

Each configuration is a real `inhouse serve` subprocess on 127.0.0.1 (the demo model unless
--model; a local Ray for the replica runs), sent --requests chat completions, --concurrency at a
time. Then, with the most replicas, one replica's process is SIGKILLed mid-load: the statuses
and error messages the clients got, and how long until Serve had the replica back. Writes
benchmarks/results/replicas.json. Talks to 127.0.0.1 only; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.common import machine, report  # noqa: E402
from tests.server_utils import free_port, wait_ready  # noqa: E402

REPLICA = "ServeReplica:inhouse:EngineReplica"


def replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", REPLICA], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def start(args, replicas: int, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "inhouse.cli", "serve", "--port", str(port),
           "--database-url", f"sqlite:///{work / f'server-{replicas}.db'}", "--draft-tokens", "0",
           "--max-batch", str(args.concurrency)]
    if args.model:
        cmd += ["--model", args.model]
    if replicas:
        cmd += ["--replicas", str(replicas), "--cpus-per-replica", str(args.threads_per_replica)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    wait_ready(proc, port, 300)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in replica_pids():
        os.kill(pid, signal.SIGKILL)


async def load(url: str, n: int, concurrency: int, max_tokens: int, during=None) -> dict:
    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[int, str, int]] = []

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": "inhouse-demo", "max_tokens": max_tokens, "seed": i,
                "messages": [{"role": "user", "content": f"Write note {i}."}]}
        async with sem:
            try:
                r = await http.post(f"{url}/v1/chat/completions", json=body)
                j = r.json()
                results.append((r.status_code, j.get("error", {}).get("message", ""),
                                j.get("usage", {}).get("completion_tokens", 0)))
            except httpx.HTTPError as e:
                results.append((0, type(e).__name__, 0))

    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(http, i)) for i in range(n)]
        if during is not None:
            await during()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r[0] == 200]
    return {"requests": n, "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 3),
            "tokens_per_s": round(sum(r[2] for r in ok) / wall, 1),
            "statuses": dict(Counter(r[0] for r in results)),
            "errors": sorted({r[1] for r in results if r[0] != 200})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--replicas", default="0,1,2", help="0: the engine in the server's process")
    ap.add_argument("--threads-per-replica", type=float, default=1)
    args = ap.parse_args()
    counts = [int(x) for x in args.replicas.split(",")]
    data: dict = {"machine": machine(), "args": vars(args), "runs": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in counts:
            proc, url = start(args, n, work)
            try:
                asyncio.run(load(url, 4, 4, args.max_tokens))  # warm
                run = asyncio.run(load(url, args.requests, args.concurrency, args.max_tokens))
                if n == max(counts) and n >= 2:
                    run["kill"] = asyncio.run(kill_under_load(url, args))
            finally:
                stop(proc)
            data["runs"][str(n)] = run
            label = "in-process engine" if n == 0 else f"{n} replica(s)"
            rows.append((f"{label}: requests/s", f"{run['requests_per_s']:.2f}"))
            rows.append((f"{label}: tokens/s", f"{run['tokens_per_s']:.1f}"))
            if "kill" in run:
                k = run["kill"]
                rows.append(("replica killed: statuses", str(k["statuses"])))
                rows.append(("replica killed: errors", "; ".join(k["errors"])[:120]))
                rows.append(("replica back after", f"{k['back_after_s']} s"))
    report("inhouse serve: in-process vs Ray Serve replicas", rows, data, "replicas")


async def kill_under_load(url: str, args) -> dict:
    before = replica_pids()
    killed_at: list[float] = []

    async def kill() -> None:
        await asyncio.sleep(1.0)
        os.kill(before[0], signal.SIGKILL)
        killed_at.append(time.monotonic())

    run = await load(url, args.requests, args.concurrency, args.max_tokens, during=kill)
    while True:  # Serve replaces the replica (a new process)
        now = replica_pids()
        if len(now) == len(before) and before[0] not in now:
            break
        if time.monotonic() - killed_at[0] > 300:
            break
        await asyncio.sleep(0.2)
    run["back_after_s"] = round(time.monotonic() - killed_at[0], 1)
    return run


if __name__ == "__main__":
    main()
