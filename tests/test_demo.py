"""The embedded demo model: `inhouse demo build` trains it (about two minutes on 2 cores); served
by default, it answers in valid harmony: reasoning then an answer, and a tool call with valid
JSON when a matching tool is offered."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.config import EngineConfig, ServerSettings
from inhouse.convert.demo import TRAINED_LABEL, demo_model, trained_demo_path
from inhouse.engine import AsyncEngine, LLMEngine
from inhouse.model import load_model
from inhouse.server import build_app
from tests.server_utils import running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def demo(demo_cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("INHOUSE_CACHE", str(demo_cache))
    path, label = demo_model()  # serve and chat now pick the trained demo
    assert path == trained_demo_path() and label == TRAINED_LABEL
    again = CliRunner().invoke(cli, ["demo", "build"])
    assert again.exit_code == 0 and "already built" in again.output
    yield path
    mp.undo()


def test_the_demo_answers_in_harmony_through_the_server(demo):
    openai = pytest.importorskip("openai")
    info = json.loads((demo / "inhouse_demo.json").read_text())
    assert info["seed"] == 0 and "demo" in info["label"]
    client = AsyncEngine(LLMEngine(load_model(demo), EngineConfig()))
    settings = ServerSettings(model_name="inhouse-demo", is_demo=True, model_label=TRAINED_LABEL,
                              audit=False)
    try:
        with running_server(build_app(client, settings)) as url:
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
            r = api.chat.completions.create(
                model="inhouse-demo", temperature=0, max_tokens=80,
                messages=[{"role": "user", "content": "What is the capital of France?"}])
            msg = r.choices[0].message
            assert r.choices[0].finish_reason == "stop"
            assert msg.content == "The capital of France is Paris."
            assert "France" in msg.model_extra["reasoning"]  # the analysis channel came first
            r = api.chat.completions.create(
                model="inhouse-demo", temperature=0, max_tokens=80, tools=[WEATHER],
                messages=[{"role": "user", "content": "What is the weather in Toronto?"}])
            call = r.choices[0].message.tool_calls[0]
            assert r.choices[0].finish_reason == "tool_calls"
            assert call.function.name == "get_weather"
            assert json.loads(call.function.arguments) == {"city": "Toronto"}
            resp = api.responses.create(model="inhouse-demo", input="Hello", temperature=0,
                                        max_output_tokens=60)
            kinds = [item.type for item in resp.output]
            assert kinds == ["reasoning", "message"] and resp.output_text.startswith("Hello")
    finally:
        client.shutdown()


CONTROL = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
           "<|constrain|>")


def test_hot_sampling_never_breaks_the_answer_nor_leaks_control_tokens(demo):
    """Issue 17, finding 4, as the hostile user found it: on the demo model, seed 0, temperature
    2, max_tokens 300, "zq xv 9 ## ramble" put a <|start|> among the parser's pending tokens:
    a 500, an SSE stream cut with no [DONE], and control tokens' text in `content`. That request,
    streamed and not, and 16 more seeds, all at once on a batched-mode engine (what is checked
    is the parser's and the server's, not the arithmetic's: batched mode decodes them in one)."""
    import concurrent.futures as cf

    import httpx
    openai = pytest.importorskip("openai")
    client = AsyncEngine(LLMEngine(load_model(demo), EngineConfig(mode="batched")))
    settings = ServerSettings(model_name="inhouse-demo", is_demo=True, audit=False)
    body = {"model": "inhouse-demo", "seed": 0, "temperature": 2, "max_tokens": 300,
            "messages": [{"role": "user", "content": "zq xv 9 ## ramble"}]}
    try:
        with running_server(build_app(client, settings)) as url, cf.ThreadPoolExecutor(18) as pool:
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

            def streamed() -> list[str]:
                with httpx.stream("POST", f"{url}/v1/chat/completions",
                                  json=body | {"stream": True}, timeout=120) as s:
                    return [x for x in s.iter_lines() if x.startswith("data:")]

            def hot(seed: int) -> str:
                m = api.chat.completions.create(**body | {"seed": seed, "max_tokens": 120}
                                                ).choices[0].message
                return (m.content or "") + (m.model_extra.get("reasoning") or "")

            lines = pool.submit(streamed)
            plain = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=120)
            texts = list(pool.map(hot, range(1, 17)))
            r = plain.result()
            assert r.status_code == 200, r.text
            lines = lines.result()
            assert lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
            for seed, text in enumerate(texts, start=1):
                assert not any(c in text for c in CONTROL), (seed, text)
            assert not any(c in (r.json()["choices"][0]["message"]["content"] or "")
                           for c in CONTROL)
    finally:
        client.shutdown()


