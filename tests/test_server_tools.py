"""The built-in tool loop in the server: the model calls, the server runs the call (browser over
the organisation's documents, python in the sandbox), feeds the answer back, and the model goes
on; both APIs, streaming and not, audited step by step. A scripted engine plays the model's
exact harmony so that each step's prompt can be checked token for token."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from inhouse.config import ServerSettings, cache_root
from inhouse.governance.audit_log import AuditLog, load_signing_key
from inhouse.harmony import tool_result_ids
from inhouse.server import build_app
from inhouse.tools.documents import DocumentStore
from tests.server_utils import ScriptedEngine, harmony_ids, running_server
from tests.test_documents import LEAVE

MODEL = "tiny-test"
THINK_AND_RUN = ("<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant"
                 "<|channel|>analysis to=python code<|message|>print(6 * 7)<|call|>")
ANSWER_42 = "<|channel|>final<|message|>The answer is 42.<|return|>"
SEARCH = '<|channel|>analysis to=browser.search code<|message|>{"query": "annual leave"}<|call|>'
OPEN = '<|start|>assistant to=browser.open<|channel|>analysis code<|message|>{"id": 0}<|call|>'
CITED = "<|channel|>final<|message|>Staff get 25 days of leave 【1†L22-L23】.<|return|>"


@pytest.fixture
def world(tmp_path):
    url = f"sqlite:///{tmp_path / 'server.db'}"
    log = AuditLog(url, load_signing_key(cache_root() / "audit-signing.key"))
    DocumentStore(url).add("local", "hr", "leave.md", LEAVE)
    return url, log


def serve(engine, world, **settings):
    url, log = world
    s = ServerSettings(model_name=MODEL, database_url=url, audit_database_url=url,
                       audit_content="full", **settings)
    return running_server(build_app(engine, s, audit_log=log))


def oai(u: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)


PYTHON_TOOL = {"type": "code_interpreter", "container": {"type": "auto"}}


def test_responses_runs_python_and_continues_from_its_output(world):
    engine = ScriptedEngine(THINK_AND_RUN, ANSWER_42)
    with serve(engine, world) as u:
        r = oai(u).responses.create(model=MODEL, input="What is 6 times 7?", tools=[PYTHON_TOOL],
                                    include=["code_interpreter_call.outputs"])
    assert [o.type for o in r.output] == ["reasoning", "code_interpreter_call", "message"]
    call = r.output[1]
    assert call.code == "print(6 * 7)" and call.status == "completed"
    assert call.outputs[0].logs == "42\n" and call.container_id.startswith("cntr_")
    assert r.output_text == "The answer is 42."
    # step 2 read exactly step 1's prompt, the model's own tokens and the tool's answer
    assert engine.prompts[1] == (engine.prompts[0] + harmony_ids(THINK_AND_RUN)
                                 + tool_result_ids("python", "42\n"))
    assert "Internet access for this session is disabled." in engine.prompt_text(0)
    # usage counts both steps
    assert r.usage.input_tokens == len(engine.prompts[0]) + len(engine.prompts[1])
    # the audit log: step 1 (request, completion, tool), step 2 (request, completion)
    _, log = world
    kinds = [(x["record_id"], x["kind"]) for x in log.list()]
    assert kinds == [(r.id, "request"), (r.id, "completion"), (r.id, "tool"),
                     (f"{r.id}-step1", "request"), (f"{r.id}-step1", "completion")]
    leaves = log.get(r.id)
    tool = leaves[2]
    assert tool["recipient"] == "python" and tool["status"] == "completed"
    content = leaves[0]["content"]  # a record's content parts, merged
    assert (content["tool_arguments"], content["tool_output"]) == ("print(6 * 7)", "42\n")
    step = log.get(f"{r.id}-step1")
    assert step[0]["continues"] == r.id and step[0]["step"] == 1
    assert step[0]["content"]["prompt_ids"] == engine.prompts[1]  # what replay needs
    assert log.verify(load_signing_key(cache_root() / "audit-signing.key").public_key()).ok


def test_responses_stream_has_the_code_interpreter_events_in_order(world):
    engine = ScriptedEngine(THINK_AND_RUN, ANSWER_42)
    with serve(engine, world) as u:
        with oai(u).responses.stream(model=MODEL, input="6*7?", tools=[PYTHON_TOOL]) as s:
            events = [e.type for e in s]
            final = s.get_final_response()
    ci = [e for e in events if "code_interpreter" in e]
    assert ci[0] == "response.code_interpreter_call.in_progress"
    assert ci[-3:] == ["response.code_interpreter_call_code.done",
                       "response.code_interpreter_call.interpreting",
                       "response.code_interpreter_call.completed"]
    assert "response.code_interpreter_call_code.delta" in ci
    assert final.output[1].outputs[0].logs == "42\n" and final.output_text == "The answer is 42."


def test_a_container_keeps_its_state_and_is_the_callers_alone(world):
    set_x = "<|channel|>analysis to=python code<|message|>x = 41<|call|>"
    use_x = "<|channel|>analysis to=python code<|message|>print(x + 1)<|call|>"
    engine = ScriptedEngine(set_x, ANSWER_42, use_x, ANSWER_42)
    with serve(engine, world) as u:
        first = oai(u).responses.create(model=MODEL, input="a", tools=[PYTHON_TOOL])
        container = first.output[0].container_id
        second = oai(u).responses.create(
            model=MODEL, input="b", tools=[{"type": "code_interpreter", "container": container}])
        assert second.output[0].outputs[0].logs == "42\n"  # x survived between requests
        r = httpx.post(f"{u}/v1/responses", json={
            "model": MODEL, "input": "c",
            "tools": [{"type": "code_interpreter", "container": "cntr_" + "0" * 32}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "container_not_found"


def test_browser_answers_with_a_citation_in_both_apis(world):
    engine = ScriptedEngine(SEARCH, OPEN, CITED)
    with serve(engine, world, builtin_tools=("browser",)) as u:
        r = oai(u).responses.create(model=MODEL, input="How much annual leave?",
                                    tools=[{"type": "web_search"}],
                                    include=["web_search_call.action.sources"])
        calls = [o for o in r.output if o.type == "web_search_call"]
        assert [c.action.type for c in calls] == ["search", "open_page"]
        (source,) = calls[0].action.sources  # the one document the search found
        assert source.url.startswith("inhouse://documents/doc_") and source.type == "url"
        assert calls[0].action.query == "annual leave" and calls[0].status == "completed"
        text = r.output[-1].content[0]
        (note,) = text.annotations
        assert note.type == "url_citation" and note.title == "Leave policy"
        assert note.url.startswith("inhouse://documents/doc_") and note.url.endswith("#L22-L23")
        assert text.text[note.start_index:note.end_index] == "【1†L22-L23】"
        # what the model read after opening: the document's lines, numbered
        assert "L22: Staff get 25 days of annual leave per year." in engine.prompt_text(2)
        # Chat Completions: the server's --builtin-tools, the same loop, chat's annotation shape
        c = oai(u).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "leave?"}])
        msg = c.choices[0].message
        assert c.choices[0].finish_reason == "stop"
        assert msg.content == "Staff get 25 days of leave 【1†L22-L23】."
        (ann,) = msg.annotations
        assert ann.url_citation.title == "Leave policy" and ann.url_citation.url.endswith("#L22-L23")
        stream = oai(u).chat.completions.create(model=MODEL, stream=True,
                                                messages=[{"role": "user", "content": "leave?"}])
        chunks = [json.loads(ch.model_dump_json()) for ch in stream]
        found = [ch["choices"][0]["delta"].get("annotations") for ch in chunks if ch["choices"]]
        assert any(found)


def test_the_loop_stops_at_the_call_limit_and_says_the_turn_was_cut(world):
    engine = ScriptedEngine(THINK_AND_RUN)  # a model that never stops calling
    with serve(engine, world, max_tool_calls=2) as u:
        r = oai(u).responses.create(model=MODEL, input="loop", tools=[PYTHON_TOOL])
    assert len(engine.prompts) == 3 and r.status == "incomplete"
    calls = [o for o in r.output if o.type == "code_interpreter_call"]
    assert [c.status for c in calls] == ["completed", "completed", "incomplete"]


def test_tools_the_server_cannot_honour_are_refused(world):
    with serve(ScriptedEngine(ANSWER_42), world) as u:
        for tool, param in [({"type": "web_search", "external_web_access": True},
                             "tools[0].external_web_access"),
                            ({"type": "web_search", "filters": {"allowed_domains": ["x.com"]}},
                             "tools[0].filters"),
                            ({"type": "code_interpreter",
                              "container": {"type": "auto", "file_ids": ["file_1"]}},
                             "tools[0].container.file_ids"),
                            ({"type": "code_interpreter",
                              "container": {"type": "auto", "memory_limit": "64g"}},
                             "tools[0].container.memory_limit")]:
            r = httpx.post(f"{u}/v1/responses", json={"model": MODEL, "input": "x", "tools": [tool]})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_without_a_sandbox_python_is_refused_never_run(world, monkeypatch):
    from inhouse.tools import sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.probe.cache_clear()
    engine = ScriptedEngine(THINK_AND_RUN, ANSWER_42)
    try:
        with serve(engine, world) as u:
            r = httpx.post(f"{u}/v1/responses",
                           json={"model": MODEL, "input": "x", "tools": [PYTHON_TOOL]})
            assert r.status_code == 400 and "bubblewrap" in r.json()["error"]["message"]
            assert engine.prompts == []  # refused before the model ran
    finally:
        sandbox.probe.cache_clear()


def test_previous_turns_with_builtin_calls_continue(world):
    engine = ScriptedEngine(THINK_AND_RUN, ANSWER_42, ANSWER_42)
    with serve(engine, world) as u:
        first = oai(u).responses.create(model=MODEL, input="6*7?", tools=[PYTHON_TOOL])
        second = oai(u).responses.create(model=MODEL, input="and again?",
                                         previous_response_id=first.id, tools=[PYTHON_TOOL])
        assert second.output_text == "The answer is 42."
        # the earlier call's items are accepted as input too (a client that replays output)
        items = [o.model_dump(exclude_none=True) for o in first.output]
        third = httpx.post(f"{u}/v1/responses", json={
            "model": MODEL, "input": [{"role": "user", "content": "6*7?"}] + items
            + [{"role": "user", "content": "thanks"}]})
        assert third.status_code == 200, third.text


def test_under_pii_masking_the_tool_reads_placeholders_and_the_client_sees_values(world):
    """The model (and so the sandbox) sees placeholders; what comes back to the client has the
    values restored; the tool's output is masked again before the model reads it."""
    code = "<|channel|>analysis to=python code<|message|>print('<SIN_1>')<|call|>"
    engine = ScriptedEngine(code, ANSWER_42)
    with serve(engine, world, pii_mode="mask") as u:
        r = oai(u).responses.create(model=MODEL, input="My SIN is 046 454 286; echo it",
                                    tools=[PYTHON_TOOL])
    call = r.output[0]
    assert call.code == "print('046 454 286')" and call.outputs[0].logs == "046 454 286\n"
    assert "046 454 286" not in engine.prompt_text(1)  # the model read the placeholder back
    assert "<SIN_1>" in engine.prompt_text(1)


