"""Issue 17, tried as a hostile user would: each numbered finding, reproduced against a real
server on 127.0.0.1 (and, where it matters, a real tiny model), now refused or contained.

1 tenancy of stored responses and subjects; 2 erasure and export over every store, nothing left
in the files; 3 degenerate sampling touches no one (also test_engine_isolation.py); 4 stray
harmony tokens (also test_parser_hostile.py, test_demo.py); 5 surrogates and harmony panics;
6 body limit, the event loop, disconnects, Retry-After; 7 adapters at bf16 (test_adapters_bf16
below); 8 exposure and metrics; 9 SINs (test_pii.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.config import EngineConfig, ServerSettings, cache_root
from inhouse.engine import AsyncEngine, LLMEngine
from inhouse.engine.engine import EngineStats
from inhouse.governance.audit_log import AuditLog, load_signing_key
from inhouse.governance.keys import KeyStore
from inhouse.governance.responses_store import ResponseStore
from inhouse.model import load_model
from inhouse.server import build_app
from tests.server_utils import ScriptedEngine, running_server
from tests.test_server_chat import FINAL

MODEL = "tiny-test"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def oai(url: str, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


@pytest.fixture
def world(tmp_path):
    """A server's three stores in one SQLite file, as `serve --database-url` makes them."""
    url = f"sqlite:///{tmp_path / 'data' / 'inhouse.db'}"
    keys = KeyStore(url)
    log = AuditLog(url, load_signing_key(cache_root() / "audit-signing.key"))
    return url, keys, log, ResponseStore(url)


def _app(engine, world, **settings):
    url, keys, log, store = world
    s = ServerSettings(model_name=MODEL, database_url=url, audit_database_url=url, **settings)
    return build_app(engine, s, store=store, audit_log=log, key_store=keys)


# ---- 1: stored responses belong to a tenant; subjects are not anyone's to claim ------------------
def test_another_tenant_cannot_read_delete_or_continue_a_stored_response(world):
    _, keys, log, _ = world
    engine = ScriptedEngine(FINAL)
    _, key_a = keys.create("alice's app", "user")
    _, key_b = keys.create("bob's app", "user")
    _, key_c = keys.create("clinic front desk", "user", tenant="clinic")
    _, key_d = keys.create("clinic back office", "user", tenant="clinic")
    _, admin = keys.create("ops", "admin")
    with running_server(_app(engine, world)) as u:
        a = oai(u, key_a).responses.create(model=MODEL, input="alice's secret plan", store=True)
        prompts_before = len(engine.prompts)
        for verb, path in (("get", ""), ("delete", ""), ("get", "/input_items")):
            r = httpx.request(verb.upper(), f"{u}/v1/responses/{a.id}{path}",
                              headers=bearer(key_b))
            assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
        with pytest.raises(openai.NotFoundError):
            oai(u, key_b).responses.create(model=MODEL, input="go on",
                                           previous_response_id=a.id)
        assert len(engine.prompts) == prompts_before  # nothing of alice's reached the model
        missing = httpx.get(f"{u}/v1/responses/resp_doesnotexist", headers=bearer(key_b))
        assert missing.json() == httpx.get(f"{u}/v1/responses/{a.id}",
                                           headers=bearer(key_b)).json() | {
            "error": missing.json()["error"] | {"message": missing.json()["error"]["message"]}}
        assert httpx.get(f"{u}/v1/responses/{a.id}", headers=bearer(key_a)).status_code == 200
        mine = httpx.get(f"{u}/v1/responses/{a.id}/input_items", headers=bearer(key_a))
        assert mine.json()["data"][0]["content"][0]["text"] == "alice's secret plan"
        assert httpx.get(f"{u}/v1/responses/{a.id}", headers=bearer(admin)).status_code == 200
        c = oai(u, key_c).responses.create(model=MODEL, input="shared within the clinic")
        assert oai(u, key_d).responses.retrieve(c.id).id == c.id  # same tenant: shared
        assert httpx.get(f"{u}/v1/responses/{c.id}", headers=bearer(key_a)).status_code == 404
        assert httpx.delete(f"{u}/v1/responses/{a.id}", headers=bearer(key_a)).status_code == 200


