"""/v1/chat/completions through a real server on 127.0.0.1, with the official openai client."""

import asyncio
import json

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from inhouse.config import ServerSettings
from inhouse.engine import AsyncEngine, LLMEngine
from inhouse.harmony import ChatMessage, PromptOptions, load_encoding, render_prompt
from inhouse.model import load_model
from inhouse.server import build_app
from tests.server_utils import ScriptedEngine, running_server

MODEL = "tiny-test"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TOOL_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
             "<|channel|>commentary to=functions.get_weather <|constrain|>json"
             '<|message|>{"city": "Paris"}<|call|>')
FINAL = ("<|channel|>analysis<|message|>It is sunny.<|end|><|start|>assistant"
         "<|channel|>final<|message|>Sunny, 20 C in Paris.<|return|>")


@pytest.fixture(scope="module")
def real(checkpoints):
    client = AsyncEngine(LLMEngine(load_model(checkpoints["hf"])))
    with running_server(build_app(client, ServerSettings(model_name=MODEL))) as url:
        yield url, client
    client.shutdown()


def openai_client(url, key="unused"):
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def scripted_server(*scripts, **kw):
    engine = ScriptedEngine(*scripts)
    settings = ServerSettings(model_name=MODEL, **kw)
    return engine, running_server(build_app(engine, settings))


# ---- a real tiny model -----------------------------------------------------------------------
def test_completion_usage_and_seed(real):
    url, _ = real
    c = openai_client(url)
    msgs = [{"role": "user", "content": "Hello"}]
    a = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=9, seed=5)
    b = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=9, seed=5)
    assert a.choices[0].message.content == b.choices[0].message.content
    want_prompt = len(render_prompt([ChatMessage("user", "Hello")],
                                    PromptOptions("medium", a_date())))
    assert a.usage.prompt_tokens == want_prompt
    assert a.usage.completion_tokens == 9 and a.usage.total_tokens == want_prompt + 9
    assert a.choices[0].finish_reason == "length" and a.object == "chat.completion"


def a_date():
    import time
    return time.strftime("%Y-%m-%d")


def test_streaming_matches_non_streaming(real):
    url, _ = real
    c = openai_client(url)
    msgs = [{"role": "user", "content": "Tell me something"}]
    whole = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, seed=9)
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, seed=9,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == (whole.choices[0].message.content or "")
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_async_client_n_and_logprobs(real):
    url, _ = real

    async def main():
        c = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        return await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6, n=2, seed=1, temperature=1.0,
                                               logprobs=True, top_logprobs=3)

    r = asyncio.run(main())
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 12
    for ch in r.choices:
        for lp in ch.logprobs.content:
            assert lp.logprob <= 0 and len(lp.top_logprobs) == 3


def test_client_disconnect_cancels_generation(real):
    url, client = real
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 20000,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
    for _ in range(200):
        if client.stats().num_running == 0 and client.engine.kv.num_held == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert client.stats().num_running == 0 and client.engine.kv.num_held == 0


# ---- exact harmony sequences through the real server ----------------------------------------
def test_tool_call_with_reasoning_is_parsed_not_leaked():
    engine, server = scripted_server(TOOL_CALL)
    with server as url:
        r = openai_client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert m.content is None and m.model_extra["reasoning"] == "Need the weather."
    assert m.model_extra["reasoning_content"] == "Need the weather."
    call = m.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    assert "type get_weather = (_: {" in engine.prompt_text()


def test_streamed_tool_call_arrives_as_deltas():
    engine, server = scripted_server(TOOL_CALL)
    with server as url:
        chunks = list(openai_client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL],
            stream=True))
    deltas = [ch.choices[0].delta for ch in chunks]
    reasoning = "".join(d.model_extra.get("reasoning") or "" for d in deltas)
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert reasoning == "Need the weather."
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert len(calls) > 2 and all(tc.index == 0 for tc in calls)
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not (d.content or "").strip() for d in deltas)  # nothing leaked as text


def test_full_tool_loop_keeps_reasoning_between_call_and_result():
    engine, server = scripted_server(TOOL_CALL, FINAL)
    with server as url:
        c = openai_client(url)
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        first = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_TOOL])
        m = first.choices[0].message
        msgs.append({"role": "assistant", "content": None, "reasoning": m.model_extra["reasoning"],
                     "tool_calls": [tc.model_dump() for tc in m.tool_calls]})
        msgs.append({"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": '{"temp": 20}'})
        second = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_TOOL])
    prompt = engine.prompt_text(1)
    assert ("<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
            '<|message|>{"city": "Paris"}<|call|>'
            '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>'
            "<|start|>assistant") in prompt
    assert second.choices[0].message.content == "Sunny, 20 C in Paris."
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.model_extra["reasoning"] == "It is sunny."


def test_reasoning_content_alias_is_accepted_back():
    engine, server = scripted_server(FINAL)
    with server as url:
        openai_client(url).chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": "Q"},
            {"role": "assistant", "reasoning_content": "my earlier thoughts",
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{}"}], tools=[WEATHER_TOOL])
    assert "<|channel|>analysis<|message|>my earlier thoughts<|end|>" in engine.prompt_text()


def test_malformed_model_output_is_text_not_a_500():
    engine, server = scripted_server("hello there<|end|>")
    with server as url:
        r = openai_client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "hello there"


def test_reasoning_effort_reaches_the_system_message():
    engine, server = scripted_server(FINAL)
    with server as url:
        openai_client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], reasoning_effort="high")
    assert "Reasoning: high" in engine.prompt_text()


def follows(grammar: str, text: str) -> bool:
    from inhouse.harmony.grammar import GrammarBackend

    m = GrammarBackend().new_matcher(grammar)
    return all(m.consume(t) for t in load_encoding().encode(text, allowed_special="all"))


CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>'
ANSWER = "<|channel|>final<|message|>It is sunny.<|return|>"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_forces_a_call_by_grammar(choice):
    """The grammar the engine is given allows the call and nothing else (the engine's masking is
    tested in test_structured.py; this scripted engine writes what it is told)."""
    engine, server = scripted_server(CALL)
    with server as url:
        r = openai_client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER_TOOL],
            tool_choice=choice)
    grammar = engine.params[-1].grammar
    assert follows(grammar, CALL) and not follows(grammar, ANSWER)
    assert not follows(grammar, CALL.replace("get_weather", "get_time"))
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}


def test_tool_choice_none_makes_a_call_impossible():
    engine, server = scripted_server(FINAL)
    with server as url:
        openai_client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER_TOOL],
            tool_choice="none")
    grammar = engine.params[-1].grammar
    assert "get_weather" in engine.prompt_text()  # the tools stay in view, as OpenAI keeps them
    assert follows(grammar, ANSWER) and not follows(grammar, CALL)
    assert not follows(grammar, CALL.replace("<|channel|>commentary to=functions.get_weather ",
                                             " to=functions.get_weather<|channel|>commentary "))


def test_stop_strings_cut_the_answer():
    engine, server = scripted_server(FINAL)
    with server as url:
        c = openai_client(url)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                      stop=[" in Paris"])
        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                stop=[" in Paris"], stream=True))
    assert r.choices[0].message.content == "Sunny, 20 C" and r.choices[0].finish_reason == "stop"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Sunny, 20 C"
    assert engine.aborted  # the rest of the generation was cancelled
