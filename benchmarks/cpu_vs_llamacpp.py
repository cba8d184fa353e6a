"""inhouse against llama.cpp on this CPU, same weights: decode, prompt, time to first token, RSS.

    python benchmarks/cpu_vs_llamacpp.py [--rounds 2] [--prompt 512] [--decode 64] [--int8]
                                         [--batch 8] [--engines llama.cpp,inhouse]

Builds (once, cached) the random checkpoint of the exact gpt-oss-20b shape, exports the same
weights to GGUF with inhouse's exporter (`inhouse convert --layout gguf`; MXFP4 experts stay MXFP4,
bf16 stays bf16), and runs llama.cpp (the `llama-cpp-python` package, installed only for this:
`pip install llama-cpp-python`, which compiles llama.cpp for this CPU) and inhouse alternately,
each in a child process of its own (so peak RSS is its own), each after reading its weight files
once so both start from a warm page cache. Both decode greedily from a random prompt, one token
per step, with the same thread count; no sampling, no server: the model loop only.

It also measures this machine's read bandwidth and prints each engine's decode speed as a share of
the bandwidth bound (bytes one decoded token must read / bandwidth). inhouse also decodes `--batch`
sequences together (aggregate tokens/s, against its own batch 1); that is bound by arithmetic as
much as by bytes, so the table gives the bf16 model's share of the compute bound too
(multiply-adds per token / the rate of our bf16 kernel on that many rows from cache). Decode speed is given twice:
over the whole run (the target's figure), and at the median step, which a burst of the shared
machine's load moves less. Writes
benchmarks/results/cpu_vs_llamacpp.json. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cache_dir, ensure_random_checkpoint, machine, memory, report  # noqa: E402

PRESET = "gpt-oss-20b"


def read_files(path: Path) -> float:
    """Read every file under `path` once (page cache warm-up); returns the seconds it took."""
    t = time.perf_counter()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t


def bandwidth_gbs(threads: int) -> float:
    """Best of 15 full reads of a 1 GiB buffer (a sum over all threads), GB/s. On a shared
    machine a neighbour's load lowers it; the best of many is the closest to the hardware."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(15):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def weights_per_token() -> dict[str, int]:
    """The weights one decoded token reads, by kind: attention and router per layer times the
    layers, the routed experts' (experts_per_token of them), the unembedding."""
    from inhouse.config import preset

    c = preset(PRESET)
    H, D, I, L = c.hidden_size, c.head_dim, c.intermediate_size, c.num_hidden_layers
    return {"attention": L * (H * c.num_attention_heads * D * 2 + H * c.num_key_value_heads * D * 2),
            "router": L * c.num_experts * H,
            "experts": L * c.experts_per_token * 3 * H * I,
            "unembedding": c.vocab_size * H}


def bytes_per_token(int8: bool) -> int:
    """Weight bytes one decoded token reads: attention and unembedding (bf16, or int8 rows), the
    router (bf16) and the routed experts (MXFP4: 17 bytes per 32 weights)."""
    n = weights_per_token()
    w = 1 if int8 else 2
    return (n["attention"] + n["unembedding"]) * w + n["router"] * 2 + n["experts"] * 17 // 32


def macs_per_token() -> int:
    """Multiply-adds of one decoded token: every weight it reads, once."""
    return sum(weights_per_token().values())


# ---- children: one engine each ----------------------------------------------------------------

def llama_last_token(llm) -> int:
    """The greedy next token from llama.cpp's logits at the last position it evaluated."""
    import ctypes

    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                   shape=(llm.n_vocab(),))
    return int(logits.argmax())


def run_llamacpp(path: Path, threads: int, prompt: list[int], decode: int) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + decode + 8, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    last_token = lambda: llama_last_token(llm)  # noqa: E731
    llm.eval(prompt[:8])  # warm-up (graph allocation), then a fresh context
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    t = time.perf_counter()
    llm.eval(prompt)
    tok = last_token()
    ttft = time.perf_counter() - t
    steps = []
    for _ in range(decode):
        t = time.perf_counter()
        llm.eval([tok])
        tok = last_token()
        steps.append(time.perf_counter() - t)
    return {"load_s": load_s, "ttft_s": ttft, "decode_s": sum(steps), "steps_s": steps}


def compute_gmacs(threads: int, rows: int) -> float:
    """The best rate, GMAC/s, of our bf16 decode kernel on `rows` rows against a matrix that
    stays in cache (1024 x 2880): what the cores can multiply when memory is not the limit."""
    import torch

    from inhouse.kernels.cpu import dense_kernel

    torch.set_num_threads(threads)
    w = torch.randn(1024, 2880).bfloat16()
    x = torch.randn(rows, 2880).bfloat16()
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        for _ in range(20):
            dense_kernel.bf16_matmul(x, w, None, torch.bfloat16)
        best = min(best, (time.perf_counter() - t) / 20)
    return w.numel() * rows / best / 1e9


