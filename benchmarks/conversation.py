"""Conversations at speed (issue 20): time to first token per turn with and without prefix
caching, side by side with llama.cpp keeping its cache between turns, and decode speed with
speculative drafts as a function of their acceptance rate.

    python benchmarks/conversation.py [--turns 6] [--first 512] [--new 200] [--decode 8]
                                      [--prefill-chunk 256] [--engines llama.cpp,inhouse]
                                      [--k 4] [--rounds 3] [--skip-conversation]
                                      [--skip-drafts] [--skip-demo]

The gpt-oss-20b shape with random weights (built once, cached; the GGUF export of the same
weights for llama.cpp too, as benchmarks/cpu_vs_llamacpp.py does). The conversation is token ids:
turn 1 is `--first` tokens; each later turn adds `--new` tokens (the last answer as re-rendered,
then the user's message) after the previous turn's prompt, as harmony renders a conversation
(the answer's analysis is dropped, so what an engine decoded is not what the next prompt holds:
an engine reuses the previous prompt). Each turn then decodes `--decode` tokens greedily.

- inhouse, reproducible mode (the default), with and without prefix caching, turn by turn in one
  process; "only the new tokens" is the time the uncached run spent on the positions the turn
  added (its chunk timings, pro rata): the least a cache could leave.
- llama.cpp (llama-cpp-python, `pip install llama-cpp-python`) keeps its KV between turns and
  computes only what follows the common prefix, as its server does with `cache_prompt`.
- Drafts on the 20b shape: random weights never repeat text, so the drafts are scripted: each
  draft token is the model's own greedy continuation with probability `a` (the first wrong one
  ends it), for several `a`; and the prompt lookup on free text (acceptance about 0).
- Drafts on the trained demo model (`inhouse demo build`): real acceptance on what it repeats.

Writes benchmarks/results/conversation.json. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cache_dir, ensure_random_checkpoint, machine, report  # noqa: E402
from benchmarks.cpu_vs_llamacpp import ensure_gguf, llama_last_token, read_files  # noqa: E402

PRESET = "gpt-oss-20b"
VOCAB = 199_998


def conversation(turns: int, first: int, new: int) -> list[list[int]]:
    """The prompt of each turn: the previous one plus `new` tokens."""
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(first)]]
    for _ in range(turns - 1):
        prompts.append(prompts[-1] + [rng.randrange(VOCAB) for _ in range(new)])
    return prompts


# ---- inhouse ------------------------------------------------------------------------------------
class Scripted:
    """Drafts the model's own greedy continuation, each token right with probability `a`."""

    def __init__(self, truth: list[int], prompt_len: int, a: float, seed: int = 0) -> None:
        self.truth, self.prompt_len, self.a = truth, prompt_len, a
        self.rng = random.Random(seed)

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        at = len(token_ids) - self.prompt_len
        out = []
        for t in self.truth[at:at + k]:
            if self.rng.random() >= self.a:
                out.append((t + 1) % VOCAB)  # wrong: ends the kept run
                break
            out.append(t)
        return out


def timed_request(engine, rid: str, prompt: list[int], decode: int, drafter=None) -> dict:
    """Run one request alone; TTFT, decode time, cached tokens, per-step chunk timings."""
    from inhouse.engine import SamplingParams

    engine.add_request(rid, prompt, SamplingParams(max_tokens=decode, temperature=0.0))
    if drafter is not None:
        engine._seqs[rid].drafter = drafter
    seq = engine._seqs[rid]
    t0 = time.perf_counter()
    first, ids, chunks, cached = None, [], [], 0
    while engine.has_unfinished():
        before, t = seq.num_computed, time.perf_counter()
        outs = engine.step()
        if seq.num_computed > before and first is None:  # a prompt chunk (or its last)
            chunks.append((before, seq.num_computed, time.perf_counter() - t))
        for o in outs:
            if o.new_token_ids and first is None:
                first = time.perf_counter() - t0
            ids += o.new_token_ids
            cached = o.num_cached_tokens
    total = time.perf_counter() - t0
    return {"ttft_s": first, "decode_s": total - first, "ids": ids, "cached": cached,
            "chunks": chunks, "tokens": len(ids)}


def only_new(chunks: list, start: int, end: int) -> float:
    """Seconds the uncached run spent on positions start..end (chunk timings, pro rata)."""
    total = 0.0
    for a, b, s in chunks:
        overlap = max(0, min(b, end) - max(a, start))
        total += s * overlap / (b - a)
    return total


