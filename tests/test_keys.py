"""API keys: stored hashed, shown once; roles gate the audit endpoints; per-key rate limits."""

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.config import ServerSettings
from inhouse.governance.audit_log import AuditLog
from inhouse.governance.keys import KeyError_, KeyStore, keys_t
from inhouse.server import build_app
from tests.server_utils import ScriptedEngine, running_server
from tests.test_server_chat import FINAL

MODEL = "tiny-test"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def store(tmp_path):
    return KeyStore(f"sqlite:///{tmp_path / 'server.db'}")


def test_keys_are_stored_hashed_and_shown_once(store):
    key, plaintext = store.create("billing app", "user")
    with store.engine.connect() as conn:
        stored = " ".join(str(v) for row in conn.execute(select(keys_t)) for v in row)
    assert plaintext not in stored and plaintext.startswith("ih-") and key.prefix in stored
    assert store.authenticate(plaintext).id == key.id
    store.revoke(key.id)
    assert store.authenticate(plaintext) is None
    with pytest.raises(KeyError_, match="unknown role"):
        store.create("x", "root")


def test_server_requires_keys_once_one_exists_and_roles_gate_audit(store, tmp_path):
    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}")
    app = build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL), audit_log=audit,
                    key_store=store)
    with running_server(app) as u:
        assert httpx.post(f"{u}/v1/chat/completions", json=BODY).status_code == 200  # no keys yet
        user, user_key = store.create("app", "user")
        _, auditor_key = store.create("dpo", "auditor")
        bearer = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
        assert httpx.post(f"{u}/v1/chat/completions", json=BODY).status_code == 401
        r = httpx.post(f"{u}/v1/chat/completions", json=BODY, headers=bearer(user_key))
        assert r.status_code == 200
        assert httpx.get(f"{u}/v1/audit/verify", headers=bearer(user_key)).status_code == 403
        v = httpx.get(f"{u}/v1/audit/records", headers=bearer(auditor_key))
        assert v.status_code == 200
        assert [x["api_key_id"] for x in v.json()["data"] if x["kind"] == "request"][-1] == user.id
        store.revoke(user.id)
        assert httpx.post(f"{u}/v1/chat/completions", json=BODY,
                          headers=bearer(user_key)).status_code == 401


def test_per_key_rate_limit_is_429_with_retry_after(store):
    _, key = store.create("batch job", "user", rate_limit=2)
    app = build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL, audit=False),
                    key_store=store)
    with running_server(app) as u:
        h = {"Authorization": f"Bearer {key}"}
        codes = [httpx.post(f"{u}/v1/chat/completions", json=BODY, headers=h).status_code
                 for _ in range(3)]
        r = httpx.post(f"{u}/v1/chat/completions", json=BODY, headers=h)
    assert codes == [200, 200, 429] and r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limited"


def test_keys_cli(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    runner = CliRunner()
    made = runner.invoke(cli, ["keys", "create", "--name", "ops", "--role", "admin",
                               "--database-url", url])
    assert made.exit_code == 0 and "shown only now" in made.stdout
    plaintext = made.stdout.strip().splitlines()[-1]
    assert KeyStore(url).authenticate(plaintext).role == "admin"
    key_id = made.stdout.split()[1]
    listed = runner.invoke(cli, ["keys", "list", "--database-url", url])
    assert key_id in listed.stdout and plaintext not in listed.stdout
    assert runner.invoke(cli, ["keys", "revoke", key_id, "--database-url", url]).exit_code == 0
    again = runner.invoke(cli, ["keys", "revoke", key_id, "--database-url", url])
    assert again.exit_code == 1 and again.output.startswith("error: no active key")
    bad = runner.invoke(cli, ["keys", "create", "--name", "x", "--role", "root", "--database-url", url])
    assert bad.exit_code == 1 and "unknown role" in bad.output
