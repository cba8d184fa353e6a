"""The `inhouse` command line. Each command parses options and calls one library function;
errors become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from inhouse import __version__
from inhouse.cli.audit import audit_app
from inhouse.cli.finetune import finetune
from inhouse.cli.docs import docs_app
from inhouse.cli.keys import keys_app
from inhouse.cli.tools import tools_app
from inhouse.cli.common import DType, Effort, cli_errors, open_engine, out
from inhouse.errors import InhouseError

app = typer.Typer(help="inhouse: run gpt-oss models on your own hardware, privately and auditably.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
demo_app = typer.Typer(help="Demo checkpoints that need no download.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.add_typer(tools_app, name="tools")
app.add_typer(docs_app, name="docs")
app.command()(finetune)

# --mmap of the commands that load a model (serve, generate, chat)
MmapOption = Annotated[bool, typer.Option(help="Keep the weights memory-mapped: pages load on "
                                          "first use and the OS may drop them (less RAM than the "
                                          "model). Default: read into memory at load.")]

def _gib(n: int) -> str:
    if n >= 2**28:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


GPU_80GB = 80 * 10**9  # an H100's or A100's memory, as their makers count it


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


@app.command()
@cli_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="Checkpoint directory (HF or original/ layout).")],
    dtype: Annotated[DType, typer.Option(help="Compute dtype the memory estimate assumes.")] = DType.bfloat16,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a checkpoint's layout, shape, parameter counts, size on disk and memory needs."""
    from inhouse.model.summary import summarize, users_at_context

    s = summarize(path, dtype.torch)
    c = s.config
    report = {
        "path": str(s.info.root), "layout": s.info.layout, "experts": s.info.experts_format,
        "files": len(s.info.files), "bytes_on_disk": s.info.num_bytes,
        "layers": c.num_hidden_layers, "sliding_layers": sum(map(c.is_sliding, range(c.num_hidden_layers))),
        "sliding_window": c.sliding_window, "experts_total": c.num_experts,
        "experts_per_token": c.experts_per_token, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "attention_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
        "context": c.max_position_embeddings, "rope_scaling_factor": c.rope_scaling_factor,
        "params_total": s.counts.total, "params_active": s.counts.active, "dtype": dtype.value,
        "ram_weights_bytes": s.ram_bytes, "kv_bytes_per_token": s.kv_bytes_per_token,
        "kv_sliding_bytes": s.kv_sliding_bytes,
        "gpu_80gb_users": {str(n): users_at_context(c, dtype.torch, GPU_80GB, n,
                                                    s.info.experts_format)
                           for n in sorted({min(32768, c.max_position_embeddings),
                                            c.max_position_embeddings})},
    }
    if as_json:
        out.print_json(json.dumps(report))
        return
    t = Table(title=f"checkpoint {s.info.root}", show_header=False)
    t.add_row("layout", f"{s.info.layout} ({s.info.experts_format} experts), {len(s.info.files)} file(s)")
    t.add_row("on disk", _gib(s.info.num_bytes))
    t.add_row("layers", f"{c.num_hidden_layers} ({report['sliding_layers']} sliding, window {c.sliding_window})")
    t.add_row("experts", f"{c.num_experts}, top-{c.experts_per_token}")
    t.add_row("hidden / intermediate", f"{c.hidden_size} / {c.intermediate_size}")
    t.add_row("attention", f"{c.num_attention_heads} q heads, {c.num_key_value_heads} kv heads x {c.head_dim}")
    t.add_row("vocab / context", f"{c.vocab_size} / {c.max_position_embeddings} (YaRN x{c.rope_scaling_factor:g})")
    t.add_row("parameters", f"{_billions(s.counts.total)} total, {_billions(s.counts.active)} active per token")
    t.add_row(f"RAM for weights ({dtype.value})", _gib(s.ram_bytes))
    t.add_row("KV cache", f"{s.kv_bytes_per_token / 1024:.1f} KiB per token + "
              f"{_gib(s.kv_sliding_bytes)} for the sliding windows")
    t.add_row("one 80 GB GPU (--device cuda)", ", ".join(
        f"{users} users at {n / 1024:g}k tokens" for n, users in
        ((int(n), u) for n, u in report["gpu_80gb_users"].items())))
    out.print(t)