def inhouse_child(path: Path, threads: int, args) -> dict:
    import torch

    from inhouse.config import EngineConfig
    from inhouse.engine import LLMEngine
    from inhouse.kernels import arithmetic
    from inhouse.model import load_model

    torch.set_num_threads(threads)
    model = load_model(path, dtype=torch.bfloat16)
    prompts = conversation(args.turns, args.first, args.new)
    cfg = dict(num_draft_tokens=0, prefill_chunk=args.prefill_chunk)
    plain = LLMEngine(model, EngineConfig(prefix_caching=False, mode="reproducible", **cfg))
    cached = LLMEngine(model, EngineConfig(prefix_caching=True, mode="reproducible", **cfg))
    batched = LLMEngine(model, EngineConfig(prefix_caching=True, mode="batched", **cfg))
    timed_request(plain, "warm", prompts[0][:16], 2)  # warm-up (kernels, first allocations)
    turns = []
    for k, prompt in enumerate([] if args.skip_conversation else prompts):  # side by side
        a = timed_request(plain, f"p{k}", prompt, args.decode)
        b = timed_request(cached, f"c{k}", prompt, args.decode)
        c = timed_request(batched, f"b{k}", prompt, args.decode)
        prev = len(prompts[k - 1]) if k else 0
        turns.append({"turn": k + 1, "prompt_tokens": len(prompt), "new_tokens": len(prompt) - prev,
                      "ttft_uncached_s": a["ttft_s"], "ttft_cached_s": b["ttft_s"],
                      "cached_tokens": b["cached"], "only_new_s": only_new(a["chunks"], prev,
                                                                           len(prompt)),
                      "same_ids": a["ids"] == b["ids"],
                      "ttft_batched_cached_s": c["ttft_s"], "cached_tokens_batched": c["cached"]})
        print(f"  inhouse turn {k + 1}: {len(prompt)} tokens, TTFT {a['ttft_s']:.1f} s uncached, "
              f"{b['ttft_s']:.1f} s cached ({b['cached']} reused), batched mode "
              f"{c['ttft_s']:.1f} s ({c['cached']} reused), only-new "
              f"{turns[-1]['only_new_s']:.1f} s", flush=True)
    out = {"turns": turns, "kernels": arithmetic.path_name()}
    if not args.skip_drafts:
        out["drafts"] = drafts_20b(model, args)
    return out


def rows_cost(model, prompt: list[int]) -> dict[int, float]:
    """Seconds of a decode step that verifies M rows of one sequence (M - 1 draft tokens), the
    best of 5, for M = 1..5: what a draft costs before any of it is kept."""
    import torch

    out = {}
    with torch.inference_mode():
        cache = model.new_cache()
        model(torch.tensor(prompt), cache=cache, last_only=True)
        n0 = cache.num_tokens
        rng = random.Random(2)
        for M in range(1, 6):
            best = float("inf")
            for _ in range(5):
                rows = [(torch.tensor([rng.randrange(VOCAB)]), cache) for _ in range(M)]
                t = time.perf_counter()
                model.forward_batch(rows, independent=True)
                best = min(best, time.perf_counter() - t)
                cache.truncate(n0)
            out[M] = best
            print(f"  a step of {M} rows of one sequence: {best * 1000:.0f} ms", flush=True)
    return out


def drafts_20b(model, args) -> dict:
    """Decode tokens/s of one sequence: without drafts, with scripted drafts at several
    acceptance rates, and with the prompt lookup on free text (random tokens)."""
    from inhouse.config import EngineConfig
    from inhouse.engine import LLMEngine

    rng = random.Random(1)
    prompt = [rng.randrange(VOCAB) for _ in range(64)]
    n = args.draft_decode
    cost = rows_cost(model, prompt)

    def engine(drafts: int) -> LLMEngine:
        return LLMEngine(model, EngineConfig(mode="reproducible", num_draft_tokens=drafts,
                                             prefix_caching=False))

    truth = timed_request(engine(0), "truth", prompt, n)["ids"]
    configs = [("off", None)] + [("scripted", a) for a in args.acceptance] + [("lookup", None)]
    best: dict[tuple, dict] = {}
    for rnd in range(args.rounds):  # alternated, best of the rounds: the machine is shared
        for kind, a in configs:
            eng = engine(0 if kind == "off" else args.k)
            drafter = Scripted(truth, len(prompt), a, seed=rnd) if kind == "scripted" else None
            r = timed_request(eng, f"{kind}{a}", prompt, n, drafter)
            assert r["ids"] == truth, "drafts changed the output"
            tok_s = (n - 1) / r["decode_s"]  # the first token is the prompt's
            row = {"drafts": {"off": "off", "scripted": f"scripted, up to {args.k}",
                              "lookup": f"prompt lookup up to {args.k}, free text"}[kind],
                   "acceptance": a if kind == "scripted" else (
                       None if kind == "off" else (eng.num_draft_kept / eng.num_draft_tokens
                                                   if eng.num_draft_tokens else 0.0)),
                   "kept": eng.num_draft_kept, "drafted": eng.num_draft_tokens, "tok_s": tok_s}
            if (kind, a) not in best or tok_s > best[(kind, a)]["tok_s"]:
                best[(kind, a)] = row
            print(f"  round {rnd + 1}, drafts {row['drafts']}, acceptance {a}: {tok_s:.2f} "
                  f"tok/s (kept {eng.num_draft_kept}/{eng.num_draft_tokens})", flush=True)
    rows = [best[c] for c in configs]
    return {"decode_tokens": n, "k": args.k, "rows": rows, "rows_cost_s": cost}