def test_a_key_names_no_subject_but_its_own_unless_allowed(world):
    _, keys, log, _ = world
    _, plain = keys.create("app", "user")
    bound, key_bound = keys.create("alice's phone", "user", subject="alice")
    _, key_proxy = keys.create("portal", "user", on_behalf=True)
    with running_server(_app(ScriptedEngine(FINAL), world)) as u:
        for headers, body, param in [({"X-Subject-Id": "bob"}, BODY, "X-Subject-Id"),
                                     ({}, BODY | {"user": "bob"}, "user")]:
            r = httpx.post(f"{u}/v1/chat/completions", json=body,
                           headers=bearer(plain) | headers)
            assert r.status_code == 403 and r.json()["error"]["param"] == param
            r = httpx.post(f"{u}/v1/chat/completions", json=body,
                           headers=bearer(key_bound) | headers)
            assert r.status_code == 403  # bound to alice: may not file under bob
        assert httpx.post(f"{u}/v1/chat/completions", json=BODY | {"user": "alice"},
                          headers=bearer(key_bound)).status_code == 200
        assert httpx.post(f"{u}/v1/chat/completions", json=BODY,
                          headers=bearer(key_bound)).status_code == 200
        assert httpx.post(f"{u}/v1/chat/completions", json=BODY,
                          headers=bearer(key_proxy) | {"X-Subject-Id": "carol"}).status_code == 200
    subjects = [r["subject"] for r in log.list() if r["kind"] == "request"]
    assert subjects == ["alice", "alice", "carol"]
    assert {r["api_key_id"] for r in log.list() if r["kind"] == "request"} >= {bound.id}


# ---- 2: erasure and export reach every store, and the files forget ---------------------------------
def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.is_file())


def test_erase_and_export_cover_stored_responses_and_no_text_survives_in_the_files(world, tmp_path):
    url, keys, log, _ = world
    marker = "zebra-orchid-4471"
    with running_server(_app(ScriptedEngine(FINAL), world, pii_mode="mask",
                             audit_content="none")) as u:
        stored = oai(u).responses.create(model=MODEL, store=True, user="dana",
                                         input=f"{marker}: my SIN is 046 454 286")
        oai(u).responses.create(model=MODEL, user="dana", input=f"{marker} not kept")
        assert httpx.get(f"{u}/v1/responses/{stored.id}").status_code == 200
    rows = ResponseStore(url).export("dana")
    assert [r["id"] for r in rows] == [stored.id]  # audit content none: only what asked for store
    kept = json.dumps(rows)
    assert "046 454 286" not in kept and "<SIN_1>" in kept  # stored masked, never the value
    folder = tmp_path / "data"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for p in folder.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    runner = CliRunner()
    exported = runner.invoke(cli, ["audit", "export", "--subject", "dana", "--database-url", url])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["stored_responses"][0]["id"] == stored.id
    assert marker.encode() in _all_bytes(folder)
    erased = runner.invoke(cli, ["audit", "erase", "--subject", "dana", "--database-url", url])
    assert erased.exit_code == 0 and "1 stored response" in erased.stdout, erased.output
    assert marker.encode() not in _all_bytes(folder)  # not in free pages, not in the WAL
    assert json.loads(runner.invoke(cli, ["audit", "export", "--subject", "dana", "--database-url",
                                          url]).stdout)["stored_responses"] == []
    assert runner.invoke(cli, ["audit", "verify", "--database-url", url]).exit_code == 0


def test_the_cache_folder_and_its_files_are_private(tmp_path, monkeypatch):
    monkeypatch.setenv("INHOUSE_CACHE", str(tmp_path / "cache"))
    app = build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL))
    with running_server(app) as u:
        assert httpx.post(f"{u}/v1/chat/completions", json=BODY).status_code == 200
    cache = tmp_path / "cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    for p in cache.iterdir():
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


# ---- 3: degenerate sampling numbers touch no one (a real model, concurrent requests) ----------------
@pytest.fixture(scope="module")
def real_url(checkpoints):
    client = AsyncEngine(LLMEngine(load_model(checkpoints["hf"]),
                                   EngineConfig(mode="reproducible", max_num_seqs=16)))
    settings = ServerSettings(model_name=MODEL, audit=False)
    with running_server(build_app(client, settings)) as url:
        yield url
    client.shutdown()


