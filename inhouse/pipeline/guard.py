"""The policy guard: the organisation's policy (governance/policy.py) evaluated by the served
model or a separate guard model (gpt-oss-safeguard-20b, where the operator has it) on a turn's
input before generation and/or its answer before release.

Input: the conversation's user messages are classified after the turn's request leaves are
written and before generation; `block` refuses the request (400, the category named, the record
completed as refused); `flag` records the verdict and goes on. Output: the answer is held back
until it is classified; a streamed turn is held back whole (reasoning, tool calls, answer) and
released after the verdict, so `block` can still refuse: non-streaming with a 400, streaming
with the API's error event and nothing of the answer. Every verdict is an audit `policy` leaf
(a digest of the rationale; the rationale itself as the deployment keeps content).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from inhouse.engine import EngineClient, SamplingParams
from inhouse.errors import ConfigError, RequestError
from inhouse.governance.policy import Policy, Verdict
from inhouse.harmony import ChatMessage, PromptOptions
from inhouse.harmony.constraints import verdict_constraint, verdict_messages
from inhouse.pipeline.chat import ChatTurn, run_chat

STAGES = ("input", "output", "both")
ACTIONS = ("flag", "block")
MAX_CONTENT_CHARS = 32 << 10  # classified text beyond this is cut (the head and the tail kept)


@dataclass(frozen=True)
class GuardSettings:
    on: str = "input"  # input | output | both
    action: str = "flag"  # flag | block
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if self.on not in STAGES:
            raise ConfigError(f"--policy-on must be one of {', '.join(STAGES)}")
        if self.action not in ACTIONS:
            raise ConfigError(f"--policy-action must be one of {', '.join(ACTIONS)}")

    def checks(self, stage: str) -> bool:
        return self.on in (stage, "both")


class PolicyGuard:
    """Classifies text against the policy with `client` (the served engine or a guard model's).
    Deterministic: greedy, seeded, the verdict held to its JSON schema by a grammar."""

    def __init__(self, policy: Policy, client: EngineClient, settings: GuardSettings,
                 guard_name: str = "served-model") -> None:
        self.policy, self.client, self.settings = policy, client, settings
        self.guard_name = guard_name
        self._constraint = verdict_constraint(policy.verdict_schema())

    async def classify(self, content: str, tenant: str = "") -> Verdict:
        messages = verdict_messages(self.policy.instructions(), _clip(content), self._constraint)
        params = SamplingParams(max_tokens=self.settings.max_tokens, temperature=0.0, seed=0,
                                grammar=self._constraint.grammar, cache_salt=tenant)
        turn = ChatTurn(messages, PromptOptions("low"), params,
                        f"guard_{uuid.uuid4().hex[:16]}")
        result = await run_chat(self.client, turn)
        return _verdict(result.output.content, result.finished.finish_reason)

    def refusal(self, verdict: Verdict, stage: str) -> RequestError:
        what = "request" if stage == "input" else "answer"
        return RequestError(f"the {what} violates the organisation's policy "
                            f"'{self.policy.name}' (category: {verdict.category or 'unspecified'})",
                            param="input" if stage == "input" else None,
                            code="policy_violation")


def _clip(text: str) -> str:
    if len(text) <= MAX_CONTENT_CHARS:
        return text
    half = MAX_CONTENT_CHARS // 2
    return text[:half] + "\n[...]\n" + text[-half:]


def _verdict(answer: str, finish_reason: str) -> Verdict:
    """The guard's JSON (it parses: the grammar held it, and a cut answer is closed). A cut or
    unreadable verdict counts as a violation: a guard that could not decide does not pass."""
    try:
        obj = json.loads(answer)
    except ValueError:
        return Verdict(True, None, "the guard's verdict did not parse", complete=False)
    if not isinstance(obj, dict):
        return Verdict(True, None, "the guard's verdict was not an object", complete=False)
    complete = finish_reason == "stop"
    violation = obj.get("violation") == 1 or not complete
    category = obj.get("category") if isinstance(obj.get("category"), str) else None
    return Verdict(violation, category, str(obj.get("rationale", ""))[:600], complete)


def user_text(messages: tuple[ChatMessage, ...]) -> str:
    """What an input check classifies: the user messages, oldest first."""
    return "\n\n".join(m.content for m in messages if m.role == "user" and m.content)