# ---- llama.cpp ----------------------------------------------------------------------------------
def llamacpp_child(path: Path, threads: int, args) -> dict:
    import llama_cpp

    prompts = conversation(args.turns, args.first, args.new)
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompts[-1]) + args.decode + 8, n_batch=512,
                          n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    memory = llama_cpp.llama_get_memory(llm.ctx)
    last_token = lambda: llama_last_token(llm)  # noqa: E731

    llm.eval(prompts[0][:8])  # warm-up, then a fresh context
    llm.reset()
    llama_cpp.llama_memory_clear(memory, True)
    turns, kept = [], 0
    for k, prompt in enumerate(prompts):
        # keep the common prefix (the previous prompt), as the server's cache_prompt does
        llama_cpp.llama_memory_seq_rm(memory, -1, kept, -1)
        llm.n_tokens = kept
        t = time.perf_counter()
        llm.eval(prompt[kept:])
        tok = last_token()
        ttft = time.perf_counter() - t
        for _ in range(args.decode - 1):
            llm.eval([tok])
            tok = last_token()
        turns.append({"turn": k + 1, "ttft_s": ttft, "reused": kept})
        print(f"  llama.cpp turn {k + 1}: TTFT {ttft:.1f} s ({kept} reused)", flush=True)
        kept = len(prompt)
    return {"turns": turns}


# ---- the demo model: real acceptance ------------------------------------------------------------
def demo_drafts() -> dict:
    """Acceptance and speed of the prompt lookup on the trained demo model (bf16, so that its
    decode step verifies drafts in one call, as the 20b's does), on what it repeats: a sentence
    quoted back, a tool call that quotes the city from the question. Each answer is whole (reasoning, then the answer)."""
    import torch

    from inhouse.config import EngineConfig
    from inhouse.convert.demo import trained_demo_path
    from inhouse.engine import LLMEngine, SamplingParams
    from inhouse.harmony.conversation import ChatMessage, PromptOptions
    from inhouse.harmony.conversation import render_prompt, stop_token_ids
    from inhouse.model import load_model
    from inhouse.train.demo import WEATHER

    path = trained_demo_path()
    if not (path / "config.json").is_file():
        raise SystemExit("the demo model is not built: inhouse demo build (or --skip-demo)")
    model = load_model(path, dtype=torch.bfloat16)
    opts = PromptOptions("low", "2026-12-03")
    tasks = {
        "quoting a sentence": ([ChatMessage("user", "Repeat after me: The meeting in Oslo "
                                                    "starts at 7 o'clock.")], opts),
        "quoting another": ([ChatMessage("user", "Quote this exactly: Flight 12 to Lima leaves "
                                                 "from gate 30.")], opts),
        "weather call quoting the city": ([ChatMessage("user", "What is the weather in Montreal?")],
                                          PromptOptions("low", "2026-12-03", tools=(WEATHER,))),
    }
    rows = []
    for name, (messages, options) in tasks.items():
        prompt = render_prompt(messages, options)
        res = {}
        for drafts in (0, 4):
            eng = LLMEngine(model, EngineConfig(mode="reproducible", num_draft_tokens=drafts,
                                                prefix_caching=False))
            times, ids = [], None
            for rep in range(5):
                eng.add_request(f"r{rep}", prompt, SamplingParams(
                    max_tokens=120, temperature=0.0, stop_token_ids=tuple(stop_token_ids())))
                t, out = time.perf_counter(), []
                while eng.has_unfinished():
                    for o in eng.step():
                        out += o.new_token_ids
                times.append(time.perf_counter() - t)
                ids = out
            res[drafts] = (ids, min(times), eng.num_draft_kept, eng.num_draft_tokens)
        (ids0, t0, _, _), (ids4, t4, kept, drafted) = res[0], res[4]
        assert ids0 == ids4, "drafts changed the output"
        rows.append({"task": name, "tokens": len(ids0), "acceptance": kept / drafted if drafted
                     else 0.0, "drafted": drafted, "tok_s_off": len(ids0) / t0,
                     "tok_s_on": len(ids4) / t4, "speedup": t0 / t4})
        print(f"  demo, {name}: {len(ids0)} tokens, acceptance {rows[-1]['acceptance']:.2f}, "
              f"{rows[-1]['tok_s_off']:.0f} -> {rows[-1]['tok_s_on']:.0f} tok/s", flush=True)
    return {"rows": rows}