def test_poisoned_requests_fail_no_innocent_one(real_url):
    poison = [{"temperature": 1e-39}, {"temperature": 5e-324}, {"top_p": 1e-46},
              {"messages": [{"role": "user", "content": "\ud800"}]},
              {"messages": [{"role": "user", "content": "{" * 1_000_000}]}]
    base = {"model": MODEL, "max_tokens": 8, "seed": 1,
            "messages": [{"role": "user", "content": "hello"}]}

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            async def one(body, stream):
                raw = json.dumps(body | {"stream": stream})  # ASCII: a lone surrogate escaped
                h = {"content-type": "application/json"}
                if stream:
                    async with c.stream("POST", f"{real_url}/v1/chat/completions", content=raw,
                                        headers=h) as r:
                        lines = [x async for x in r.aiter_lines() if x.startswith("data:")]
                        return r.status_code, lines[-1] if lines else ""
                r = await c.post(f"{real_url}/v1/chat/completions", content=raw, headers=h)
                return r.status_code, r.text
            innocent = [one(base | {"seed": i}, i % 2 == 0) for i in range(12)]
            poisoned = [one(base | p, i % 2 == 1) for i, p in enumerate(poison)]
            return await asyncio.gather(*innocent), await asyncio.gather(*poisoned)

    innocent, poisoned = asyncio.run(run())
    assert all(code == 200 for code, _ in innocent), innocent
    assert all(last == "data: [DONE]" for (code, last), i in zip(innocent, range(12)) if i % 2 == 0)
    assert [code for code, _ in poisoned[:3]] == [200, 200, 200]  # greedy, not NaN
    assert [code for code, _ in poisoned[3:]] == [400, 400]
    assert httpx.get(f"{real_url}/health").status_code == 200


# ---- 4: stray harmony tokens never reach content, and never a 500 ---------------------------------
STRAY = ("<|channel|>analysis<|message|>thinking<|channel|> more<|end|><|start|>assistant"
         "<|channel|>final<|message|>Hi<|constrain|><|start|>assistant<|channel|>final<|message|>"
         " there<|return|>")