def test_a_continuation_that_no_longer_fits_ends_the_turn_cut(world):
    """The tool's answer pushed the prompt past the context window: the turn ends as cut, with
    what it has; nothing fails."""
    from inhouse.config import preset
    import dataclasses

    flood = "<|channel|>analysis to=python code<|message|>print('x' * 60000)<|call|>"
    small = dataclasses.replace(preset("tiny"), max_position_embeddings=2048)
    engine = ScriptedEngine(flood, ANSWER_42, config=small)
    with serve(engine, world) as u:
        r = oai(u).responses.create(model=MODEL, input="flood", tools=[PYTHON_TOOL],
                                    max_output_tokens=100)
    assert r.status == "incomplete" and len(engine.prompts) == 1
    assert r.output[0].type == "code_interpreter_call" and r.output[0].status == "completed"
    _, log = world
    kinds = [(x["record_id"].endswith("-step1"), x["kind"]) for x in log.list()]
    assert kinds[-2:] == [(True, "request"), (True, "completion")]
    assert log.get(f"{r.id}-step1")[-1]["finish_reason"] == "refused"


def test_audit_list_says_what_each_tool_and_policy_leaf_did(world):
    from typer.testing import CliRunner

    from inhouse.cli.app import app

    engine = ScriptedEngine(THINK_AND_RUN, ANSWER_42)
    with serve(engine, world) as u:
        oai(u).responses.create(model=MODEL, input="6*7?", tools=[PYTHON_TOOL])
    url, _ = world
    r = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["audit", "list", "--database-url", url])
    assert r.exit_code == 0 and "python completed" in r.output