def test_the_demo_uses_its_builtin_tools_and_judges_its_policy(demo, demo_cache, tmp_path):
    """What `make run` shows: the browser searched and opened over the sample documents and the
    answer cited (both APIs), python called for a sum it learned, and the sample policy judged
    (the guard and /v1/moderations)."""
    import asyncio

    import openai

    from inhouse.harmony.grammar import GrammarBackend
    from inhouse.pipeline.guard import GuardSettings, PolicyGuard
    from inhouse.tools.documents import DocumentStore
    from inhouse.train.demo_tools import demo_policy, index_demo_documents

    client = AsyncEngine(LLMEngine(load_model(demo), EngineConfig(), grammars=GrammarBackend()))
    db = f"sqlite:///{tmp_path / 'server.db'}"
    index_demo_documents(DocumentStore(db))  # as `inhouse demo build` does
    settings = ServerSettings(model_name="inhouse-demo", is_demo=True, audit=False,
                              database_url=db, builtin_tools=("browser",))
    guard = PolicyGuard(demo_policy(), client, GuardSettings("input", "flag"))
    try:
        with running_server(build_app(client, settings, guard=guard)) as url:
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            # the browser: it searches, opens the first result and cites the line that answers
            r = api.responses.create(model="inhouse-demo", input="When do I need a receipt?",
                                     temperature=0, max_output_tokens=300,
                                     tools=[{"type": "web_search"}])
            calls = [o.action for o in r.output if o.type == "web_search_call"]
            assert [c.type for c in calls] == ["search", "open_page"], r.output
            (text,) = [c for o in r.output if o.type == "message" for c in o.content]
            assert "Receipts are required for every claim above 20 dollars." in text.text
            assert [(a.type, a.title, a.url) for a in text.annotations] == [
                ("url_citation", "Expenses policy", "inhouse://documents/doc_demo_expenses#L5-L5")]
            c = api.chat.completions.create(model="inhouse-demo", temperature=0, max_tokens=300,
                                            messages=[{"role": "user", "content":
                                                       "When does my laptop lock?"}])
            answer = c.choices[0].message
            assert "Laptops lock the screen after 5 minutes." in answer.content, answer
            assert [a.url_citation.url for a in answer.annotations] == [
                "inhouse://documents/doc_demo_it_security#L5-L5"]
            r = api.responses.create(model="inhouse-demo", input="What is 12 times 11?",
                                     temperature=0, max_output_tokens=200,
                                     tools=[{"type": "code_interpreter",
                                             "container": {"type": "auto"}}])
            (call,) = [o for o in r.output if o.type == "code_interpreter_call"]
            # it calls python with a sum it learned (its numbers are not always the user's: a
            # tiny model copies numbers poorly), the sandbox runs it, and it answers after
            m = re.fullmatch(r"print\((\d+) ([*+-]) (\d+)\)", call.code)
            assert m and call.status == "completed"
            a, op, b = int(m[1]), m[2], int(m[3])
            assert call.outputs[0].logs == f"{ {'*': a * b, '+': a + b, '-': a - b}[op]}\n"
            assert r.output[-1].type == "message" and r.status == "completed"
            verdicts = [asyncio.run(guard.classify(t)) for t in
                        ("What is the admin password?", "What is the capital of France?")]
            assert [(v.violation, v.category) for v in verdicts] == [(True, "credentials"),
                                                                     (False, None)]
            m = api.moderations.create(input="Send me your API key.")
            assert m.results[0].flagged
    finally:
        client.shutdown()


def test_a_tool_loops_steps_each_replay_bit_for_bit(demo, tmp_path):
    """Every step of a built-in tool loop is a record of its own whose prompt holds the recorded
    tool answer: `audit replay` reproduces each step without running the tool again."""
    import httpx

    from inhouse.config import cache_root
    from inhouse.governance.audit_log import AuditLog, load_signing_key
    from inhouse.harmony.grammar import GrammarBackend
    from inhouse.kernels import arithmetic
    from inhouse.model import find_checkpoint
    from inhouse.model.digest import checkpoint_digest

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    log = AuditLog(url, load_signing_key(cache_root() / "audit-signing.key"))
    settings = ServerSettings(model_name="inhouse-demo", audit_content="full",
                              engine_mode="reproducible", model_dtype="float32",
                              model_digest=checkpoint_digest(find_checkpoint(demo)),
                              kernel=arithmetic.path_name())
    engine = AsyncEngine(LLMEngine(load_model(demo), EngineConfig(mode="reproducible"),
                                   grammars=GrammarBackend()))
    try:
        with running_server(build_app(engine, settings, audit_log=log)) as u:
            r = httpx.post(f"{u}/v1/responses", timeout=120, json={
                "model": "inhouse-demo", "input": "What is 12 times 11?", "temperature": 0,
                "max_output_tokens": 200, "tools": [{"type": "code_interpreter",
                                                     "container": {"type": "auto"}}]})
            assert r.status_code == 200
    finally:
        engine.shutdown()
    records = sorted({x["record_id"] for x in log.list(limit=100) if x["kind"] == "request"})
    assert len(records) == 2 and records[1] == records[0] + "-step1"
    assert [x["kind"] for x in log.list(limit=100)].count("tool") == 1
    for rid in records:
        res = CliRunner().invoke(cli, ["audit", "replay", rid, "--model", str(demo),
                                       "--database-url", url])
        assert res.exit_code == 0 and "identical" in res.stdout, res.output
