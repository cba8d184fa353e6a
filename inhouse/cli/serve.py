"""`inhouse serve`: load the model, build the engine and the app, run uvicorn."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
from pathlib import Path

from inhouse.cli.common import DType, err, out
from inhouse.errors import InhouseError

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model(model: str | None) -> tuple[Path, str, str]:
    """(checkpoint dir, served model name, demo label or ""). A hub id is fetched into the HF
    cache; no model means the embedded demo."""
    from inhouse.convert.demo import demo_model

    if model is None:
        path, label = demo_model()
        return path, "inhouse-demo", label
    path = Path(model)
    if path.exists():
        return path, path.resolve().name, ""
    if not HUB_ID.match(model):
        raise InhouseError(f"no such file or directory: {model}")
    try:
        from huggingface_hub import snapshot_download
    except ModuleNotFoundError:
        raise InhouseError(f"{model} is not a local path, and huggingface_hub is not installed "
                           "to download it: `pip install huggingface_hub`") from None
    err.print(f"[dim]fetching {model} from the Hugging Face hub (cached) ...[/dim]")
    try:
        local = snapshot_download(model, allow_patterns=["*.json", "*.safetensors"],
                                  ignore_patterns=["original/*", "metal/*"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth...
        raise InhouseError(f"could not fetch {model} from the hub ({type(e).__name__}); on a "
                           "machine without internet, copy the checkpoint here and pass its "
                           "path") from None
    return Path(local), model.split("/")[-1], ""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume others can reach it


def check_exposure(host: str, api_keys: list[str], database_url: str,
                   allow_unauthenticated: bool) -> None:
    """An address others can reach, with no key at all, is refused unless asked for loudly."""
    if is_loopback(host) or api_keys:
        return
    from inhouse.config import cache_root
    from inhouse.governance.keys import KeyStore
    from inhouse.governance.responses_store import default_url

    if KeyStore(database_url or default_url(cache_root())).any_active():
        return
    if not allow_unauthenticated:
        raise InhouseError(f"refusing to serve {host} with no API keys: anyone who reaches it "
                           "could use the model and read stored responses. Create a key "
                           "(`inhouse keys create --name NAME`), pass --api-key, bind "
                           "127.0.0.1, or pass --allow-unauthenticated")
    err.print(f"[bold red]WARNING: serving {host} WITHOUT AUTHENTICATION: anyone who reaches "
              "this address can use the model and every stored response[/bold red]")
    logging.getLogger("inhouse.server").warning("serving %s without authentication", host)


def _gpu_kv_budget(device, model) -> int:
    """What the GPU has free now that the weights are loaded, less the reserve (said on stderr,
    with how many tokens of context that holds)."""
    import torch

    from inhouse.model.summary import kv_bytes, kv_budget_on_gpu

    free, total = torch.cuda.mem_get_info(device)
    budget = kv_budget_on_gpu(free, total)
    per_token, _ = kv_bytes(model.config, model.dtype)
    if budget < per_token * 1024:
        raise InhouseError(f"{device} has {free / 2**30:.1f} GiB free after loading the model: "
                           "too little for a KV cache (a smaller model, or --kv-budget)")
    err.print(f"[dim]KV cache: {budget / 2**30:.1f} GiB of {device} ({budget // per_token} "
              "tokens of context; --kv-budget to set it)[/dim]")
    return budget


def serve(model: str | None, host: str, port: int, max_batch: int, kv_budget_gib: float | None,
          api_keys: list[str], dtype: DType, mode: str, log_bodies: bool, database_url: str = "",
          audit_content: str = "redacted", retain_days: float = 0.0, pii_mode: str = "off",
          pii_patterns: list[str] | None = None, adapters: list[str] | None = None,
          mmap: bool = False, allow_unauthenticated: bool = False,
          metrics_require_key: bool = False, audit_signing_key: str = "", audit_salt: str = "",
          audit_witness: str = "", audit_seal_seconds: float = 60.0,
          prefix_cache: bool = True, draft_tokens: int = 4,
          builtin_tools: str = "", python_timeout: float = 120.0,
          python_memory_mib: int = 1024, policy: Path | None = None, policy_on: str = "input",
          policy_action: str = "flag", guard_model: Path | None = None,
          web_ui: bool = True, scaling=None, ray_address: str | None = None,
          device: str = "cpu") -> None:
    import uvicorn

    from inhouse.config import EngineConfig, ServerSettings
    from inhouse.engine import AsyncEngine, LLMEngine
    from inhouse.model import find_checkpoint, load_model
    from inhouse.server import UVICORN_IMPL, build_app

    from inhouse.kernels import arithmetic
    from inhouse.kernels.backend import device_and_backend
    from inhouse.model.digest import checkpoint_digest

    torch_device, backend = device_and_backend(device)
    if torch_device.type == "cuda" and backend != "cuda":
        from inhouse.kernels.backend import cuda_failure, triton_available

        why = cuda_failure(str(torch_device)) if triton_available() else "triton is not installed"
        err.print(f"[yellow]warning: the cuda backend's kernels cannot run here ({why}); "
                  f"the model runs its PyTorch paths on {torch_device} (slow)[/yellow]")
    if scaling is not None and torch_device.type != "cpu":
        raise InhouseError("--device applies to the engine in this process; replicas take "
                           "--gpus-per-replica")
    if guard_model is not None and torch_device.type == "cuda" and kv_budget_gib is None:
        raise InhouseError("--guard-model on a GPU needs --kv-budget: the served model's KV "
                           "cache would otherwise take the memory the guard model needs")

    patterns = []
    for spec in pii_patterns or []:
        label, sep, regex = spec.partition("=")
        if not sep or not label or not regex:
            raise InhouseError(f"--pii-pattern {spec!r}: expected LABEL=REGEX")
        try:
            re.compile(regex)
        except re.error as e:
            raise InhouseError(f"--pii-pattern {label}: not a valid regex ({e})") from None
        patterns.append((label, regex))
    from inhouse.model.peft_format import attach_adapter, load_adapter, parse_adapter_option

    check_exposure(host, api_keys, database_url, allow_unauthenticated)
    from inhouse.governance.policy import Policy
    from inhouse.pipeline.guard import GuardSettings

    the_policy = Policy.load(policy) if policy is not None else None  # checked before loading
    guard_settings = GuardSettings(policy_on, policy_action)
    if guard_model is not None and the_policy is None:
        raise InhouseError("--guard-model needs --policy FILE")
    tools = tuple(t.strip() for t in builtin_tools.split(",") if t.strip())
    if "python" in tools:  # no sandbox, no python tool: said now, not at the first request
        from inhouse.tools.sandbox import probe

        probe()
    wanted = [parse_adapter_option(a) for a in adapters or []]
    if len({n for n, _ in wanted}) != len(wanted):
        raise InhouseError("--adapter: two adapters have the same name")
    # read (and checked) once, here: a bad adapter fails before the model loads
    read = [(n, d, load_adapter(d)) for n, d in wanted]
    path, name, demo_label = resolve_model(model)
    demo = bool(demo_label)
    info = find_checkpoint(path)
    if demo:
        dtype = DType.float32
    engine_cfg = EngineConfig(max_num_seqs=max_batch, max_num_batched_tokens=max(512, max_batch),
                              kv_budget_bytes=int((kv_budget_gib or 4.0) * 2**30), mode=mode,
                              prefix_caching=prefix_cache, num_draft_tokens=draft_tokens)
    err.print("[dim]computing the model digest (cached after the first time) ...[/dim]")
    settings = ServerSettings(model_name=name, model_label=demo_label or str(path),
                              is_demo=demo, api_keys=tuple(api_keys), log_bodies=log_bodies,
                              database_url=database_url, audit_database_url=database_url,
                              audit_content=audit_content, model_digest=checkpoint_digest(info),
                              engine_mode=mode, model_dtype=dtype.value, kernel=arithmetic.path_name(info.int8, backend),
                              retain_days=retain_days, pii_mode=pii_mode,
                              pii_patterns=tuple(patterns),
                              metrics_require_key=metrics_require_key,
                              audit_signing_key=audit_signing_key, audit_salt=audit_salt,
                              audit_witness=audit_witness,
                              audit_seal_seconds=audit_seal_seconds,
                              builtin_tools=tools, python_timeout_s=python_timeout,
                              python_memory_mib=python_memory_mib, web_ui=web_ui)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if scaling is not None:  # the engine as Ray Serve replicas; this process keeps the API
        from inhouse.model.peft_format import adapter_digest
        from inhouse.scaleout.deploy import start_replicas
        from inhouse.scaleout.replica import ReplicaSpec

        digests = tuple((n, adapter_digest(d)) for n, d, _ in read)
        spec = ReplicaSpec(str(info.root.resolve()), dtype.value, engine_cfg,
                           tuple((n, str(Path(d).resolve())) for n, d, _ in read), mmap)
        err.print(f"[dim]starting {scaling.replicas} engine replica(s) of {path} on Ray Serve"
                  f"{' at ' + ray_address if ray_address else ' (a local Ray)'} ...[/dim]")
        client = start_replicas(spec, scaling, info.config, ray_address)
    else:
        err.print(f"[dim]loading {path} ...[/dim]")
        loaded = load_model(path, device=torch_device, dtype=dtype.torch, mmap=mmap,
                            backend=backend)
        digests = tuple((n, attach_adapter(loaded, n, d, contents)) for n, d, contents in read)
        if torch_device.type == "cuda" and kv_budget_gib is None:
            engine_cfg = dataclasses.replace(engine_cfg, kv_budget_bytes=_gpu_kv_budget(
                torch_device, loaded))
        from inhouse.harmony.grammar import GrammarBackend

        client = AsyncEngine(LLMEngine(loaded, engine_cfg, grammars=GrammarBackend()))
    settings = dataclasses.replace(settings, adapters=digests)
    guard = None
    if the_policy is not None:
        from inhouse.pipeline.guard import PolicyGuard

        guard_client, guard_name = client, "served-model"
        if guard_model is not None:
            err.print(f"[dim]loading the guard model {guard_model} ...[/dim]")
            guard_info = find_checkpoint(guard_model)
            guard_client = AsyncEngine(LLMEngine(
                load_model(guard_info.root, device=torch_device, dtype=dtype.torch, mmap=mmap,
                           backend=backend),
                EngineConfig(max_num_seqs=4, kv_budget_bytes=engine_cfg.kv_budget_bytes // 4,
                             mode=mode), grammars=GrammarBackend()))
            guard_name = f"guard:{guard_model.name}@{checkpoint_digest(guard_info)[:19]}"
        guard = PolicyGuard(the_policy, guard_client, guard_settings, guard_name)
        out.print(f"[dim]policy '{the_policy.name}' ({the_policy.sha256[:12]}) on "
                  f"{policy_on}, {policy_action}; guard: {guard_name}[/dim]")
    app = build_app(client, settings, guard=guard)
    banner = f"inhouse serving '{name}' on http://{host}:{port}/v1"
    if demo:
        banner += f"  [yellow]DEMO MODEL: {demo_label}[/yellow]"
    out.print(banner)
    if web_ui:
        out.print(f"web UI: http://{host}:{port}/  (sign in with an API key; API docs at /docs)")
    for n, d in digests:
        out.print(f"[dim]adapter '{name}:{n}' ({d[:19]})[/dim]")
    if api_keys:
        out.print(f"[dim]{len(api_keys)} API key(s) required[/dim]")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", **UVICORN_IMPL)
    finally:  # the app's lifespan sealed the audit log and stopped the workers
        client.shutdown()
        if guard is not None and guard.client is not client:
            guard.client.shutdown()


def replica_scaling(replicas: int, max_replicas: int, cpus: float, gpus: float, max_batch: int,
                    ray_address: str | None):
    """--replicas and its companions -> a ReplicaScaling, or None for the in-process engine."""
    if not replicas:
        if max_replicas or ray_address:
            raise InhouseError("--max-replicas and --ray-address need --replicas N")
        return None
    from inhouse.scaleout.deploy import ReplicaScaling

    return ReplicaScaling(replicas, max_replicas, cpus, gpus, max_ongoing=4 * max_batch)
