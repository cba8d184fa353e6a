"""Bad input gets a 4xx in OpenAI's error shape, and the server stays healthy afterwards."""

import httpx
import openai
import pytest

from inhouse.config import ServerSettings
from inhouse.server import build_app
from tests.server_utils import ScriptedEngine, running_server

MODEL = "tiny-test"
FINAL = "<|channel|>final<|message|>ok<|return|>"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def url():
    with running_server(build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL))) as u:
        yield u


def post(url, body=None, content=None, headers=None):
    return httpx.post(f"{url}/v1/chat/completions", json=body, content=content,
                      headers=headers, timeout=30)


def assert_openai_error(r, status, param=None, contains=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if contains:
        assert contains in err["message"]


BAD = [
    (dict(content=b"{not json", headers={"content-type": "application/json"}), None),
    (dict(content=b'{"model": "tiny-test", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
          headers={"content-type": "application/json"}), None),
    (dict(body={**GOOD, "temperature": "hot"}), "temperature"),
    (dict(body={**GOOD, "max_tokens": -5}), "max_tokens"),
    (dict(body={**GOOD, "max_tokens": 10**9}), "max_tokens"),
    (dict(body={**GOOD, "top_p": 1.5}), "top_p"),
    (dict(body={**GOOD, "n": 100}), "n"),
    (dict(body={**GOOD, "unknown_field": 1}), "unknown_field"),
    (dict(body={"model": MODEL, "messages": []}), "messages"),
    (dict(body={"model": MODEL}), "messages"),
    (dict(body={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), "messages[0].role"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": ""}]}), "messages[0].content"),
    (dict(body={"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}), "messages[0].tool_call_id"),
    (dict(body={**GOOD, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}),
     "tools[0].function.name"),
    (dict(body={**GOOD, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}}]}),
     "tools[0].function.parameters"),
    (dict(body={**GOOD, "tool_choice": "required"}), "tool_choice"),
    (dict(body={**GOOD, "stop": ["a", "b", "c", "d", "e"]}), "stop"),
    (dict(body={**GOOD, "messages": "hello"}), "messages"),
    (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "x"},
                                             {"role": "tool", "tool_call_id": "c9", "content": "r"}]}),
     "messages[1]"),  # a tool result with no call before it
]


@pytest.mark.parametrize("kwargs, param", BAD)
def test_bad_input_is_a_400_and_the_server_stays_healthy(url, kwargs, param):
    r = post(url, **kwargs)
    assert_openai_error(r, 400, param)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert post(url, GOOD).status_code == 200


def test_a_1mb_prompt_says_by_how_much_it_overflows(url):
    big = "word " * 220_000  # about 1.1 MB, over the 131072-token context
    r = post(url, {"model": MODEL, "messages": [{"role": "user", "content": big}]})
    assert_openai_error(r, 400, "messages", "over by")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert post(url, GOOD).status_code == 200


def test_unknown_model_is_404(url):
    assert_openai_error(post(url, {**GOOD, "model": "gpt-5"}), 404, "model")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).models.retrieve("gpt-5")


def test_unknown_route_and_method(url):
    assert_openai_error(httpx.get(f"{url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{url}/v1/chat/completions"), 405)


def test_oversized_body_is_413():
    app = build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL, max_body_bytes=1000))
    with running_server(app) as u:
        r = post(u, {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]})
        assert_openai_error(r, 413)


def test_api_keys():
    app = build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL, api_keys=("sk-right",)))
    with running_server(app) as u:
        assert_openai_error(post(u, GOOD), 401)
        assert_openai_error(post(u, GOOD, headers={"Authorization": "Bearer sk-wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{u}/v1", api_key="sk-wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="sk-right", max_retries=0)
        assert c.chat.completions.create(**GOOD).choices[0].message.content == "ok"
        assert httpx.get(f"{u}/health").status_code == 200  # liveness needs no key


def test_full_queue_is_429_with_retry_after():
    app = build_app(ScriptedEngine(queue_full=True), ServerSettings(model_name=MODEL))
    with running_server(app) as u:
        r = post(u, GOOD)
        assert_openai_error(r, 429)
        assert r.headers["retry-after"] == "1"
        r = post(u, {**GOOD, "stream": True})
        assert_openai_error(r, 429)  # refused before the stream starts: a status, not an event


def test_metrics_count_requests_and_tokens(url):
    post(url, GOOD)
    text = httpx.get(f"{url}/metrics").text
    assert 'inhouse_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "inhouse_completion_tokens_total" in text and "inhouse_queue_depth" in text
    assert "inhouse_time_to_first_token_seconds_bucket" in text