@app.command()
@cli_errors
def convert(
    src: Annotated[Path, typer.Argument(help="Source checkpoint (HF or original/ layout).")],
    dst: Annotated[Path, typer.Argument(help="New directory to write (must not hold files); "
                                        "for gguf, the new .gguf file.")],
    layout: Annotated[str, typer.Option(help="hf, hf-sharded, hf-bf16 (dense experts), original, "
                                        "or gguf (one file for llama.cpp, same weights).")] = "hf",
    merge_adapter: Annotated[Path | None, typer.Option(help="LoRA adapter (PEFT format) to fold into the weights.")] = None,
    quantize: Annotated[str, typer.Option(help="none; mxfp4 (dense experts -> MXFP4); int8 "
                                          "(attention and unembedding -> int8 rows).")] = "none",
) -> None:
    """Convert a checkpoint: between layouts, with a LoRA adapter merged, re-quantised, or to GGUF."""
    from inhouse.convert.convert import convert as run

    if layout == "gguf":
        from inhouse.convert.gguf import export_gguf

        if merge_adapter or quantize != "none":
            raise InhouseError("--layout gguf exports a checkpoint as it is: merge or quantise "
                               "into a new checkpoint first, then export that")
        out.print(f"wrote {export_gguf(src, dst)} (gguf)")
        return
    root = run(src, dst, layout, merge_adapter, quantize)
    out.print(f"wrote {root} ({layout}" + (f", merged {merge_adapter}" if merge_adapter else "")
              + (f", quantize {quantize}" if quantize != "none" else "") + ")")


