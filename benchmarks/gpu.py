"""The cuda backend on one GPU: decode and prefill speed of gpt-oss-20b and 120b (random weights).

    python benchmarks/gpu.py [--models gpt-oss-20b,gpt-oss-120b] [--users 1,8,64] [--tokens 32]
                             [--prefill-tokens 2048] [--context 32768] [--context-users 4]
                             [--no-transformers]
    python benchmarks/gpu.py --smoke     # tiny shape, on CPU through Triton's interpreter

For a GPU machine with torch and triton and no network. Each model is built straight into GPU
memory with random weights in the real shapes (no files: random_tensors on the device, experts
packed MXFP4). Printed and written to benchmarks/results/gpu.json:
- decode tokens/s for 1, 8 and 64 users in batched and reproducible mode (the engine, seeded
  sampling, steps where every request decodes, CUDA graphs on), the reproducible mode's cost
  (time per token over the batched mode's), and one user without the CUDA graphs;
- prefill tokens/s of one long prompt;
- the long-context run: 4 users with 32k-token prompts decoding, and how many such users the GPU
  holds beside the weights (experts stay packed: the 120b on one 80 GB card);
- each decode figure's share of the bandwidth bound: bytes a step reads (the weights every token
  touches: attention, router, the routed experts' packed bytes, the unembedding; experts read once
  per step for all users, at most all of them) over the GPU's memory bandwidth (measured here with
  a device-to-device copy);
- HF transformers side by side (its GptOssForCausalLM, bf16 experts, greedy `generate`, one user),
  the 20b only (the 120b's bf16 experts do not fit).
Targets (issue 21): 20b one user >= 250 tok/s on an H100, >= 350 on an H200; 120b one user >= 180
on an H200; reproducible <= 1.3x the batched time per token; >= 10x transformers.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "--smoke" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from benchmarks.common import machine, report  # noqa: E402
from inhouse.config import EngineConfig, ModelConfig, preset  # noqa: E402
from inhouse.convert.random_init import random_tensors  # noqa: E402
from inhouse.engine import LLMEngine, SamplingParams  # noqa: E402
from inhouse.model.loader import build_model  # noqa: E402
from inhouse.model.mxfp4 import num_bytes as mxfp4_bytes  # noqa: E402
from inhouse.model.weights import CheckpointInfo  # noqa: E402


def random_model(name: str, device: str, backend: str):
    cfg = preset(name)
    info = CheckpointInfo(Path("."), "hf", "mxfp4", cfg, (), {})
    dtype = torch.float32 if name == "tiny" else torch.bfloat16
    return build_model(info, dict(random_tensors(cfg, seed=0, device=device)), device, dtype,
                       backend=backend)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode(model, mode: str, users: int, tokens: int, prompt_tokens: int, device: str,
           chunk: int | None = None) -> dict:
    """The engine with `users` seeded requests: decode tokens/s over the steps where every
    request decodes (prefill timed apart; prompts in chunks of `chunk`, default whole). KV:
    8 GiB on a GPU (the paged pools are allocated whole), 64 MiB for the smoke run."""
    chunk = chunk or prompt_tokens
    cfg = EngineConfig(mode=mode, max_num_seqs=users,
                       max_num_batched_tokens=max(512, users * chunk),
                       prefill_chunk=chunk,
                       kv_budget_bytes=(8 << 30) if device == "cuda" else (64 << 20))
    engine = LLMEngine(model, cfg)
    g = torch.Generator().manual_seed(users)
    for i in range(users):
        ids = torch.randint(0, model.config.vocab_size, (prompt_tokens,), generator=g).tolist()
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=tokens, seed=i))
    decode_s, decode_tokens, steps = 0.0, 0, 0
    while engine.has_unfinished():
        prefilling = (any(s.is_prefilling for s in engine.scheduler.running)
                      or engine.scheduler.waiting)
        sync(device)
        t0 = time.perf_counter()
        outs = engine.step()
        sync(device)
        if not prefilling:
            decode_s += time.perf_counter() - t0
            decode_tokens += sum(len(o.new_token_ids) for o in outs)
            steps += 1
    return {"mode": mode, "users": users, "decode_tokens": decode_tokens, "decode_s": decode_s,
            "steps": steps, "tokens_per_s": decode_tokens / decode_s if decode_s else None,
            "prompt_tokens": prompt_tokens}


def prefill(model, prompt_tokens: int, device: str) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (prompt_tokens,),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if device == "cuda":  # warm-up (compiles the prefill's kernels)
            model(ids[:16].to(device), model.new_cache(), last_only=True)
        sync(device)
        t0 = time.perf_counter()
        model(ids.to(device), model.new_cache(), last_only=True)
        sync(device)
    dt = time.perf_counter() - t0
    return {"prompt_tokens": prompt_tokens, "s": dt, "tokens_per_s": prompt_tokens / dt}


def step_bytes(config: ModelConfig, users: int) -> int:
    """Bytes one decode step must read: every weight a token touches, the routed experts once
    for all users (at most every expert), bf16 elsewhere; the KV cache is left out (short)."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = (H * Hq * D * 2 + H * Hkv * D * 2) * 2
    router = config.num_experts * H * 2
    expert = mxfp4_bytes(2 * I, H) + mxfp4_bytes(H, I) + (3 * I + H) * 2
    routed = min(config.num_experts, config.experts_per_token * users)
    return L * (attention + router + routed * expert) + config.vocab_size * H * 2