def batch_decode(model, batch: int, steps: int, seed: int = 1) -> float:
    """Aggregate tokens/s of `batch` sequences (16-token random prompts) decoded together, one
    token each per step (the engine's batched forward), over `steps` steps."""
    import random

    import torch

    rng = random.Random(seed)
    caches = [model.new_cache() for _ in range(batch)]
    toks = []
    for cache in caches:
        ids = torch.tensor([rng.randrange(0, 199998) for _ in range(16)])
        toks.append(model(ids, cache=cache, last_only=True)[-1].argmax().view(1))
    t = time.perf_counter()
    for _ in range(steps):
        logits = model.forward_batch(list(zip(toks, caches)))
        toks = [row.argmax().view(1) for row in logits]
    return batch * steps / (time.perf_counter() - t)


def run_inhouse(path: Path, threads: int, prompt: list[int], decode: int,
                batch: int = 8) -> dict:
    import torch

    from inhouse.kernels import arithmetic
    from inhouse.model import load_model

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_model(path, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    ids = torch.tensor(prompt)
    with torch.inference_mode():
        model(ids[:8], cache=model.new_cache(), last_only=True)  # warm-up
        cache = model.new_cache()
        t = time.perf_counter()
        tok = model(ids, cache=cache, last_only=True)[-1].argmax()
        ttft = time.perf_counter() - t
        steps = []
        for _ in range(decode):
            t = time.perf_counter()
            tok = model(tok.view(1), cache=cache)[-1].argmax()
            steps.append(time.perf_counter() - t)
        batch_tok_s = batch_decode(model, batch, 16) if batch > 1 else None
    return {"load_s": load_s, "ttft_s": ttft, "decode_s": sum(steps), "steps_s": steps,
            "kernels": arithmetic.path_name(), "batch": batch, "batch_tok_s": batch_tok_s}


def child(args) -> None:
    import random

    rng = random.Random(0)
    prompt = [rng.randrange(0, 199998) for _ in range(args.prompt)]
    if args.child == "llama.cpp":
        out = run_llamacpp(Path(args.path), args.threads, prompt, args.decode)
    else:
        out = run_inhouse(Path(args.path), args.threads, prompt, args.decode, args.batch)
    out |= {"prompt_tokens": args.prompt, "decode_tokens": args.decode,
            "peak_rss": memory()["VmHWM"]}
    print("RESULT " + json.dumps(out), flush=True)


# ---- parent -----------------------------------------------------------------------------------

def ensure_gguf(hf: Path) -> Path:
    """The GGUF export of the random checkpoint `hf` (llama.cpp's copy of the same weights),
    written once and cached."""
    gguf = cache_dir() / f"{PRESET}-random.gguf"
    if not gguf.is_file():
        from inhouse.convert.gguf import export_gguf
        print(f"exporting the same weights to {gguf} (once) ...", flush=True)
        export_gguf(hf, gguf)
    return gguf


def prepare(args) -> dict[str, Path]:
    hf = cache_dir() / f"{PRESET}-random-hf-sharded"
    ensure_random_checkpoint(hf, PRESET, "hf-sharded")
    paths = {"inhouse": hf}
    if args.int8:
        int8 = cache_dir() / f"{PRESET}-random-int8"
        if not (int8 / "config.json").is_file():
            from inhouse.convert.convert import convert
            print(f"converting to int8 attention/unembedding in {int8} (once) ...", flush=True)
            convert(hf, int8, "hf-sharded", quantize="int8")
        paths["inhouse-int8"] = int8
    paths["llama.cpp"] = ensure_gguf(hf)
    return {e: paths[e] for e in args.engines.split(",") + (["inhouse-int8"] if args.int8 else [])}


def measure(engine: str, path: Path, args) -> dict:
    warm = read_files(path)
    cmd = [sys.executable, __file__, "--child", "llama.cpp" if engine == "llama.cpp" else "inhouse",
           "--path", str(path), "--threads", str(args.threads), "--prompt", str(args.prompt),
           "--decode", str(args.decode), "--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(lines[-1][len("RESULT "):])
    r |= {"engine": engine, "warm_read_s": warm,
          "decode_tok_s": r["decode_tokens"] / r["decode_s"],
          # the median step: what a run's decode speed is between the machine's load bursts
          "decode_tok_s_median": 1 / statistics.median(r["steps_s"]),
          "prompt_tok_s": r["prompt_tokens"] / r["ttft_s"]}
    print(f"  {engine}: decode {r['decode_tok_s']:.2f} tok/s (median step "
          f"{r['decode_tok_s_median']:.2f}), prompt {r['prompt_tok_s']:.1f} tok/s, "
          f"TTFT {r['ttft_s']:.1f} s, peak RSS {r['peak_rss'] / 2**30:.1f} GiB"
          + (f", batch {r['batch']}: {r['batch_tok_s']:.2f} tok/s" if r.get("batch_tok_s") else ""),
          flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the engines")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (pp512)")
    ap.add_argument("--decode", type=int, default=64, help="decoded tokens per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="llama.cpp,inhouse")
    ap.add_argument("--int8", action="store_true",
                    help="also inhouse with int8 attention/unembedding (converted once, cached)")
    ap.add_argument("--batch", type=int, default=8,
                    help="inhouse also decodes this many sequences together (0: skip)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if "llama.cpp" in args.engines:
        try:
            import llama_cpp  # noqa: F401
        except ModuleNotFoundError:
            raise SystemExit("llama.cpp is run through llama-cpp-python, installed only for this "
                             "benchmark: pip install llama-cpp-python (compiles llama.cpp, ~7 "
                             "minutes on 2 cores)") from None
    paths = prepare(args)
    bw = bandwidth_gbs(args.threads)
    gmacs = compute_gmacs(args.threads, max(args.batch, 1))
    print(f"read bandwidth: {bw:.1f} GB/s; {max(args.batch, 1)}-row bf16 kernel from cache: "
          f"{gmacs:.0f} GMAC/s", flush=True)
    runs: dict[str, list[dict]] = {e: [] for e in paths}
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}", flush=True)
        for engine, path in paths.items():
            runs[engine].append(measure(engine, path, args))
    keys = ("decode_tok_s", "decode_tok_s_median", "prompt_tok_s", "ttft_s", "peak_rss",
            "batch_tok_s")
    best = {e: {k: (max if "tok_s" in k else min)(r[k] for r in rs)
                for k in keys if all(r.get(k) is not None for r in rs)}
            for e, rs in runs.items()}
    base = best.get("llama.cpp")
    macs = macs_per_token()
    rows = [("read bandwidth (GB/s)", f"{bw:.1f}"),
            (f"{max(args.batch, 1)}-row bf16 kernel from cache (GMAC/s)", f"{gmacs:.0f}")]
    for e, b in best.items():
        need = bytes_per_token(e == "inhouse-int8")
        bound = bw * 1e9 / need
        ratio = f" ({b['decode_tok_s'] / base['decode_tok_s']:.2f}x)" if base and e != "llama.cpp" else ""
        pratio = f" ({b['prompt_tok_s'] / base['prompt_tok_s']:.2f}x)" if base and e != "llama.cpp" else ""
        mratio = (f" ({b['decode_tok_s_median'] / base['decode_tok_s_median']:.2f}x)"
                  if base and e != "llama.cpp" else "")
        rows += [(f"{e}: decode tok/s", f"{b['decode_tok_s']:.2f}{ratio}"),
                 (f"{e}: decode tok/s at the median step", f"{b['decode_tok_s_median']:.2f}{mratio}"),
                 (f"{e}: share of bandwidth bound ({need / 1e9:.2f} GB/token, {bound:.1f} tok/s)",
                  f"{b['decode_tok_s'] / bound:.0%}"),
                 (f"{e}: prompt tok/s ({args.prompt} tokens)", f"{b['prompt_tok_s']:.1f}{pratio}"),
                 (f"{e}: time to first token (s)", f"{b['ttft_s']:.1f}"),
                 (f"{e}: peak RSS (GiB)", f"{b['peak_rss'] / 2**30:.1f}")]
        if "batch_tok_s" in b:  # its own batch 1 is the base; the cores' rate bounds it
            cbound = gmacs * 1e9 / macs
            rows += [(f"{e}: batch-{args.batch} decode tok/s (all sequences)",
                      f"{b['batch_tok_s']:.2f} ({b['batch_tok_s'] / b['decode_tok_s']:.2f}x)")]
            if e == "inhouse":  # the bound is the bf16 kernel's rate; int8's kernels differ
                rows += [(f"{e}: batch-{args.batch} share of the compute bound "
                          f"({macs / 1e9:.2f} GMAC/token, {cbound:.1f} tok/s)",
                          f"{b['batch_tok_s'] / cbound:.0%}")]
    data = {"bandwidth_gbs": bw, "kernel_gmacs": gmacs, "macs_per_token": macs,
            "batch": args.batch, "best": best, "runs": runs, "machine": machine(),
            "threads": args.threads, "prompt_tokens": args.prompt, "decode_tokens": args.decode,
            "bytes_per_token": {e: bytes_per_token(e == "inhouse-int8") for e in paths}}
    report(f"inhouse vs llama.cpp, {PRESET} shape, random weights, {args.threads} threads (best "
           f"of {args.rounds})", rows, data, "cpu_vs_llamacpp")


if __name__ == "__main__":
    main()
