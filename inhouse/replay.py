"""Replay an audited request: same model (by digest), same prompt ids, params and seed, through
the engine's reproducible mode; are the output ids bit-identical to the logged ones?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from inhouse.config import EngineConfig
from inhouse.engine import LLMEngine, SamplingParams
from inhouse.errors import InhouseError
from inhouse.governance.audit_log import AuditLog
from inhouse.model import find_checkpoint, kernels, load_model
from inhouse.model.digest import checkpoint_digest
from inhouse.model.peft_format import attach_adapter


@dataclass(frozen=True)
class ReplayReport:
    record_id: str
    identical: bool
    num_logged: int
    num_replayed: int
    first_difference: int | None  # index of the first differing output token


def replay(log: AuditLog, record_id: str, model_path: Path,
           adapter_dir: Path | None = None) -> ReplayReport:
    """`adapter_dir`: the LoRA adapter the record names (checked by digest), if it used one."""
    leaves = log.get(record_id)
    if not leaves:
        raise InhouseError(f"no audit record {record_id}")
    start = leaves[0]
    done = next((l for l in leaves if l["kind"] == "completion"), None)
    if done is None or done.get("finish_reason") in ("refused", "error"):
        raise InhouseError(f"record {record_id} has no completed generation to replay")
    content = start.get("content") or {}
    if "prompt_ids" not in content or "output_ids" not in content:
        raise InhouseError(f"record {record_id} kept no token ids (audit content 'none', or "
                           "erased): replay needs them; serve with --audit-content full")
    info = find_checkpoint(model_path)
    digest = checkpoint_digest(info)
    if digest != start["model_digest"]:
        raise InhouseError(f"refusing to replay: the model at {model_path} has digest {digest}, "
                           f"the record was produced by {start['model_digest']}")
    engine_info = start.get("engine", {})
    here = kernels.path_name(info.int8)
    if engine_info.get("kernel") and engine_info["kernel"] != here:
        raise InhouseError(f"refusing to replay: the record ran the '{engine_info['kernel']}' "
                           f"kernel path, this machine runs '{here}' for this model (different "
                           "arithmetic)")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        engine_info.get("dtype") or "bfloat16", torch.bfloat16)
    params = dict(start["params"]) | {"seed": done["seed"],
                                      "stop_token_ids": tuple(start["params"]["stop_token_ids"])}
    if done.get("finish_reason") == "abort":
        # cut short on purpose (a stop string matched, as the request leaf's "stop" records):
        # the logged ids are a prefix of the run, and exactly that prefix is replayed
        params["max_tokens"] = max(1, len(content["output_ids"]))
    model = load_model(info.root, dtype=dtype)
    wanted = start.get("adapter_digest")
    if wanted and adapter_dir is None:
        raise InhouseError(f"record {record_id} was produced with adapter '{start.get('adapter')}' "
                           f"({wanted}): pass it with --adapter DIR")
    if adapter_dir is not None:
        if not wanted:
            raise InhouseError(f"record {record_id} used no adapter; do not pass --adapter")
        got = attach_adapter(model, params["adapter"], adapter_dir)
        if got != wanted:
            raise InhouseError(f"refusing to replay: the adapter at {adapter_dir} has digest {got}, "
                               f"the record was produced by {wanted}")
    from inhouse.harmony.grammar import GrammarBackend

    engine = LLMEngine(model, EngineConfig(mode="reproducible"), grammars=GrammarBackend())
    engine.add_request(record_id, content["prompt_ids"], SamplingParams(**params))
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
    logged = list(content["output_ids"])
    diff = next((i for i, (a, b) in enumerate(zip(out, logged)) if a != b),
                None if len(out) == len(logged) else min(len(out), len(logged)))
    return ReplayReport(record_id, diff is None, len(logged), len(out), diff)