def bandwidth(device: str) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    if not device.startswith("cuda"):
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * 10 * a.numel() / (time.perf_counter() - t0)


def transformers_decode(name: str, tokens: int, prompt_tokens: int, device: str) -> dict | None:
    """HF's GptOssForCausalLM (random bf16 weights, experts dequantised), greedy, one user."""
    try:
        import transformers
    except ImportError:
        return None
    cfg = transformers.GptOssConfig(**preset(name).to_hf_dict())
    with torch.device(device):
        model = transformers.GptOssForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), device=device)
    kwargs = dict(do_sample=False, min_new_tokens=tokens, max_new_tokens=tokens)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, **kwargs)
        sync(device)
    dt = time.perf_counter() - t0
    del model
    gc.collect()
    return {"tokens": tokens, "s": dt, "tokens_per_s": tokens / dt}


def long_context(model, name: str, args, device: str, results: list) -> list[tuple[str, str]]:
    """`context_users` users of `context`-token prompts (prefilled in chunks of 2048), decoding;
    and how many such users this GPU holds beside the weights (model.summary's plan)."""
    from inhouse.model.summary import users_at_context

    rows = []
    if device == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fit = users_at_context(model.config, model.dtype, total, args.context)
        results.append({"model": name, "kind": "capacity", "context": args.context,
                        "users": fit, "device_bytes": total})
        rows.append((f"{name} users at {args.context} tokens on this GPU", str(fit)))
    try:
        r = decode(model, "batched", args.context_users, args.context_tokens, args.context,
                   device, chunk=min(2048, args.context))
    except torch.OutOfMemoryError as e:  # said, not fatal: the other figures stand
        rows.append((f"{name} decode x{args.context_users} at {args.context} tokens",
                     f"out of memory ({str(e).splitlines()[0][:80]})"))
        return rows
    results.append(r | {"model": name, "kind": "long_context"})
    rows.append((f"{name} decode x{args.context_users} at {args.context} tokens",
                 f"{r['tokens_per_s']:.1f} tok/s"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt-oss-20b,gpt-oss-120b")
    ap.add_argument("--users", default="1,8,64")
    ap.add_argument("--modes", default="batched,reproducible")
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per user")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=32768,
                    help="the long-context run: prompt tokens per user")
    ap.add_argument("--context-users", type=int, default=4)
    ap.add_argument("--context-tokens", type=int, default=8, help="decoded in the long-context run")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny shape on CPU through Triton's interpreter (checks the script)")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.models, args.users, args.tokens, args.prefill_tokens = "tiny", "2", 2, 16
        args.context, args.context_users, args.context_tokens = 24, 2, 2
        args.modes = "reproducible"
        args.prompt_tokens, args.no_transformers = 8, True
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (or --smoke)")
    bw = bandwidth(device)
    rows, results = [("memory bandwidth (copy)", f"{bw / 1e9:.0f} GB/s")], []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model = random_model(name, device, "cuda")
        rows.append((f"{name} built on the device", f"{time.perf_counter() - t0:.0f} s"))
        if device == "cuda":  # warm-up: compiles the kernels, captures a graph
            decode(model, "batched", 1, 2, args.prompt_tokens, device)
        by_key = {}
        for users in map(int, args.users.split(",")):
            for mode in args.modes.split(","):
                r = decode(model, mode, users, args.tokens, args.prompt_tokens, device)
                bound = bw / step_bytes(model.config, users) * users
                r |= {"model": name, "bound_tokens_per_s": bound}
                results.append(r)
                by_key[mode, users] = r
                rate = r["tokens_per_s"]
                rows.append((f"{name} decode x{users} {mode}",
                             f"{rate:.1f} tok/s ({rate / bound:.0%} of bound)"))
                print(rows[-1], flush=True)
            if users == 1:  # what the CUDA graphs are worth: the same step launch by launch
                graphs, model.decode_graphs = model.decode_graphs, None
                r = decode(model, "batched", 1, args.tokens, args.prompt_tokens, device)
                model.decode_graphs = graphs
                results.append(r | {"model": name, "cuda_graphs": False})
                rows.append((f"{name} decode x1 batched, no CUDA graphs",
                             f"{r['tokens_per_s']:.1f} tok/s"))
            a, b = by_key.get(("reproducible", users)), by_key.get(("batched", users))
            if a and b and a["tokens_per_s"] and b["tokens_per_s"]:
                rows.append((f"{name} x{users} reproducible time / batched",
                             f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x"))
        p = prefill(model, args.prefill_tokens, device)
        results.append(p | {"model": name, "kind": "prefill"})
        rows.append((f"{name} prefill {args.prefill_tokens} tokens", f"{p['tokens_per_s']:.0f} tok/s"))
        rows += long_context(model, name, args, device, results)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if not args.no_transformers and name == "gpt-oss-20b":
            hf = transformers_decode(name, args.tokens, args.prompt_tokens, device)
            if hf is not None:
                results.append(hf | {"model": name, "kind": "transformers"})
                ours = by_key.get(("batched", 1), {}).get("tokens_per_s")
                rows.append((f"{name} transformers x1", f"{hf['tokens_per_s']:.1f} tok/s"
                             + (f" (ours {ours / hf['tokens_per_s']:.1f}x)" if ours else "")))
    data = {"results": results, "bandwidth_bytes_per_s": bw, "machine": machine(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"}
    report("the cuda backend (random weights)", rows, data, "gpu-smoke" if args.smoke else "gpu")


if __name__ == "__main__":
    main()
