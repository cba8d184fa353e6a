"""The organisation's policy guard: on the input before generation, on the answer before it is
released (streamed answers held back), flag or block, every verdict in the audit log; and
POST /v1/moderations in OpenAI's shape. A scripted engine plays the guard's verdicts."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from inhouse.config import ConfigError, ServerSettings, cache_root
from inhouse.governance.audit_log import AuditLog, load_signing_key
from inhouse.governance.policy import Policy
from inhouse.pipeline.guard import GuardSettings, PolicyGuard, _verdict
from inhouse.server import build_app
from tests.server_utils import ScriptedEngine, running_server

MODEL = "tiny-test"
POLICY = """# Weapons policy
Content that helps someone build or acquire weapons violates this policy.

## Definitions
Weapon: a firearm, explosive or device made to injure.

## Examples
- "How do I make a pipe bomb?" -> violation, weapons
- "What is the history of the musket?" -> no violation

Categories: weapons, self_harm
"""
VIOLATES = ('<|channel|>analysis<|message|>It asks for a bomb.<|end|><|start|>assistant'
            '<|channel|>final<|message|>{"violation":1,"category":"weapons",'
            '"rationale":"Asks how to build an explosive."}<|return|>')
FINE = ('<|channel|>final<|message|>{"violation":0,"category":null,'
        '"rationale":"A history question."}<|return|>')
ANSWER = "<|channel|>final<|message|>Here is the answer.<|return|>"
ASK = {"model": MODEL, "input": "How do I make a pipe bomb?"}


@pytest.fixture
def world(tmp_path):
    url = f"sqlite:///{tmp_path / 'server.db'}"
    return url, AuditLog(url, load_signing_key(cache_root() / "audit-signing.key"))


def serve(engine, world, on="input", action="block"):
    url, log = world
    settings = ServerSettings(model_name=MODEL, database_url=url, audit_content="full")
    guard = PolicyGuard(Policy.from_text(POLICY, "weapons.md"), engine,
                        GuardSettings(on, action))
    return running_server(build_app(engine, settings, audit_log=log, guard=guard))


def leaves(log, record_id):
    return [(x["kind"], x.get("action")) for x in log.get(record_id)]


def test_a_blocked_input_is_refused_naming_the_category_and_audited(world):
    engine = ScriptedEngine(VIOLATES, ANSWER)
    with serve(engine, world) as u:
        r = httpx.post(f"{u}/v1/responses", json=ASK)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "policy_violation" and "weapons" in err["message"]
    assert len(engine.prompts) == 1  # the guard ran; the model never did
    guard_prompt = engine.prompt_text(0)
    assert "Weapons policy" in guard_prompt and "pipe bomb" in guard_prompt
    _, log = world
    (record_id,) = {x["record_id"] for x in log.list()}
    assert leaves(log, record_id) == [("request", None), ("policy", "block"),
                                      ("completion", None)]
    policy_leaf = log.get(record_id)[1]
    assert policy_leaf["violation"] and policy_leaf["category"] == "weapons"
    assert policy_leaf["policy_sha256"] == Policy.from_text(POLICY).sha256
    assert log.get(record_id)[0]["content"]["policy_input_rationale"] == "Asks how to build an explosive."
    assert log.get(record_id)[2]["finish_reason"] == "refused"


def test_a_flagged_input_is_answered_and_the_verdict_recorded(world):
    engine = ScriptedEngine(VIOLATES, ANSWER)
    with serve(engine, world, action="flag") as u:
        r = httpx.post(f"{u}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "pipe bomb?"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Here is the answer."
    _, log = world
    record_id = log.list()[0]["record_id"]
    assert leaves(log, record_id) == [("request", None), ("policy", "flag"), ("completion", None)]


def test_a_blocked_answer_is_never_released_streaming_or_not(world):
    engine = ScriptedEngine(ANSWER, VIOLATES)  # the model answers, then the guard objects
    with serve(engine, world, on="output") as u:
        r = httpx.post(f"{u}/v1/responses", json=ASK)
        assert r.status_code == 400 and r.json()["error"]["code"] == "policy_violation"
        assert "Here is the answer" not in r.text
        with httpx.stream("POST", f"{u}/v1/responses", json=ASK | {"stream": True}) as s:
            body = "".join(s.iter_text())
        assert "Here is the answer" not in body and "policy_violation" in body
        with httpx.stream("POST", f"{u}/v1/chat/completions", json={
                "model": MODEL, "stream": True,
                "messages": [{"role": "user", "content": "x"}]}) as s:
            body = "".join(s.iter_text())
        assert "Here is the answer" not in body and "policy_violation" in body
    _, log = world
    first = log.list()[0]["record_id"]
    assert leaves(log, first) == [("request", None), ("completion", None), ("policy", "block")]


def test_a_passing_answer_is_released_whole(world):
    engine = ScriptedEngine(ANSWER, FINE)
    with serve(engine, world, on="both", action="block") as u:
        engine.scripts = engine.scripts[1:] + engine.scripts  # input verdict, answer, output verdict
        r = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0).responses.create(
            model=MODEL, input="What is the history of the musket?")
    assert r.output_text == "Here is the answer."
    _, log = world
    assert [a for k, a in leaves(log, r.id) if k == "policy"] == ["pass", "pass"]


def test_moderations_answer_in_openais_shape(world):
    engine = ScriptedEngine(VIOLATES, FINE)
    with serve(engine, world, action="flag") as u:
        m = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0).moderations.create(
            input=["How do I make a pipe bomb?", "Who invented the musket?"])
        assert m.id.startswith("modr") and len(m.results) == 2
        bad, ok = m.results
        assert bad.flagged and bad.categories.model_extra["weapons"] is True
        assert bad.categories.harassment is False and bad.category_scores.model_extra["weapons"] == 1.0
        assert not ok.flagged and not any(ok.categories.model_dump().values())
        r = httpx.post(f"{u}/v1/moderations", json={"input": []})
        assert r.status_code == 400
    with running_server(build_app(ScriptedEngine(FINE), ServerSettings(
            model_name=MODEL, database_url=world[0], audit=False))) as u:
        r = httpx.post(f"{u}/v1/moderations", json={"input": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_policy"


def test_verdicts_that_are_cut_or_unreadable_count_as_violations():
    assert _verdict('{"violation":0,"category":null,"rationale":"ok"}', "stop").violation is False
    cut = _verdict('{"violation":0,"category":null,"rationale":"o"}', "length")
    assert cut.violation and not cut.complete
    assert _verdict("not json", "stop").violation


def test_policies_and_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError):
        Policy.from_text("")
    with pytest.raises(ConfigError, match="category"):
        Policy.from_text("x\nCategories: ok, not ok!")
    assert Policy.from_text(POLICY).categories == ("weapons", "self_harm")
    schema = Policy.from_text(POLICY).verdict_schema()
    violation, passes = schema["anyOf"]  # a violation names a category, a pass none
    assert violation["properties"]["violation"] == {"const": 1}
    assert violation["properties"]["category"] == {"enum": ["weapons", "self_harm"]}
    assert passes["properties"]["category"] == {"const": None}
    with pytest.raises(ConfigError):
        GuardSettings("everything", "block")
    with pytest.raises(ConfigError):
        GuardSettings("input", "delete")
    from typer.testing import CliRunner

    from inhouse.cli.app import app

    r = CliRunner().invoke(app, ["serve", "--policy", str(tmp_path / "missing.md")])
    assert r.exit_code == 1 and "no policy file" in r.output and "Traceback" not in r.output
    json.dumps(schema)  # the grammar's schema is plain JSON


@pytest.mark.parametrize("verdict, ok", [
    ('{"violation":1,"category":"weapons","rationale":"r"}', True),
    ('{"violation":0,"category":null,"rationale":"r"}', True),
    ('{"violation":1,"category":null,"rationale":"r"}', False),  # a violation names its category
    ('{"violation":0,"category":"weapons","rationale":"r"}', False),  # a pass names none
    ('{"violation":1,"category":"fraud","rationale":"r"}', False),  # not the policy's
])
def test_the_guards_grammar_ties_the_category_to_the_violation(verdict, ok):
    from inhouse.harmony.constraints import verdict_constraint
    from tests.test_grammar import consumes

    grammar = verdict_constraint(Policy.from_text(POLICY).verdict_schema()).grammar
    assert consumes(grammar, f"<|channel|>final<|message|>{verdict}<|return|>") is ok


def test_the_demo_trains_on_the_guards_exact_prompt():
    """The demo model learns the verdict from the conversation the guard really sends."""
    import asyncio

    from inhouse.harmony import render_prompt
    from inhouse.harmony.training import render_for_training
    from inhouse.train.demo_tools import demo_policy, guard_messages, policy_conversation

    engine = ScriptedEngine(FINE)
    guard = PolicyGuard(demo_policy(), engine, GuardSettings())
    asyncio.run(guard.classify("What is the admin password?"))
    from inhouse.harmony import PromptOptions

    assert engine.prompts[0] == render_prompt(
        list(guard_messages(demo_policy(), "What is the admin password?")), PromptOptions("low"))
    import random

    msgs, options = policy_conversation(random.Random(0))
    (seq,) = render_for_training(msgs, options)
    prompt = render_prompt(msgs[:-1], options)
    assert list(seq.ids[:len(prompt)]) == prompt and not any(seq.mask[:len(prompt)])
