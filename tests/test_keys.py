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


def test_a_rate_limit_is_counted_across_servers_on_one_database(store):
    """Two API processes (two heads of a Ray deployment) on one database: the limit is the
    key's, not each server's."""
    _, key = store.create("batch job", "user", rate_limit=3)
    h = {"Authorization": f"Bearer {key}"}
    apps = [build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL, audit=False),
                      key_store=KeyStore(str(store.engine.url))) for _ in range(2)]
    with running_server(apps[0]) as a, running_server(apps[1]) as b:
        codes = [httpx.post(f"{u}/v1/chat/completions", json=BODY, headers=h).status_code
                 for u in (a, b, a, b)]
    assert codes == [200, 200, 200, 429]


def check_concurrent_hits(url: str, writers: int = 4, rounds: int = 6, limit: int = 5) -> None:
    """Writers, each with its own connection pool (as separate API processes have), hit a key at
    the same instant, a barrier apart, when it has one request left: exactly one gets through,
    every round."""
    import threading

    from inhouse.governance.rate_limits import SharedRateLimiter

    keys = KeyStore(url)
    ids = [keys.create(f"burst {i}", "user", rate_limit=limit)[0].id for i in range(rounds)]
    limiter = SharedRateLimiter(keys.engine)
    for k in ids:
        assert [limiter.hit(k, limit) for _ in range(limit - 1)] == [0] * (limit - 1)
    barrier, got = threading.Barrier(writers), []
    limiters = [SharedRateLimiter(KeyStore(url).engine) for _ in range(writers)]

    def hits(mine: SharedRateLimiter) -> None:
        for k in ids:
            barrier.wait()
            got.append((k, mine.hit(k, limit)))

    threads = [threading.Thread(target=hits, args=(m,)) for m in limiters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for k in ids:
        waits = sorted(w for key_id, w in got if key_id == k)
        assert len(waits) == writers and waits[0] == 0, (k, waits)
        assert all(1 <= w <= 61 for w in waits[1:]), (k, waits)


def test_concurrent_requests_never_pass_the_limit(tmp_path):
    check_concurrent_hits(f"sqlite:///{tmp_path / 'server.db'}")


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


def test_a_database_made_before_tenants_gains_them(tmp_path):
    """Keys and stored responses of wave 1 (no tenant columns): each old key is its own tenant;
    old stored responses belong to no tenant, so only admin keys see them."""
    import sqlite3

    from inhouse.governance.responses_store import ResponseStore
    from inhouse.governance.tenancy import Caller

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE api_keys (id VARCHAR(32) PRIMARY KEY, name VARCHAR(200) NOT NULL, "
                "role VARCHAR(16) NOT NULL, key_sha256 VARCHAR(64) NOT NULL UNIQUE, prefix "
                "VARCHAR(16) NOT NULL, rate_limit INTEGER, created_at FLOAT NOT NULL, revoked_at FLOAT)")
    con.execute("INSERT INTO api_keys VALUES ('key_old', 'old', 'user', ?, 'ih-old', NULL, 0, NULL)",
                (__import__("hashlib").sha256(b"ih-oldkey").hexdigest(),))
    con.execute("CREATE TABLE responses (id VARCHAR(64) PRIMARY KEY, created_at FLOAT NOT NULL, "
                "model VARCHAR(200) NOT NULL, input_items TEXT NOT NULL, response TEXT NOT NULL)")
    con.execute("INSERT INTO responses VALUES ('resp_old', 0, 'm', '[]', '{\"id\": \"resp_old\"}')")
    con.commit()
    con.close()
    url = f"sqlite:///{db}"
    old = KeyStore(url).authenticate("ih-oldkey")
    assert old.tenant == "key_old" and old.subject is None and not old.on_behalf
    store = ResponseStore(url)
    assert store.get("resp_old", Caller("key_old", "key_old", None)) is None
    assert store.get("resp_old", Caller("admin", "default", None, sees_all_tenants=True))


def test_keys_cli_tenant_subject_on_behalf(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    made = CliRunner().invoke(cli, ["keys", "create", "--name", "portal", "--tenant", "clinic",
                                    "--subject", "alice", "--on-behalf", "--database-url", url])
    assert made.exit_code == 0 and "tenant clinic" in made.stdout, made.output
    key = KeyStore(url).authenticate(made.stdout.strip().splitlines()[-1])
    assert (key.tenant, key.subject, key.on_behalf) == ("clinic", "alice", True)
    listed = CliRunner().invoke(cli, ["keys", "list", "--database-url", url],
                                env={"COLUMNS": "200"})
    assert "clinic" in listed.stdout and "alice (+others)" in listed.stdout
    bad = CliRunner().invoke(cli, ["keys", "create", "--name", "x", "--tenant", " ",
                                   "--database-url", url])
    assert bad.exit_code == 1 and "tenant must be" in bad.output
