"""Decode throughput of the engine: 1, 4 and 16 concurrent requests, reproducible vs batched mode.

    python benchmarks/decode.py [--models tiny,gpt-oss-20b] [--concurrency 1,4,16]
                                [--tokens 16] [--tokens-20b 3] [--modes reproducible,batched]

Random weights (the tiny test shape; the exact gpt-oss-20b shape, built once and cached). Each
request: a random prompt, seeded sampling at temperature 1. Decode tokens/s counts only steps in
which every request was decoding (prefill is timed apart). Writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import cache_dir, ensure_random_checkpoint, machine, memory, report  # noqa: E402
from inhouse.config import EngineConfig, preset  # noqa: E402
from inhouse.convert.convert import convert  # noqa: E402
from inhouse.convert.random_init import random_tensors  # noqa: E402
from inhouse.engine import LLMEngine, SamplingParams  # noqa: E402
from inhouse.model import load_model  # noqa: E402
from inhouse.model.loader import build_model  # noqa: E402
from inhouse.model.weights import CheckpointInfo  # noqa: E402


def run(model, mode: str, concurrency: int, tokens: int, prompt_tokens: int) -> dict:
    cfg = EngineConfig(mode=mode, max_num_seqs=max(concurrency, 1),
                       max_num_batched_tokens=max(512, concurrency * prompt_tokens),
                       prefill_chunk=max(prompt_tokens, 1))
    engine = LLMEngine(model, cfg)
    g = torch.Generator().manual_seed(0)
    for i in range(concurrency):
        ids = torch.randint(0, model.config.vocab_size, (prompt_tokens,), generator=g).tolist()
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=tokens, seed=i))
    prefill_s = decode_s = 0.0
    decode_tokens = 0
    t_start = time.perf_counter()
    while engine.has_unfinished():
        prefilling = any(s.is_prefilling for s in engine.scheduler.running) or engine.scheduler.waiting
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if prefilling:
            prefill_s += dt
        else:
            decode_s += dt
            decode_tokens += sum(len(o.new_token_ids) for o in outs)
    return {"mode": mode, "concurrency": concurrency, "tokens_per_request": tokens,
            "prompt_tokens": prompt_tokens, "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens": decode_tokens,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None,
            "wall_s": time.perf_counter() - t_start}


def random_model(name: str, device: str, dtype: torch.dtype):
    """A random model of preset `name` built on `device` without writing a checkpoint."""
    cfg = preset(name)
    info = CheckpointInfo(Path("."), "hf", "mxfp4", cfg, (), {})
    return build_model(info, dict(random_tensors(cfg, seed=0, device=device)), device, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,gpt-oss-20b")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--modes", default="reproducible,batched")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per request (tiny model)")
    ap.add_argument("--tokens-20b", type=int, default=3, help="tokens per request (20b shape)")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--int8", action="store_true",
                    help="the 20b shape with int8 attention + unembedding (converted once, cached)")
    ap.add_argument("--device", default="cpu",
                    help="cpu, or cuda: random weights drawn straight into GPU memory (no files)")
    args = ap.parse_args()
    results, rows = [], []
    for name in args.models.split(","):
        dtype = torch.float32 if name == "tiny" else torch.bfloat16
        if args.device == "cpu":
            path = cache_dir() / f"{name}-random-hf-sharded"
            ensure_random_checkpoint(path, name, "hf-sharded")
            if args.int8:
                base, path = path, cache_dir() / f"{name}-random-int8"
                if not (path / "config.json").is_file():
                    convert(base, path, "hf-sharded", quantize="int8")
            model = load_model(path, dtype=dtype)
        else:
            model = random_model(name, args.device, dtype)
        tokens = args.tokens if name == "tiny" else args.tokens_20b
        run(model, "reproducible", 1, 2, args.prompt_tokens)  # warm-up
        for conc in map(int, args.concurrency.split(",")):
            by_mode = {}
            for mode in args.modes.split(","):
                r = run(model, mode, conc, tokens, args.prompt_tokens) | {
                    "model": name + ("-int8" if args.int8 else ""), "dtype": str(dtype)}
                results.append(r)
                by_mode[mode] = r
                rate = r["decode_tokens_per_s"]
                rows.append((f"{name} x{conc} {mode}",
                             f"{rate:.2f} tok/s" if rate else "-"))
                print(rows[-1], flush=True)
            if {"reproducible", "batched"} <= set(by_mode):
                a, b = by_mode["reproducible"]["decode_tokens_per_s"], by_mode["batched"]["decode_tokens_per_s"]
                if a and b:
                    rows.append((f"{name} x{conc} reproducible / batched", f"{a / b:.2f}"))
    data = {"results": results, "peak_rss": memory()["VmHWM"], "machine": machine(),
            "threads": torch.get_num_threads(), "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    name = "decode" if args.device == "cpu" else f"decode-{args.device.split(':')[0]}"
    name += "-int8" if args.int8 else ""
    report("decode throughput (aggregate over concurrent requests)", rows, data, name)


if __name__ == "__main__":
    main()
