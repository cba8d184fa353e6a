"""POST /v1/moderations in OpenAI's shape, answered by the organisation's policy guard: each input
classified against the policy (`serve --policy FILE`), each verdict an audit `policy` leaf.

OpenAI's categories are a fixed set; a policy names its own. The result carries OpenAI's keys
(all false, so typed clients read them) and the policy's categories, flagged where violated;
scores are 1.0 or 0.0 (the guard gives a verdict, not a probability)."""

from __future__ import annotations

import time

from inhouse.governance.tenancy import Caller
from inhouse.pipeline.audit import Auditor
from inhouse.pipeline.guard import PolicyGuard
from inhouse.server.errors import APIError
from inhouse.server.protocol.moderations import ModerationRequest
from inhouse.server.serving.common import new_id

OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening",
                     "illicit", "illicit/violent", "self-harm", "self-harm/instructions",
                     "self-harm/intent", "sexual", "sexual/minors", "violence",
                     "violence/graphic")
MAX_INPUTS = 32


class Moderations:
    def __init__(self, guard: PolicyGuard | None, auditor: Auditor) -> None:
        self.guard, self.auditor = guard, auditor

    async def create(self, req: ModerationRequest, caller: Caller) -> dict:
        guard = self.guard
        if guard is None:
            raise APIError(400, "this server has no policy to moderate with (serve --policy FILE)",
                           param="input", code="no_policy")
        texts = [req.input] if isinstance(req.input, str) else [
            t if isinstance(t, str) else t.text for t in req.input]
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
        if req.model not in (None, guard.guard_name, "omni-moderation-latest",
                             "text-moderation-latest"):
            raise APIError(404, f"the model '{req.model}' does not exist; moderation is answered "
                           f"by '{guard.guard_name}'", param="model", code="model_not_found")
        record_id = new_id("modr")
        names = list(dict.fromkeys([*OPENAI_CATEGORIES, *guard.policy.categories]))
        results = []
        for text in texts:
            verdict = await guard.classify(text, caller.tenant)
            await self.auditor.policy(record_id, caller, "moderation", verdict,
                                      "flag" if verdict.violation else "pass",
                                      guard.policy.sha256, guard.guard_name)
            hit = verdict.category or ("policy_violation" if verdict.violation else None)
            cats = {n: False for n in names}
            if verdict.violation and hit:
                cats[hit] = True
            results.append({"flagged": verdict.violation, "categories": cats,
                            "category_scores": {n: 1.0 if v else 0.0 for n, v in cats.items()},
                            "category_applied_input_types": {n: ["text"] for n in cats}})
        return {"id": record_id, "model": guard.guard_name, "results": results,
                "created": int(time.time())}
