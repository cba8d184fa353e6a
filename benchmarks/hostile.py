"""Issue 17's two load figures, against `inhouse serve` in a subprocess on 127.0.0.1:

    python benchmarks/hostile.py [--model DIR] [--streams 64] [--poisoned 5] [--fuzz-seconds 600]

1. Poisoned streams: `--streams` requests at once (chat and Responses, streaming and not), of
   which `--poisoned` are hostile (a temperature of 1e-39, a top_p of 1e-46, a lone surrogate, a
   megabyte of "{", a client that leaves after its first chunk). Counts the innocent requests
   that did not finish normally: the target is 0.
2. Fuzzing: schemathesis (`st run`) for `--fuzz-seconds` against the server's own OpenAPI schema,
   every body's `model` set to the served name and its token limits clamped small (hooks in
   benchmarks/st_hooks.py), so that generated requests reach generation. Counts responses by
   status from schemathesis's NDJSON report: the target is 0 with status 5xx.

The server is the trained demo when built (`inhouse demo build`), else the tiny random one, with
its databases in a temporary folder. Stops by itself. Writes benchmarks/results/hostile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def start_server(model: str | None, port: int, folder: Path) -> subprocess.Popen:
    cmd = [str(BIN / "inhouse"), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--database-url", f"sqlite:///{folder / 'inhouse.db'}", "--max-batch", "16"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"),
                            env=os.environ | {"RUST_BACKTRACE": "0"})
    try:
        wait_ready(proc, port, 300)
    except RuntimeError as e:
        raise SystemExit(f"{e}; see {folder / 'server.log'}") from None
    return proc


async def poisoned_streams(url: str, model: str, streams: int, poisoned: int,
                           max_tokens: int) -> dict:
    base_chat = {"model": model, "max_tokens": max_tokens,
                 "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    base_resp = {"model": model, "max_output_tokens": max_tokens, "input": "Hello"}
    poison = [("chat", base_chat | {"temperature": 1e-39}, True),
              ("chat", base_chat | {"top_p": 1e-46}, False),
              ("chat", base_chat | {"messages": [{"role": "user", "content": "\ud800"}]}, True),
              ("resp", base_resp | {"input": "{" * 1_000_000}, False),
              ("leave", base_chat, True)][:poisoned]
    innocent = [("chat" if i % 2 else "resp", (base_chat if i % 2 else base_resp)
                 | {"seed": i, "temperature": 1.0}, i % 4 < 2) for i in range(streams - len(poison))]

    async def one(c: httpx.AsyncClient, kind: str, body: dict, stream: bool) -> str:
        path = "/v1/responses" if kind == "resp" else "/v1/chat/completions"
        raw = json.dumps(body | {"stream": stream})  # ASCII: lone surrogates stay escaped
        h = {"content-type": "application/json"}
        try:
            if not stream:
                r = await c.post(url + path, content=raw, headers=h)
                return "ok" if r.status_code == 200 else f"status {r.status_code}"
            async with c.stream("POST", url + path, content=raw, headers=h) as r:
                if r.status_code != 200:
                    return f"status {r.status_code}"
                last = ""
                async for line in r.aiter_lines():
                    if kind == "leave":
                        return "left"
                    if line.startswith("data:") or line.startswith("event:"):
                        last = line
                    if '"error"' in line and '"type": "error"' in line:
                        return "error event"
                done = last == "data: [DONE]" or "response.completed" in last \
                    or "response.incomplete" in last
                return "ok" if done else f"stream ended with {last[:60]!r}"
        except httpx.HTTPError as e:
            return f"{type(e).__name__}"

    async with httpx.AsyncClient(timeout=600) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(c, *x) for x in innocent + poison))
        elapsed = time.perf_counter() - t0
    innocent_results = Counter(results[:len(innocent)])
    return {"streams": streams, "poisoned": len(poison), "seconds": round(elapsed, 1),
            "innocent": dict(innocent_results),
            "innocent_failures": sum(v for k, v in innocent_results.items() if k != "ok"),
            "poisoned_results": dict(zip([p[0] + ":" + ",".join(sorted(set(p[1]) - set(base_chat)
                                                                       - set(base_resp)))
                                          for p in poison], results[len(innocent):]))}


def fuzz(url: str, model: str, seconds: int, folder: Path) -> dict:
    ndjson = folder / "st.ndjson"
    env = os.environ | {"SCHEMATHESIS_HOOKS": "benchmarks.st_hooks", "INHOUSE_SERVED_MODEL": model,
                        "PYTHONPATH": str(ROOT)}
    cmd = [str(BIN / "st"), "run", f"{url}/openapi.json", "--max-time", str(seconds),
           "--checks", "not_a_server_error", "--workers", "2", "--request-timeout", "120",
           "--report", "ndjson", "--report-ndjson-path", str(ndjson), "--no-color"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=folder)  # its cache stays out of the repo
    elapsed = time.perf_counter() - t0
    statuses: Counter = Counter()
    if ndjson.is_file():
        for line in ndjson.read_text().splitlines():
            for status in _statuses(json.loads(line)):
                statuses[status] += 1
    return {"seconds": round(elapsed, 1), "exit_code": proc.returncode,
            "responses": sum(statuses.values()), "by_status": dict(sorted(statuses.items())),
            "5xx": sum(v for k, v in statuses.items() if k >= 500),
            "tail": proc.stdout[-3000:]}


def server_counts(metrics: str) -> dict:
    """What the server itself counted (/metrics): requests by route and status, tokens."""
    by: Counter = Counter()
    tokens = 0.0
    for line in metrics.splitlines():
        if line.startswith("inhouse_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            endpoint = labels.split('endpoint="')[1].split('"')[0]
            status = int(labels.split('status="')[1].split('"')[0])
            by[(endpoint, status)] += int(float(value))
        elif line.startswith("inhouse_completion_tokens_total "):
            tokens = float(line.split()[-1])
    return {"requests": sum(by.values()), "5xx": sum(v for (_, s), v in by.items() if s >= 500),
            "generation_200": {e: v for (e, s), v in by.items()
                               if s == 200 and e in ("/v1/chat/completions", "/v1/responses")},
            "by_route_status": {f"{e} {s}": v for (e, s), v in sorted(by.items())},
            "completion_tokens": int(tokens)}


def _statuses(obj):
    """Every HTTP status code in one NDJSON event of schemathesis's report."""
    if isinstance(obj, dict):
        if isinstance(obj.get("status_code"), int) and "elapsed" in obj:
            yield obj["status_code"]
        for v in obj.values():
            yield from _statuses(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _statuses(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the demo)")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--poisoned", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--fuzz-seconds", type=int, default=600)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc = start_server(args.model, port, folder)
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            load = asyncio.run(poisoned_streams(url, model, args.streams, args.poisoned,
                                                args.max_tokens))
            fuzzed = fuzz(url, model, args.fuzz_seconds, folder) if args.fuzz_seconds else {}
            healthy = httpx.get(f"{url}/health").status_code == 200
            served = server_counts(httpx.get(f"{url}/metrics").text)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    rows = [("streams (poisoned)", f"{load['streams']} ({load['poisoned']})"),
            ("innocent failures", str(load["innocent_failures"])),
            ("innocent results", json.dumps(load["innocent"])),
            ("poisoned results", json.dumps(load["poisoned_results"])),
            ("fuzz: seconds, responses", f"{fuzzed.get('seconds')}, {fuzzed.get('responses')}"),
            ("fuzz: by status", json.dumps(fuzzed.get("by_status"))),
            ("fuzz: 5xx", str(fuzzed.get("5xx"))),
            ("server healthy after", str(healthy)),
            ("server: 5xx of all requests", f"{served['5xx']} of {served['requests']}"),
            ("server: generation requests answered 200",
             json.dumps(served["generation_200"])),
            ("server: tokens generated", str(served["completion_tokens"]))]
    report("issue 17: poisoned streams and fuzzing against a real server", rows,
           {"machine": machine(), "load": load, "fuzz": fuzzed, "healthy_after": healthy,
            "server": served},
           "hostile")


if __name__ == "__main__":
    main()