def test_stray_control_tokens_are_not_content(world):
    with running_server(_app(ScriptedEngine(STRAY), world)) as u:
        r = oai(u).chat.completions.create(model=MODEL, messages=BODY["messages"])
        assert r.choices[0].message.content == "Hi there"
        streamed = oai(u).chat.completions.create(model=MODEL, messages=BODY["messages"],
                                                  stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == "Hi there"
        resp = oai(u).responses.create(model=MODEL, input="hi")
        assert resp.output_text == "Hi there"
        assert "<|" not in json.dumps(resp.model_dump())


# ---- 5: input no encoder can write, input harmony panics on ----------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"model": "tiny-test", "messages": [{"role": "user", '
                             '"content": "a\\ud800b"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"model": "tiny-test", "user": "\\udfff", "messages": '
                             '[{"role": "user", "content": "hi"}]}', "user"),
    ("/v1/responses", '{"model": "tiny-test", "input": [{"role": "user", "content": '
                      '[{"type": "input_text", "text": "\\udc00"}]}]}', "input[0].content[0].text"),
    ("/v1/responses", '{"model": "tiny-test", "instructions": "x\\ud83d", "input": "hi"}',
     "instructions"),
])
def test_a_lone_surrogate_is_a_400_naming_the_parameter(world, path, body, param):
    with running_server(_app(ScriptedEngine(FINAL), world)) as u:
        r = httpx.post(f"{u}{path}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        paired = body.replace("\\ud800", "\\ud83d\\ude00")  # a real pair is fine
        if paired != body:
            assert httpx.post(f"{u}{path}", content=paired,
                              headers={"content-type": "application/json"}).status_code == 200


def test_harmony_panics_are_a_400_and_every_request_leaf_is_completed(world):
    _, _, log, _ = world
    with running_server(_app(ScriptedEngine(FINAL), world)) as u:
        for body in ({"model": MODEL, "messages": [{"role": "user", "content": "{" * 1_000_000}]},
                     {"model": MODEL, "input": "[" * 1_000_000}):
            path = "/v1/chat/completions" if "messages" in body else "/v1/responses"
            r = httpx.post(f"{u}{path}", json=body, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        deep = '{"model": "tiny-test", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
        r = httpx.post(f"{u}/v1/chat/completions", content=deep,
                       headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, r.text
        assert httpx.get(f"{u}/health").status_code == 200
    leaves = log.list()
    requests = {r["record_id"] for r in leaves if r["kind"] == "request"}
    completions = {r["record_id"] for r in leaves if r["kind"] == "completion"}
    assert requests and requests == completions


# ---- 6: load: the body limit, the event loop, clients that leave, honest Retry-After --------------
def test_a_chunked_upload_over_the_limit_is_413(world):
    with running_server(_app(ScriptedEngine(FINAL), world, max_body_bytes=1 << 20)) as u:
        def chunks():
            yield b'{"model": "tiny-test", "messages": [{"role": "user", "content": "'
            for _ in range(50):
                yield b"x" * (1 << 20)
            yield b'"}]}'
        r = httpx.post(f"{u}/v1/chat/completions", content=chunks(),
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert httpx.post(f"{u}/v1/chat/completions", json=BODY).status_code == 200


def test_health_answers_while_a_huge_prompt_is_tokenised(world):
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "lorem ipsum " * 600_000}]}
    worst = []
    with running_server(_app(ScriptedEngine(FINAL), world)) as u:
        done = threading.Event()

        def post():
            try:
                httpx.post(f"{u}/v1/chat/completions", json=huge, timeout=120)
            finally:
                done.set()

        t = threading.Thread(target=post)
        t.start()
        time.sleep(0.3)
        while not done.is_set():
            t0 = time.perf_counter()
            assert httpx.get(f"{u}/health", timeout=30).status_code == 200
            worst.append(time.perf_counter() - t0)
            time.sleep(0.05)
        t.join()
    assert worst and max(worst) < 1.0, worst  # 12 s behind one prompt before the fix


def test_a_non_streaming_request_whose_client_leaves_is_aborted_and_audited(world):
    _, _, log, _ = world
    long = "<|channel|>final<|message|>" + " word" * 400 + "<|return|>"
    engine = ScriptedEngine(long, delay=0.02)
    with running_server(_app(engine, world)) as u:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{u}/v1/chat/completions", json=BODY, timeout=0.5)
        deadline = time.time() + 10
        while not engine.aborted and time.time() < deadline:
            time.sleep(0.05)
    assert engine.aborted  # generation stopped: nobody is waiting for it
    deadline = time.time() + 5
    while time.time() < deadline:
        ends = [r for r in log.list() if r["kind"] == "completion"]
        if ends:
            break
        time.sleep(0.05)
    assert [e["finish_reason"] for e in ends] == ["disconnect"]


class _Busy(ScriptedEngine):
    def __init__(self, waiting: int, rate: float) -> None:
        super().__init__(FINAL, queue_full=True)
        self._s = EngineStats(16, waiting, 0, 1, rate)

    def stats(self) -> EngineStats:
        return self._s


@pytest.mark.parametrize("waiting, rate, expected", [(30, 0.5, 62), (3, 2.0, 2), (0, 0.0, 1),
                                                     (5, 0.0, 60)])
def test_retry_after_is_the_queue_over_its_drain_rate(world, waiting, rate, expected):
    with running_server(_app(_Busy(waiting, rate), world)) as u:
        r = httpx.post(f"{u}/v1/chat/completions", json=BODY)
    assert r.status_code == 429 and int(r.headers["retry-after"]) == expected


# ---- 8: exposure and metrics ----------------------------------------------------------------------
def test_serving_a_public_address_without_keys_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("INHOUSE_CACHE", str(tmp_path / "c"))
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "none")])
    assert r.exit_code == 1 and "refusing to serve 0.0.0.0 with no API keys" in r.output


class _Broken(ScriptedEngine):
    async def generate(self, request_id, prompt_ids, params):
        raise RuntimeError("the engine is broken")
        yield  # pragma: no cover


