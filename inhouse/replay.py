"""Replay an audited request: same model (by digest), same prompt ids, params and seed, through
the engine's reproducible mode; are the output ids bit-identical to the logged ones?"""

from __future__ import annotations

from pathlib import Path

import torch

from inhouse.config import EngineConfig
from inhouse.engine import LLMEngine, SamplingParams
from inhouse.errors import InhouseError
from inhouse.governance.audit_log import AuditLog
from inhouse.governance.replay_plan import ReplayReport, compare, plan_replay
from inhouse.kernels import arithmetic
from inhouse.kernels.backend import CUDA_PATH, device_and_backend
from inhouse.model import find_checkpoint, load_model
from inhouse.model.digest import checkpoint_digest
from inhouse.model.peft_format import attach_adapter


def replay(log: AuditLog, record_id: str, model_path: Path,
           adapter_dir: Path | None = None, device: str = "cpu") -> ReplayReport:
    """`adapter_dir`: the LoRA adapter the record names (checked by digest), if it used one."""
    plan = plan_replay(record_id, log.get(record_id))
    info = find_checkpoint(model_path)
    digest = checkpoint_digest(info)
    if digest != plan.model_digest:
        raise InhouseError(f"refusing to replay: the model at {model_path} has digest {digest}, "
                           f"the record was produced by {plan.model_digest}")
    torch_device, backend = device_and_backend(device)
    here = arithmetic.path_name(info.int8, backend)
    if plan.kernel and plan.kernel != here:
        hint = " (pass --device cuda)" if plan.kernel == CUDA_PATH else ""
        raise InhouseError(f"refusing to replay: the record ran the '{plan.kernel}' "
                           f"kernel path, this machine runs '{here}' for this model (different "
                           f"arithmetic){hint}")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(plan.dtype, torch.bfloat16)
    model = load_model(info.root, device=torch_device, dtype=dtype, backend=backend)
    wanted = plan.adapter_digest
    if wanted and adapter_dir is None:
        raise InhouseError(f"record {record_id} was produced with adapter '{plan.adapter}' "
                           f"({wanted}): pass it with --adapter DIR")
    if adapter_dir is not None:
        if not wanted:
            raise InhouseError(f"record {record_id} used no adapter; do not pass --adapter")
        got = attach_adapter(model, plan.params["adapter"], adapter_dir)
        if got != wanted:
            raise InhouseError(f"refusing to replay: the adapter at {adapter_dir} has digest {got}, "
                               f"the record was produced by {wanted}")
    from inhouse.harmony.grammar import GrammarBackend

    engine = LLMEngine(model, EngineConfig(mode="reproducible"), grammars=GrammarBackend())
    engine.add_request(record_id, plan.prompt_ids, SamplingParams(**plan.params))
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
    return compare(plan, out)
