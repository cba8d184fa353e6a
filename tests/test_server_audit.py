"""Every request through the real server leaves verifiable audit records."""

import json

import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.config import ServerSettings, cache_root
from inhouse.governance.audit_log import AuditLog, leaves_t, load_signing_key
from inhouse.server import build_app
from tests.server_utils import ScriptedEngine, running_server
from tests.test_server_chat import FINAL

MODEL = "tiny-test"


@pytest.fixture
def audited(tmp_path):
    key = load_signing_key(cache_root() / "audit-signing.key")
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    log = AuditLog(url, key, checkpoint_every=4)
    settings = ServerSettings(model_name=MODEL, audit_content="full", model_digest="sha256:abc",
                              engine_mode="reproducible")
    return log, url, key, settings


def test_requests_leave_start_and_completion_records_that_verify(audited):
    log, url, key, settings = audited
    engine = ScriptedEngine(FINAL)
    with running_server(build_app(engine, settings, audit_log=log)) as u:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "seed": 3}
        r = httpx.post(f"{u}/v1/chat/completions", json=body, headers={"X-Subject-Id": "patient-7"})
        assert r.status_code == 200
        httpx.post(f"{u}/v1/chat/completions", json=body | {"stream": True, "user": "u2"})
        httpx.post(f"{u}/v1/responses", json={"model": MODEL, "input": "Hi", "user": "u3"})
    records = log.list()
    assert [(x["kind"], x["subject"]) for x in records] == [
        ("request", "patient-7"), ("completion", "patient-7"), ("request", "u2"),
        ("completion", "u2"), ("request", "u3"), ("completion", "u3")]
    start, done = log.get(records[0]["record_id"])
    assert start["model_digest"] == "sha256:abc" and start["params"]["seed"] == 3
    assert start["engine"]["mode"] == "reproducible"
    assert done["finish_reason"] == "stop" and done["completion_tokens"] > 0
    assert len(done["prompt_ids_sha256"]) == 64
    content = start["content"]
    assert content["messages"][0]["content"] == "Hello" and content["answer"] == "Sunny, 20 C in Paris."
    assert content["prompt_ids"] == engine.prompts[0]
    log.checkpoint()
    assert log.verify(key.public_key()).ok