def test_metrics_count_5xx_and_time_requests_and_queue_waits(world):
    with running_server(_app(_Broken(), world)) as u:
        assert httpx.post(f"{u}/v1/chat/completions", json=BODY).status_code == 500
        text = httpx.get(f"{u}/metrics").text
    assert 'inhouse_requests_total{endpoint="/v1/chat/completions",status="500"} 1.0' in text
    assert 'inhouse_request_duration_seconds_count{endpoint="/v1/chat/completions"} 1.0' in text
    assert "inhouse_queue_wait_seconds_bucket" in text
    _, keys, _, _ = world
    _, key = keys.create("prometheus", "user")
    with running_server(_app(ScriptedEngine(FINAL), world, metrics_require_key=True)) as u:
        assert httpx.get(f"{u}/metrics").status_code == 401
        assert httpx.get(f"{u}/metrics", headers=bearer(key)).status_code == 200


def test_queue_wait_is_observed(real_url):
    r = httpx.post(f"{real_url}/v1/chat/completions", json=BODY | {"max_tokens": 2})
    assert r.status_code == 200
    text = httpx.get(f"{real_url}/metrics").text
    count = [line for line in text.splitlines() if line.startswith("inhouse_queue_wait_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1


class _FailsMidway(ScriptedEngine):
    """Yields a few tokens, then raises: whatever breaks under a stream."""

    async def generate(self, request_id, prompt_ids, params):
        n = 0
        async for out in super().generate(request_id, prompt_ids, params):
            yield out
            n += 1
            if n == 4:
                raise RuntimeError("kernel fault")


def test_a_stream_that_breaks_ends_with_an_error_event_not_a_cut(world):
    with running_server(_app(_FailsMidway(FINAL), world)) as u:
        with httpx.stream("POST", f"{u}/v1/chat/completions", json=BODY | {"stream": True}) as r:
            lines = [x for x in r.iter_lines() if x.startswith("data:")]
        assert lines[-1] == "data: [DONE]" and '"server_error"' in lines[-2]
        with httpx.stream("POST", f"{u}/v1/responses",
                          json={"model": MODEL, "input": "hi", "stream": True}) as r:
            events = [x for x in r.iter_lines() if x.startswith("event:")]
        assert events[-1] == "event: error"
        assert httpx.get(f"{u}/health").status_code == 200


# ---- issue 19 (first part): response_format ----------------------------------------------------
@pytest.mark.parametrize("fmt, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "not": {}}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
     "response_format.json_schema.json_schema.name"),
])
def test_a_response_format_that_cannot_be_enforced_is_a_400(world, fmt, param):
    with running_server(_app(ScriptedEngine(FINAL), world)) as u:
        r = httpx.post(f"{u}/v1/chat/completions", json=BODY | {"response_format": fmt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("response_format"), r.json()


@pytest.mark.parametrize("extra, param", [
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"include": ["message.output_text.logprobs", "file_search_call.results"]}, "include"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"truncation": "sometimes"}, "truncation"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "object", "not": {}}}}}, "text.format.schema"),
])
def test_responses_options_are_served_or_refused_never_ignored(world, extra, param):
    with running_server(_app(ScriptedEngine(FINAL), world)) as u:
        r = httpx.post(f"{u}/v1/responses", json={"model": MODEL, "input": "hi"} | extra)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_responses_echo_the_text_format(world):
    fmt = {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}
    with running_server(_app(ScriptedEngine(FINAL), world)) as u:
        r = oai(u).responses.create(model=MODEL, input="hi", text={"format": fmt})
    assert r.text.format.type == "json_schema" and r.text.format.name == "x"


def test_a_database_in_a_shared_folder_leaves_the_folder_alone(tmp_path):
    """sqlite:////tmp/x.db once made /tmp 0700 for everyone (PostgreSQL's tests then failed):
    a sticky, shared folder is never tightened; a folder of our own still is."""
    from inhouse.governance.database import open_database

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    open_database(f"sqlite:///{shared / 'x.db'}")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE((shared / "x.db").stat().st_mode) == 0o600
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    open_database(f"sqlite:///{own / 'x.db'}")
    assert stat.S_IMODE(own.stat().st_mode) == 0o700