@demo_app.command("build")
@cli_errors
def demo_build(
    path: Annotated[Path | None, typer.Option(help="Where to write it (default: the cache, "
                                              "where serve and chat find it).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 450,
    seed: Annotated[int, typer.Option(help="Seed of the weights, the data and the batches.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even if it is already built.")] = False,
) -> None:
    """Train the embedded demo model (seeded; a few minutes on 2 cores; cached)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from inhouse.convert.demo import trained_demo_path
    from inhouse.train.demo import build_demo

    target = path or trained_demo_path()
    if (target / "config.json").is_file() and not force:
        out.print(f"the demo model is already built in {target} (--force rebuilds it)")
        _demo_extras()
        return
    columns = (TextColumn("[bold]demo build"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    with Progress(*columns, console=out) as progress:
        task = progress.add_task("train", total=steps, loss="-")
        root = build_demo(target, steps, seed, on_step=lambda s, n, loss: progress.update(
            task, completed=s, loss=f"{loss:.3f}"))
    out.print(f"wrote the demo model to {root}")
    _demo_extras()


def _demo_extras() -> None:
    """The sample documents in the server's index (tenant 'local', collection 'demo') and the
    sample policy in the cache: what the demo learned to search and to judge."""
    from inhouse.config import cache_root
    from inhouse.governance.responses_store import default_url
    from inhouse.tools.documents import DocumentStore
    from inhouse.train.demo_tools import POLICY, index_demo_documents

    n = index_demo_documents(DocumentStore(default_url(cache_root())))
    path = demo_policy_path()
    path.write_text(POLICY)
    out.print(f"indexed {n} sample documents (tenant local, collection demo); sample policy: {path}")


def demo_policy_path() -> Path:
    from inhouse.config import cache_root

    return cache_root() / "demo-policy.md"


@demo_app.command("policy")
@cli_errors
def demo_policy() -> None:
    """Print the path of the sample policy the demo model judges (written if missing), for
    `serve --policy`."""
    path = demo_policy_path()
    if not path.is_file():
        _demo_extras()
    out.print(str(path), markup=False, highlight=False, soft_wrap=True)


@demo_app.command("random")
@cli_errors
def demo_random(
    path: Annotated[Path, typer.Argument(help="Directory to write (replaced if it exists).")],
    preset: Annotated[str, typer.Option(help="Shape: tiny, tiny-window128, gpt-oss-20b, gpt-oss-120b.")] = "tiny",
    layout: Annotated[str, typer.Option(help="hf, hf-sharded, hf-bf16 or original.")] = "hf",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same weights in every layout.")] = 0,
) -> None:
    """Write a random checkpoint in a real gpt-oss layout (for tests, benchmarks, smoke checks)."""
    from inhouse.config import preset as get_preset
    from inhouse.convert import LAYOUTS, write_random_checkpoint

    if layout not in LAYOUTS:
        raise InhouseError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = write_random_checkpoint(path, get_preset(preset), layout, seed)
    out.print(f"wrote random {preset} checkpoint ({layout}) to {root}")


@demo_app.command("run")
@cli_errors
def demo_run(
    path: Annotated[Path | None, typer.Option(help="Demo checkpoint directory (built if missing).")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="Tokens to decode.")] = 32,
) -> None:
    """Build (once, cached) a tiny random checkpoint, inspect it and decode from it greedily."""
    import torch

    from inhouse.config import preset
    from inhouse.convert import write_random_checkpoint
    from inhouse.convert.demo import demo_checkpoint
    from inhouse.model import load_model
    from inhouse.model.generate import greedy

    if path is None:
        path = demo_checkpoint()
    elif not (path / "config.json").is_file():
        out.print(f"building the demo checkpoint in {path} ...")
        write_random_checkpoint(path, preset("tiny"), "hf", seed=0)
    inspect(path, DType.float32, False)
    model = load_model(path, dtype=torch.float32)
    prompt = [200006, 1428, 200008, 13225, 200007, 200006, 173781]  # ids only: random weights
    t0 = time.perf_counter()
    ids = greedy(model, prompt, tokens)
    dt = time.perf_counter() - t0
    out.print(f"greedy decode of {len(ids)} tokens from a {len(prompt)}-token prompt: "
              f"{len(ids) / dt:.1f} tokens/s")
    out.print(f"ids: {ids}")
    out.print("[dim]This is a random demo checkpoint: the ids carry no meaning. It checks the runtime "
              "end to end with no download.[/dim]")


@app.command()
@cli_errors
def generate(
    prompt: Annotated[str, typer.Option(help="The user message.")],
    model: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: the demo).")] = None,
    system: Annotated[str | None, typer.Option(help="Instructions (rendered as the developer message).")] = None,
    reasoning: Annotated[Effort, typer.Option(help="Reasoning effort.")] = Effort.medium,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 512,
    temperature: Annotated[float, typer.Option(min=0, max=2, help="0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="Nucleus sampling.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed: the same seed gives the same output.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print reasoning, answer, tool calls, "
                                          "token counts and timings as JSON.")] = False,
    dtype: Annotated[DType, typer.Option(help="Compute dtype.")] = DType.bfloat16,
    mmap: MmapOption = False,
) -> None:
    """Answer one prompt and exit (scriptable)."""
    from inhouse.cli.chat import one_turn
    from inhouse.engine import SamplingParams
    from inhouse.harmony import ChatMessage, PromptOptions

    messages = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user", prompt)]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    client, label = open_engine(model, dtype, quiet=as_json, mmap=mmap)
    try:
        result = one_turn(client, messages, PromptOptions(reasoning.value), params,
                          show_reasoning=False, stream=not as_json)
    finally:
        client.shutdown()
    if as_json:
        f = result.finished
        out.print_json(json.dumps({
            "model": label, "reasoning": result.output.reasoning, "content": result.output.content,
            "tool_calls": [{"name": c.name, "arguments": c.arguments, "valid_json": c.arguments_valid}
                           for c in result.output.tool_calls],
            "finish_reason": f.finish_reason, "warnings": result.output.warnings, "seed": f.seed,
            "usage": {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                      "reasoning_tokens": f.reasoning_tokens},
            "timings": {"time_to_first_token_s": round(f.time_to_first_token_s, 4),
                        "total_s": round(f.total_s, 4),
                        "tokens_per_s": round(f.completion_tokens / f.total_s, 2) if f.total_s else None},
        }, ensure_ascii=False))


@app.command()
@cli_errors
def chat(
    model: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: the demo).")] = None,
    system: Annotated[str | None, typer.Option(help="Instructions for the whole chat.")] = None,
    reasoning: Annotated[Effort, typer.Option(help="Reasoning effort (change with /effort).")] = Effort.medium,
    show_reasoning: Annotated[bool, typer.Option(help="Stream the reasoning, dimmed.")] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 1024,
    temperature: Annotated[float, typer.Option(min=0, max=2, help="0 is greedy.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for the first answer (then +1 per turn).")] = None,
    dtype: Annotated[DType, typer.Option(help="Compute dtype.")] = DType.bfloat16,
    mmap: MmapOption = False,
) -> None:
    """Chat in the terminal. /reset starts over, /effort low|medium|high, /quit; Ctrl-C stops an
    answer without quitting."""
    from inhouse.cli.chat import ChatSettings, repl

    client, label = open_engine(model, dtype, mmap=mmap)
    try:
        repl(client, label, ChatSettings(system, reasoning.value, show_reasoning, max_tokens,
                                         temperature, seed))
    finally:
        client.shutdown()


@app.command()
@cli_errors
def serve(
    model: Annotated[str | None, typer.Option(help="Checkpoint directory or hub id "
                                              "(openai/gpt-oss-20b); default: the demo model.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most sequences decoded together.")] = 16,
    kv_budget: Annotated[float | None, typer.Option(
        min=0.01, help="KV cache budget in GiB (default: 4 on CPU; on a GPU what it has free "
        "once the weights are loaded, less 8% (at least 2 GiB) for activations).")] = None,
    api_key: Annotated[list[str] | None, typer.Option(help="Require this API key (repeatable).")] = None,
    dtype: Annotated[DType, typer.Option(help="Compute dtype.")] = DType.bfloat16,
    mode: Annotated[str, typer.Option(help="Engine mode: reproducible (bit-identical seeded "
                                      "outputs at any batch size) or batched.")] = "reproducible",
    log_bodies: Annotated[bool, typer.Option(help="Log request bodies (prompts!). Off by default.")] = False,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL for the audit log and "
                                                     "stored responses (default: SQLite in the cache).")] = None,
    audit_content: Annotated[str, typer.Option(help="What the audit log keeps of prompts and answers: "
                                               "redacted (PII replaced), none (hashes only) or "
                                               "full (what replay needs); erasable.")] = "redacted",
    pii: Annotated[str, typer.Option(help="PII in requests: off, mask (placeholders to the model, "
                                     "restored in answers) or block (400).")] = "off",
    pii_pattern: Annotated[list[str] | None, typer.Option(help="Custom PII detector LABEL=REGEX "
                                                          "(repeatable).")] = None,
    retain_days: Annotated[float, typer.Option(min=0, help="Erase audit content older than this "
                                               "many days (0: keep).")] = 0,
    adapter: Annotated[list[str] | None, typer.Option(help="LoRA adapter NAME=DIR (PEFT format; "
                                                      "repeatable); requests pick it with "
                                                      "model \"MODEL:NAME\".")] = None,
    mmap: MmapOption = False,
    allow_unauthenticated: Annotated[bool, typer.Option(
        help="Serve an address other than loopback with no API keys (anyone who reaches it "
             "may use the model; refused without this flag).")] = False,
    metrics_require_key: Annotated[bool, typer.Option(
        help="/metrics answers only requests with a valid API key.")] = False,
    audit_signing_key: Annotated[Path | None, typer.Option(
        help="The audit log's Ed25519 signing key (created if missing; default: "
             "audit-signing.key in the cache). Keep it off the database's volume.")] = None,
    audit_salt: Annotated[Path | None, typer.Option(
        help="The secret the audit log's hashes of prompts and tool texts are salted with "
             "(created if missing; default: audit-salt in the cache). Every API process of a "
             "deployment gives the same file.")] = None,
    audit_witness: Annotated[str | None, typer.Option(
        help="Send every signed checkpoint to this file (one JSON line each; WORM storage, "
             "another host) or http(s) URL (POSTed, retried): `audit verify --witness` then "
             "catches rollbacks, truncations and deleted checkpoints.")] = None,
    audit_seal_seconds: Annotated[float, typer.Option(
        min=1, help="Sign a checkpoint at least this often while records wait (a record's "
                    "proof exists once it is sealed).")] = 60.0,
    prefix_cache: Annotated[bool, typer.Option(
        help="Reuse the keys and values of earlier prompts of the same tenant (conversations, "
             "shared system prompts and documents); in reproducible mode in whole prefill "
             "chunks, bit-identical to recomputing.")] = True,
    draft_tokens: Annotated[int, typer.Option(
        min=0, max=15, help="Speculative decoding: tokens guessed from the text so far and "
                            "checked in one step (kept only where they are what would be "
                            "sampled: the output is the same); 0 turns it off.")] = 4,
    builtin_tools: Annotated[str, typer.Option(
        help="Built-in tools for every Chat Completions request, comma-separated: browser (the "
             "documents of `inhouse docs add`, never the web), python (a bubblewrap sandbox: no "
             "network, no host files). Responses turns them on per request (web_search, "
             "code_interpreter).")] = "",
    python_timeout: Annotated[float, typer.Option(
        min=1, help="Seconds one python execution may run.")] = 120.0,
    python_memory_mib: Annotated[int, typer.Option(
        min=64, help="The python sandbox's memory (address space), MiB.")] = 1024,
    policy: Annotated[Path | None, typer.Option(
        help="A policy the organisation wrote (safeguard style: instructions, definitions, "
             "criteria, examples; optionally a line 'Categories: a, b'), checked by the guard "
             "on every turn; also answers POST /v1/moderations.")] = None,
    policy_on: Annotated[str, typer.Option(
        help="What the guard checks: input (before generation), output (the answer is held "
             "back until checked, streamed ones too) or both.")] = "input",
    policy_action: Annotated[str, typer.Option(
        help="flag (record the verdict, answer anyway) or block (refuse with a 400 naming the "
             "category).")] = "flag",
    guard_model: Annotated[Path | None, typer.Option(
        help="A separate guard model (e.g. gpt-oss-safeguard-20b) to evaluate the policy; "
             "default: the served model.")] = None,
    web_ui: Annotated[bool, typer.Option(
        "--web-ui/--no-web-ui", help="Serve the web UI (chat, governance console) at /.")] = True,
    replicas: Annotated[int, typer.Option(
        min=0, help="Run the engine as this many Ray Serve replicas (pip install "
                    "'inhouse\\[ray]'); this process keeps the API and the audit log. 0: the "
                    "engine in this process.")] = 0,
    max_replicas: Annotated[int, typer.Option(
        min=0, help="Autoscale between --replicas and this many on ongoing requests.")] = 0,
    ray_address: Annotated[str | None, typer.Option(
        help="The Ray cluster to deploy on (ray://HOST:10001 or HOST:6379); default: a local "
             "Ray started for this run.")] = None,
    cpus_per_replica: Annotated[float, typer.Option(
        min=0.1, help="CPUs Ray reserves for each replica (its torch threads).")] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option(
        min=0, help="GPUs Ray reserves for each replica.")] = 0.0,
    device: Annotated[str, typer.Option(
        help="cpu, or cuda[:N]: the model on a GPU with the cuda backend (Triton kernels, paged "
             "KV, CUDA graphs); audit records name that arithmetic, and replay them with "
             "`audit replay --device cuda`.")] = "cpu",
) -> None:
    """Serve the OpenAI-compatible API (Chat Completions, Responses) and the web UI on
    HOST:PORT."""
    from inhouse.cli.serve import replica_scaling, serve as run_server

    run_server(model, host, port, max_batch, kv_budget, api_key or [], dtype, mode, log_bodies,
               database_url or "", audit_content, retain_days, pii, pii_pattern or [],
               adapter or [], mmap=mmap, allow_unauthenticated=allow_unauthenticated,
               metrics_require_key=metrics_require_key,
               audit_signing_key=str(audit_signing_key or ""), audit_salt=str(audit_salt or ""),
               audit_witness=audit_witness or "",
               audit_seal_seconds=audit_seal_seconds,
               prefix_cache=prefix_cache, draft_tokens=draft_tokens,
               builtin_tools=builtin_tools, python_timeout=python_timeout,
               python_memory_mib=python_memory_mib, policy=policy, policy_on=policy_on,
               policy_action=policy_action, guard_model=guard_model, web_ui=web_ui,
               scaling=replica_scaling(replicas, max_replicas, cpus_per_replica,
                                       gpus_per_replica, max_batch, ray_address),
               ray_address=ray_address, device=device)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"inhouse {__version__}")


def main() -> None:
    app(prog_name="inhouse")


if __name__ == "__main__":
    sys.exit(main())