# ---- parent -------------------------------------------------------------------------------------
def child(args) -> None:
    fn = llamacpp_child if args.child == "llama.cpp" else inhouse_child
    print("RESULT " + json.dumps(fn(Path(args.path), args.threads, args)), flush=True)


def run_child(engine: str, path: Path, argv: list[str]) -> dict:
    read_files(path)  # a warm page cache for either engine
    proc = subprocess.run([sys.executable, __file__, "--child", engine, "--path", str(path),
                           *argv], stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    for line in proc.stdout.splitlines():
        if not line.startswith("RESULT "):
            print(line, flush=True)
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{engine} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--first", type=int, default=512, help="turn 1's prompt tokens")
    ap.add_argument("--new", type=int, default=200, help="tokens each later turn adds")
    ap.add_argument("--decode", type=int, default=8, help="tokens decoded per turn")
    ap.add_argument("--prefill-chunk", type=int, default=256,
                    help="the engine's prefill chunk (reproducible mode reuses whole chunks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="llama.cpp,inhouse")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--acceptance", type=float, nargs="*", default=[0.0, 0.5, 0.7, 0.9, 1.0])
    ap.add_argument("--draft-decode", type=int, default=48, help="tokens decoded per draft run")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the draft runs")
    ap.add_argument("--skip-drafts", action="store_true")
    ap.add_argument("--skip-conversation", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    argv = sys.argv[1:]
    engines = args.engines.split(",")
    hf = cache_dir() / f"{PRESET}-random-hf-sharded"
    ensure_random_checkpoint(hf, PRESET, "hf-sharded")
    results: dict = {"machine": machine(), "args": {k: v for k, v in vars(args).items()
                                                      if k not in ("child", "path")}}
    if "inhouse" in engines:
        print("inhouse (reproducible mode), uncached and cached turn by turn:", flush=True)
        results["inhouse"] = run_child("inhouse", hf, argv)
    if "llama.cpp" in engines:
        gguf = ensure_gguf(hf)
        print("llama.cpp, keeping its cache between turns:", flush=True)
        results["llama.cpp"] = run_child("llama.cpp", gguf, argv)
    if not args.skip_demo:
        print("demo model, prompt lookup:", flush=True)
        results["demo"] = demo_drafts()
    report("conversation at speed: " + PRESET + " shape (random weights), "
           f"{args.threads} threads", rows(results), results, "conversation")


def rows(results: dict) -> list[tuple[str, str]]:
    out = []
    ours = results.get("inhouse", {}).get("turns", [])
    theirs = {t["turn"]: t for t in results.get("llama.cpp", {}).get("turns", [])}
    for t in ours:
        line = (f"{t['ttft_uncached_s']:.1f} -> {t['ttft_cached_s']:.1f} s "
                f"({t['cached_tokens']} reused; only-new {t['only_new_s']:.1f} s, "
                f"{t['ttft_cached_s'] / t['only_new_s']:.2f}x)")
        line += (f"; batched mode {t['ttft_batched_cached_s']:.1f} s "
                 f"({t['cached_tokens_batched']} reused)")
        if t["turn"] in theirs:
            lc = theirs[t["turn"]]["ttft_s"]
            line += f"; llama.cpp {lc:.1f} s ({lc / t['ttft_cached_s']:.2f}x ours)"
        out.append((f"turn {t['turn']} TTFT ({t['prompt_tokens']} tokens, "
                    f"{t['new_tokens']} new)", line))
    for m, s in results.get("inhouse", {}).get("drafts", {}).get("rows_cost_s", {}).items():
        one = results["inhouse"]["drafts"]["rows_cost_s"]["1"]
        out.append((f"20b step verifying {m} rows of one sequence", f"{s * 1000:.0f} ms "
                    f"({s / one:.2f}x one row)"))
    for r in results.get("inhouse", {}).get("drafts", {}).get("rows", []):
        base = results["inhouse"]["drafts"]["rows"][0]["tok_s"]
        what = r["drafts"] + ("" if r["acceptance"] is None else f", acceptance {r['acceptance']:.2f}")
        out.append((f"20b decode, {what}", f"{r['tok_s']:.2f} tok/s ({r['tok_s'] / base:.2f}x)"))
    for r in results.get("demo", {}).get("rows", []):
        out.append((f"demo, {r['task']} ({r['tokens']} tokens)",
                    f"acceptance {r['acceptance']:.2f}: {r['tok_s_off']:.0f} -> "
                    f"{r['tok_s_on']:.0f} tok/s ({r['speedup']:.2f}x)"))
    return out


if __name__ == "__main__":
    main()
