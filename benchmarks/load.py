"""Load time, peak memory and one decode step for the gpt-oss-20b shape (random weights).

    python benchmarks/load.py [--preset gpt-oss-20b] [--dtype bfloat16] [--decode-steps 3] [--mmap]

Builds (once, cached under ~/.cache/inhouse/bench) a random checkpoint with the exact shape of
gpt-oss-20b in the HF MXFP4 layout, sharded like the hub's files; then loads it in this process
and reports load time, RSS (anonymous and file-backed), and prefill/decode times. Target: peak RSS
< 16 GiB for the 20b shape. Writes benchmarks/results/load-<preset>-<dtype>[-mmap].json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import cache_dir, ensure_random_checkpoint, machine, memory, report  # noqa: E402
from inhouse.model import load_model  # noqa: E402

GiB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--decode-steps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mmap", action="store_true",
                    help="keep the weights memory-mapped (default: read into memory at load)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = cache_dir() / f"{args.preset}-random-hf-sharded"
    ensure_random_checkpoint(path, args.preset, "hf-sharded")
    dtype = getattr(torch, args.dtype)

    before = memory()
    t0 = time.perf_counter()
    model = load_model(path, dtype=dtype, mmap=args.mmap)
    load_s = time.perf_counter() - t0
    after_load = memory()

    ids = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,),
                        generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, last_only=True)
        prefill_s = time.perf_counter() - t0
        steps = []
        for _ in range(args.decode_steps):
            token = logits[-1].argmax().view(1)
            t0 = time.perf_counter()
            logits = model(token, cache=cache)
            steps.append(time.perf_counter() - t0)
    end = memory()
    on_disk = model.source.num_bytes
    data = {
        "preset": args.preset, "dtype": args.dtype, "checkpoint": str(path), "mmap": args.mmap,
        "bytes_on_disk": on_disk, "load_s": load_s,
        "rss_after_load": after_load["VmRSS"], "rss_before_load": before["VmRSS"],
        "prefill_tokens": args.prompt_tokens, "prefill_s": prefill_s,
        "decode_step_s": steps, "decode_tokens_per_s": len(steps) / sum(steps) if steps else None,
        "rss_end": end["VmRSS"], "rss_anon_end": end["RssAnon"], "rss_file_end": end["RssFile"],
        "peak_rss": end["VmHWM"],
        # mapped: if every expert page were touched, file-backed RSS would reach the weights' size
        "worst_case_rss": end["RssAnon"] + (on_disk if args.mmap else 0),
        "threads": torch.get_num_threads(), "machine": machine(),
    }
    rows = [
        ("checkpoint", f"{args.preset}, random, hf-sharded MXFP4, {len(model.source.files)} files"),
        ("on disk", f"{on_disk / GiB:.2f} GiB"),
        ("load time", f"{load_s:.2f} s"),
        ("RSS after load", f"{after_load['VmRSS'] / GiB:.2f} GiB"),
        (f"prefill {args.prompt_tokens} tokens", f"{prefill_s:.2f} s"),
        ("decode step (mean)", f"{sum(steps) / max(len(steps), 1):.2f} s" if steps else "-"),
        ("RSS at end (anon + file)", f"{end['VmRSS'] / GiB:.2f} GiB ({end['RssAnon'] / GiB:.2f} + "
                                     f"{end['RssFile'] / GiB:.2f})"),
        ("peak RSS (VmHWM)", f"{end['VmHWM'] / GiB:.2f} GiB"),
        ("worst case (anon + all weights resident)", f"{data['worst_case_rss'] / GiB:.2f} GiB"),
        ("target", "peak RSS < 16 GiB"),
    ]
    name = f"load-{args.preset}-{args.dtype}" + ("-mmap" if args.mmap else "")
    report(f"load: {args.preset} ({args.dtype}{', mmap' if args.mmap else ''})", rows, data, name)


if __name__ == "__main__":
    main()