def test_a_refused_request_is_recorded_as_refused(audited):
    log, url, key, settings = audited
    with running_server(build_app(ScriptedEngine(queue_full=True), settings, audit_log=log)) as u:
        r = httpx.post(f"{u}/v1/chat/completions",
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 429
    assert [x["kind"] for x in log.list()] == ["request", "completion"]
    assert log.list()[-1]["finish_reason"] == "refused"


def test_audit_cli_verify_list_show_and_detect_tampering(audited):
    log, url, key, settings = audited
    with running_server(build_app(ScriptedEngine(FINAL), settings, audit_log=log)) as u:
        for i in range(3):
            httpx.post(f"{u}/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}], "user": f"s{i}"})
    log.checkpoint()
    runner = CliRunner()
    args = ["--database-url", url]
    ok = runner.invoke(cli, ["audit", "verify", *args])
    assert ok.exit_code == 0 and "ok: 6 records" in ok.stdout
    listed = runner.invoke(cli, ["audit", "list", *args, "--subject", "s1"])
    assert listed.exit_code == 0 and "s1" in listed.stdout and "s0" not in listed.stdout
    rid = log.list(subject="s2")[0]["record_id"]
    shown = runner.invoke(cli, ["audit", "show", rid, *args])
    assert shown.exit_code == 0 and json.loads(shown.stdout)[0]["record_id"] == rid
    with log.engine.begin() as conn:  # an insider edits a record's token count
        conn.execute(update(leaves_t).where(leaves_t.c.idx == 3).values(
            record=leaves_t.c.record.op("||")("")))
        row = conn.execute(leaves_t.select().where(leaves_t.c.idx == 3)).first()
        conn.execute(update(leaves_t).where(leaves_t.c.idx == 3).values(
            record=row.record.replace('"completion_tokens":', '"completion_tokens":1')))
    bad = runner.invoke(cli, ["audit", "verify", *args])
    assert bad.exit_code == 3 and "first bad record 3" in bad.stdout
    missing = runner.invoke(cli, ["audit", "show", "nope", *args])
    assert missing.exit_code == 1 and missing.output.startswith("error: no audit record nope")


def test_replay_reproduces_a_served_answer_bit_for_bit(checkpoints, tmp_path):
    from inhouse.engine import AsyncEngine, LLMEngine
    from inhouse.model import find_checkpoint, load_model
    from inhouse.model.digest import checkpoint_digest
    from inhouse.kernels import arithmetic
    from inhouse.config import EngineConfig

    path = checkpoints["hf"]
    key = load_signing_key(cache_root() / "audit-signing.key")
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    log = AuditLog(url, key)
    settings = ServerSettings(model_name=MODEL, audit_content="full", engine_mode="reproducible",
                              model_digest=checkpoint_digest(find_checkpoint(path)),
                              model_dtype="float32", kernel=arithmetic.path_name())
    from inhouse.harmony.grammar import GrammarBackend

    engine = AsyncEngine(LLMEngine(load_model(path), EngineConfig(mode="reproducible"),
                                   grammars=GrammarBackend()))
    try:
        with running_server(build_app(engine, settings, audit_log=log)) as u:
            bodies = [{"model": MODEL, "messages": [{"role": "user", "content": f"Tell me {i}"}],
                       "max_tokens": 12, "temperature": 1.0, **({"seed": 5} if i else {})}
                      for i in range(3)]  # concurrent, one without a seed (drawn and logged)
            bodies += [bodies[1] | {"n": 2}, bodies[1] | {"stream": True},
                       # stop strings cut the answer: the logged prefix replays
                       bodies[1] | {"max_tokens": 80, "stop": [" ", "e", "a", "o"]},
                       bodies[1] | {"tool_choice": "required", "tools": [{
                           "type": "function", "function": {
                               "name": "get_weather", "description": "Weather in a city.",
                               "parameters": {"type": "object", "properties": {
                                   "city": {"type": "string"}}}}}]},
                       # a grammar: recorded in the params, applied again by replay
                       bodies[1] | {"response_format": {"type": "json_schema", "json_schema": {
                           "name": "size", "schema": {"type": "object", "properties": {
                               "size": {"enum": ["small", "big"]}}, "required": ["size"]}}}}]
            import concurrent.futures as cf
            with cf.ThreadPoolExecutor(3) as pool:
                list(pool.map(lambda b: httpx.post(f"{u}/v1/chat/completions", json=b, timeout=60), bodies))
            r = httpx.post(f"{u}/v1/responses", json={"model": MODEL, "input": "hi", "seed": 3,
                                                      "max_output_tokens": 10}, timeout=60)
            assert r.status_code == 200
    finally:
        engine.shutdown()
    ends = [r["finish_reason"] for r in log.list(limit=1000) if r["kind"] == "completion"]
    assert "abort" in ends and len(ends) == 10  # the stop-string one was cut short
    assert any(r["kind"] == "request" and r["params"].get("grammar")
               for r in log.list(limit=1000))
    tooled = [r for r in log.list(limit=1000) if r["kind"] == "request" and r["tools"]]
    forced = [r for r in tooled if r["params"].get("grammar")]
    assert forced and forced[0]["tools"][0]["parameters"]["properties"]["city"] and \
        "to=functions." in forced[0]["params"]["grammar"]  # the definitions and the forced call
    runner = CliRunner()
    for rid in {r["record_id"] for r in log.list(limit=1000)}:
        res = runner.invoke(cli, ["audit", "replay", rid, "--model", str(path), "--database-url", url])
        assert res.exit_code == 0 and "identical" in res.stdout, res.output
    other = runner.invoke(cli, ["audit", "replay", log.list()[0]["record_id"], "--model",
                                str(checkpoints["original"]), "--database-url", url])
    assert other.exit_code == 1 and "refusing to replay" in other.output


def test_replay_needs_the_token_ids(audited):
    log, url, key, settings = audited
    settings = ServerSettings(model_name=MODEL, audit_content="none")
    with running_server(build_app(ScriptedEngine(FINAL), settings, audit_log=log)) as u:
        httpx.post(f"{u}/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    rid = log.list()[0]["record_id"]
    res = CliRunner().invoke(cli, ["audit", "replay", rid, "--model", "/nonexistent",
                                   "--database-url", url])
    assert res.exit_code == 1 and "kept no token ids" in res.output


def test_audit_cli_export_and_erase(audited):
    log, url, key, settings = audited
    with running_server(build_app(ScriptedEngine(FINAL), settings, audit_log=log)) as u:
        httpx.post(f"{u}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "my SIN is secret"}],
            "user": "alice"})
    runner = CliRunner()
    exported = runner.invoke(cli, ["audit", "export", "--subject", "alice", "--database-url", url])
    data = json.loads(exported.stdout)
    assert exported.exit_code == 0 and "my SIN is secret" in json.dumps(data["content"])
    erased = runner.invoke(cli, ["audit", "erase", "--subject", "alice", "--database-url", url])
    assert erased.exit_code == 0 and "erased the content of 1 audit record" in erased.stdout
    again = json.loads(runner.invoke(cli, ["audit", "export", "--subject", "alice",
                                           "--database-url", url]).stdout)
    assert again["content"] == {} and "my SIN is secret" not in json.dumps(again)
    log.checkpoint()
    assert runner.invoke(cli, ["audit", "verify", "--database-url", url]).exit_code == 0
    nothing = runner.invoke(cli, ["audit", "erase", "--database-url", url])
    assert nothing.exit_code == 1 and "say what to erase" in nothing.output


def test_every_api_process_given_one_salt_file_hashes_alike(tmp_path):
    """`serve --audit-salt FILE`: the heads of a deployment share the hashing secret (made once,
    0600), so one text has one hash in the log whichever head wrote it; another salt, another
    hash."""
    from inhouse.pipeline.audit import Auditor

    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", load_signing_key(tmp_path / "k"))
    shared = ServerSettings(model_name="m", audit_salt=str(tmp_path / "etc" / "salt"))
    a, b = Auditor(log, shared), Auditor(log, shared)
    assert (tmp_path / "etc" / "salt").stat().st_mode & 0o777 == 0o600
    assert a._hash_text("patient 12") == b._hash_text("patient 12")
    other = Auditor(log, ServerSettings(model_name="m", audit_salt=str(tmp_path / "other")))
    assert other._hash_text("patient 12") != a._hash_text("patient 12")
