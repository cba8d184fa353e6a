"""/v1/responses through a real server on 127.0.0.1, with the official openai client."""

import asyncio
import json

import httpx
import openai
import pytest

from inhouse.config import ServerSettings
from inhouse.engine import AsyncEngine, LLMEngine
from inhouse.model import load_model
from inhouse.server import build_app
from inhouse.governance.responses_store import ResponseStore
from tests.server_utils import ScriptedEngine, running_server
from tests.test_server_chat import FINAL, TOOL_CALL

MODEL = "tiny-test"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}]


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


@pytest.fixture
def store(tmp_path):
    return ResponseStore(f"sqlite:///{tmp_path / 'responses.db'}")


@pytest.fixture(scope="module")
def real(checkpoints, tmp_path_factory):
    from inhouse.harmony.grammar import GrammarBackend

    engine = AsyncEngine(LLMEngine(load_model(checkpoints["hf"]), grammars=GrammarBackend()))
    store = ResponseStore(f"sqlite:///{tmp_path_factory.mktemp('db') / 'r.db'}")
    with running_server(build_app(engine, ServerSettings(model_name=MODEL), store)) as url:
        yield url
    engine.shutdown()


def test_real_model_sync_async_and_stream(real):
    r = client(real).responses.create(model=MODEL, input="Hello", max_output_tokens=8,
                                   extra_body={"seed": 3})
    assert r.object == "response" and r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 20
    text = "".join(p.text for o in r.output if o.type == "message" for p in o.content)

    async def a():
        c = openai.AsyncOpenAI(base_url=f"{real}/v1", api_key="x", max_retries=0)
        return await c.responses.create(model=MODEL, input="Hello", max_output_tokens=8,
                                   extra_body={"seed": 3})

    again = asyncio.run(a())
    assert "".join(p.text for o in again.output if o.type == "message" for p in o.content) == text
    events = list(client(real).responses.create(model=MODEL, input="Hello", max_output_tokens=8,
                                                extra_body={"seed": 3}, stream=True))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == text


def test_tool_call_then_result_through_previous_response_id(store):
    engine = ScriptedEngine(TOOL_CALL, FINAL)
    with running_server(build_app(engine, ServerSettings(model_name=MODEL), store)) as url:
        c = client(url)
        first = c.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS,
                                   instructions="Answer briefly.")
        assert [o.type for o in first.output] == ["reasoning", "function_call"]
        reasoning, call = first.output
        assert reasoning.content[0].text == "Need the weather."
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
        assert first.usage.output_tokens_details.reasoning_tokens > 0
        assert first.usage.input_tokens == len(engine.prompts[0])
        second = c.responses.create(model=MODEL, previous_response_id=first.id, tools=TOOLS,
                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                            "output": '{"temp": 20}'}])
        assert "Answer briefly." in engine.prompt_text(0)
        prompt = engine.prompt_text(1)
        assert ("<|channel|>analysis<|message|>Need the weather.<|end|>"
                "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
                '<|message|>{"city": "Paris"}<|call|>'
                '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
                '{"temp": 20}<|end|><|start|>assistant') in prompt
        assert second.output_text == "Sunny, 20 C in Paris."
        assert [o.type for o in second.output] == ["reasoning", "message"]


def test_manual_history_items_with_reasoning_passed_back(store):
    engine = ScriptedEngine(FINAL)
    with running_server(build_app(engine, ServerSettings(model_name=MODEL), store)) as url:
        client(url).responses.create(model=MODEL, tools=TOOLS, input=[
            {"role": "user", "content": "Weather?"},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "content": [{"type": "reasoning_text", "text": "I should call the tool."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "{}"}])
    assert "<|channel|>analysis<|message|>I should call the tool.<|end|>" in engine.prompt_text()


def test_streamed_function_call_events(store):
    with running_server(build_app(ScriptedEngine(TOOL_CALL), ServerSettings(model_name=MODEL),
                                  store)) as url:
        events = list(client(url).responses.create(model=MODEL, input="x", tools=TOOLS, stream=True))
    types = [e.type for e in events]
    assert types.index("response.reasoning_text.delta") < types.index("response.function_call_arguments.delta")
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"][0]
    assert json.loads(args) == json.loads(done.arguments) == {"city": "Paris"}
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "function_call"] and types[-1] == "response.completed"
    assert events[-1].response.output[1].status == "completed"


