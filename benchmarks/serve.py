"""N concurrent streaming clients against a real server on 127.0.0.1.

    python benchmarks/serve.py [--model DIR] [--clients 1,4,8] [--requests 2] [--max-tokens 32]

Starts `inhouse`'s server in this process (uvicorn on a free loopback port; the tiny random
checkpoint unless --model is given), then runs each client count: every client sends --requests
streaming chat completions one after another. Reports time to first token (first streamed text)
and per-request tokens/s percentiles, and aggregate tokens/s. Talks to 127.0.0.1 only; stops by
itself. Writes benchmarks/results/serve.json. Two first-token measures: when the first text
reaches the client (for output without harmony headers, as from the random demo model, text is
only recognised after 48 tokens or at the end), and the engine's own time to first token, read
from the server's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.common import machine, report  # noqa: E402
from inhouse.config import EngineConfig, ServerSettings  # noqa: E402
from inhouse.convert.demo import demo_checkpoint  # noqa: E402
from inhouse.engine import AsyncEngine, LLMEngine  # noqa: E402
from inhouse.model import load_model  # noqa: E402
from inhouse.server import build_app  # noqa: E402
from tests.server_utils import running_server  # noqa: E402


async def one_request(http: httpx.AsyncClient, url: str, max_tokens: int, seed: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Request {seed}: go"}],
            "max_tokens": max_tokens, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices", []):
                d = ch.get("delta", {})
                if ttft is None and (d.get("content") or d.get("reasoning") or d.get("tool_calls")):
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"ttft_s": ttft if ttft is not None else total, "total_s": total, "tokens": tokens,
            "tokens_per_s": tokens / total if total else 0.0}


def server_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of the server's time-to-first-token histogram (the engine's own view)."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for key in ("inhouse_time_to_first_token_seconds_sum", "inhouse_time_to_first_token_seconds_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[1])
    return values.get("inhouse_time_to_first_token_seconds_sum", 0.0), \
        values.get("inhouse_time_to_first_token_seconds_count", 0.0)


async def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    before = server_ttft(url)
    async with httpx.AsyncClient(timeout=600) as http:
        async def client(i: int) -> list[dict]:
            return [await one_request(http, url, max_tokens, 1000 * i + j) for j in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    after = server_ttft(url)
    engine_ttft = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return {"clients": clients, "requests": len(results), "wall_s": wall,
            "engine_ttft_mean_s": engine_ttft,
            "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": pct([r["ttft_s"] for r in results], 50),
            "ttft_p95_s": pct([r["ttft_s"] for r in results], 95),
            "tokens_per_s_p50": pct([r["tokens_per_s"] for r in results], 50),
            "tokens_per_s_p5": pct([r["tokens_per_s"] for r in results], 5)}


def pct(values: list[float], q: int) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the demo)")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mode", default="reproducible")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    model = load_model(args.model or demo_checkpoint())
    engine = AsyncEngine(LLMEngine(model, EngineConfig(max_num_seqs=max(counts), mode=args.mode)))
    results, rows = [], []
    try:
        with running_server(build_app(engine, ServerSettings(model_name="bench"))) as url:
            for n in counts:
                r = asyncio.run(run_clients(url, n, args.requests, args.max_tokens))
                results.append(r)
                rows.append((f"{n} clients: aggregate", f"{r['aggregate_tokens_per_s']:.1f} tok/s"))
                rows.append((f"{n} clients: first streamed text p50 / p95",
                             f"{r['ttft_p50_s'] * 1000:.0f} / {r['ttft_p95_s'] * 1000:.0f} ms"))
                rows.append((f"{n} clients: engine time to first token (mean)",
                             f"{r['engine_ttft_mean_s'] * 1000:.0f} ms"))
                rows.append((f"{n} clients: per-request tok/s p50 / p5",
                             f"{r['tokens_per_s_p50']:.1f} / {r['tokens_per_s_p5']:.1f}"))
                print(rows[-4:], flush=True)
    finally:
        engine.shutdown()
    report(f"serve: streaming chat completions ({args.mode} mode, {args.max_tokens} tokens)",
           rows, {"results": results, "model": args.model or "demo", "mode": args.mode,
                  "machine": machine()}, "serve")


if __name__ == "__main__":
    main()
