"""What replaying an audited request needs, read from its leaves: the prompt and output ids, the
sampling parameters with the seed that was drawn, and what the run must match (model digest,
kernel path, dtype, adapter digest). `inhouse audit replay` runs it on a freshly loaded model; the
server runs it on its own engine (`POST /v1/audit/records/{id}/replay`). No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from inhouse.errors import InhouseError


@dataclass(frozen=True)
class ReplayPlan:
    record_id: str
    prompt_ids: list[int]
    output_ids: list[int]  # what the log says was generated
    params: dict  # SamplingParams' fields, the seed and stop ids included
    model_digest: str
    kernel: str | None
    dtype: str
    adapter: str | None
    adapter_digest: str | None


@dataclass(frozen=True)
class ReplayReport:
    record_id: str
    identical: bool
    num_logged: int
    num_replayed: int
    first_difference: int | None  # index of the first differing output token


def plan_replay(record_id: str, leaves: list[dict]) -> ReplayPlan:
    """`leaves`: the record's leaves as `AuditLog.get` gives them (content on the first)."""
    if not leaves:
        raise InhouseError(f"no audit record {record_id}")
    start = leaves[0]
    done = next((leaf for leaf in leaves if leaf["kind"] == "completion"), None)
    if start["kind"] != "request" or done is None or done.get("finish_reason") in ("refused",
                                                                                  "error"):
        raise InhouseError(f"record {record_id} has no completed generation to replay")
    content = start.get("content") or {}
    if "prompt_ids" not in content or "output_ids" not in content:
        raise InhouseError(f"record {record_id} kept no token ids (audit content 'none', or "
                           "erased): replay needs them; serve with --audit-content full")
    engine = start.get("engine", {})
    params = dict(start["params"]) | {"seed": done["seed"],
                                      "stop_token_ids": tuple(start["params"]["stop_token_ids"])}
    if done.get("finish_reason") == "abort":
        # cut short on purpose (a stop string matched, as the request leaf's "stop" records):
        # the logged ids are a prefix of the run, and exactly that prefix is replayed
        params["max_tokens"] = max(1, len(content["output_ids"]))
    return ReplayPlan(record_id, list(content["prompt_ids"]), list(content["output_ids"]), params,
                      start["model_digest"], engine.get("kernel"),
                      engine.get("dtype") or "bfloat16", start.get("adapter"),
                      start.get("adapter_digest"))


def compare(plan: ReplayPlan, replayed: list[int]) -> ReplayReport:
    logged = plan.output_ids
    diff = next((i for i, (a, b) in enumerate(zip(replayed, logged)) if a != b),
                None if len(replayed) == len(logged) else min(len(replayed), len(logged)))
    return ReplayReport(plan.record_id, diff is None, len(logged), len(replayed), diff)