def test_store_get_delete(store):
    with running_server(build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL),
                                  store)) as url:
        c = client(url)
        kept = c.responses.create(model=MODEL, input="x")
        assert c.responses.retrieve(kept.id).output_text == "Sunny, 20 C in Paris."
        c.responses.delete(kept.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(kept.id)
        unstored = c.responses.create(model=MODEL, input="x", store=False)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(unstored.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.create(model=MODEL, input="x", previous_response_id="resp_missing")


def test_input_items_are_listed_as_the_official_client_reads_them(store):
    from openai.types.responses import ResponseItem
    from pydantic import TypeAdapter

    with running_server(build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL),
                                  store)) as url:
        c = client(url)
        first = c.responses.create(model=MODEL, input="Weather in Paris?")
        second = c.responses.create(model=MODEL, previous_response_id=first.id, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "And Rome?"}]},
            {"role": "developer", "content": "Be brief."}])
        (only,) = c.responses.input_items.list(first.id).data
        assert only.type == "message" and only.content[0].text == "Weather in Paris?"
        walked = list(c.responses.input_items.list(second.id, order="asc", limit=2))  # pages of 2
        listed = httpx.get(f"{url}/v1/responses/{second.id}/input_items",
                           params={"order": "asc", "limit": 100}).json()
        newest = httpx.get(f"{url}/v1/responses/{second.id}/input_items",
                           params={"limit": 1}).json()
        bad = {name: httpx.get(f"{url}/v1/responses/{second.id}/input_items", params=params)
               for name, params in [("limit", {"limit": 0}), ("limit", {"limit": "many"}),
                                    ("order", {"order": "sideways"}),
                                    ("after", {"after": "msg_nope"}),
                                    ("include", {"include[]": "x"})]}
        missing = httpx.get(f"{url}/v1/responses/resp_missing/input_items")
    items = listed["data"]
    for item in items:  # every field OpenAI's item types require
        TypeAdapter(ResponseItem).validate_python(item)
    # the chain: the first request's input, the first answer's output, then the second input
    assert items[0]["id"] == only.id  # an item keeps its id from response to response
    assert [i["id"] for i in items[1:-2]] == [o.id for o in first.output]
    assert [i["content"][0]["text"] for i in items[-2:]] == ["And Rome?", "Be brief."]
    assert [i.id for i in walked] == [i["id"] for i in items] and len(set(i.id for i in walked)) \
        == len(items)
    assert newest["has_more"] and newest["data"][0]["id"] == items[-1]["id"] == newest["last_id"]
    for name, r in bad.items():
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    assert missing.status_code == 404


@pytest.mark.parametrize("body, param", [
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "{}"}]}, "input[0].call_id"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": 5}}]},
     "tools[0].parameters"),
    ({"input": []}, "input"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "max_output_tokens": 10**9}, "max_output_tokens"),
])
def test_bad_responses_requests(store, body, param):
    with running_server(build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL),
                                  store)) as url:
        r = httpx.post(f"{url}/v1/responses", json={"model": MODEL, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def test_top_logprobs_come_with_each_output_token(real):
    """Issue 19: `top_logprobs` and include "message.output_text.logprobs" are served. The tiny
    random model is held to a JSON answer (json_object), so that a message is always written;
    its logprobs are those of the distribution sampled (the grammar's mask applied)."""
    kw = dict(model=MODEL, input="Hello", max_output_tokens=40, top_logprobs=2,
              include=["message.output_text.logprobs"], text={"format": {"type": "json_object"}},
              extra_body={"seed": 5})
    r = client(real).responses.create(**kw)
    (part,) = [p for o in r.output if o.type == "message" for p in o.content]
    # where the grammar allowed one token only, it is the one alternative (never a -inf one)
    assert part.logprobs and all(lp.logprob <= 0 and 1 <= len(lp.top_logprobs) <= 2
                                 for lp in part.logprobs)
    json.loads(part.text)
    events = list(client(real).responses.create(stream=True, **kw))
    deltas = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [(d.token, d.logprob) for d in deltas] == [(lp.token, lp.logprob) for lp in part.logprobs]
    plain = client(real).responses.create(**kw | {"top_logprobs": None, "include": None})
    assert all(not p.logprobs for o in plain.output if o.type == "message" for p in o.content)


def test_truncation_auto_drops_the_oldest_turns_and_says_so(store):
    """A conversation longer than the context: refused as it is, served with truncation "auto"
    (the oldest turns dropped, the instructions and the last turn kept, the count in usage)."""
    engine = ScriptedEngine(FINAL)
    context = engine.model_config.max_position_embeddings
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"turn {i} " + "word " * (context // 10)},
                  {"role": "assistant", "content": f"answer {i}"}]
    turns.append({"role": "user", "content": "the last question"})
    body = {"model": MODEL, "input": turns, "instructions": "Be brief.", "max_output_tokens": 16}
    with running_server(build_app(engine, ServerSettings(model_name=MODEL), store)) as url:
        refused = httpx.post(f"{url}/v1/responses", json=body)
        assert refused.status_code == 400, refused.text
        r = client(url).responses.create(**body, truncation="auto")
    prompt = engine.prompt_text()
    assert "the last question" in prompt and "Be brief." in prompt and "turn 0 " not in prompt
    assert r.truncation == "auto" and r.output_text
    dropped = r.usage.input_tokens_details.model_extra["truncated_items"]
    assert dropped % 2 == 0 and 0 < dropped < len(turns) - 1
    assert f"turn {dropped // 2} " in prompt  # the first turn kept is the one after the cut
    assert r.usage.input_tokens + 16 <= context
