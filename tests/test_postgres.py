"""The audit log, the key store and the server's stores on a real PostgreSQL server."""

import uuid

import httpx
from sqlalchemy import create_engine, text

from inhouse.config import ServerSettings, cache_root
from inhouse.governance.audit_log import AuditLog, load_signing_key
from inhouse.governance.keys import KeyStore
from inhouse.server import build_app
from inhouse.governance.responses_store import ResponseStore
from tests.postgres import postgres_url  # noqa: F401 - the fixture
from tests.server_utils import ScriptedEngine, running_server
from tests.test_audit_log import TAMPERS, check_concurrent_writers, rewrite
from tests.test_server_chat import FINAL


def fresh_db(postgres_url):
    """A new database per test, so tests do not see each other's rows."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


def test_audit_log_verifies_and_catches_tampering_on_postgres(postgres_url, tmp_path):
    url = fresh_db(postgres_url)
    key = load_signing_key(tmp_path / "k")
    log = AuditLog(url, key, checkpoint_every=4)
    for i in range(10):
        log.append({"i": i}, content={"text": f"t{i}"}, subject="s")
    log.checkpoint()
    assert log.verify(key.public_key()).ok
    rewrite(log, lambda rows: TAMPERS["swap two records"](rows, 2, 7))
    report = log.verify(key.public_key())
    assert not report.ok and report.first_bad_index <= 2


def test_concurrent_writers_on_postgres(postgres_url, tmp_path):
    check_concurrent_writers(fresh_db(postgres_url), load_signing_key(tmp_path / "k"), 20)


def test_server_on_postgres(postgres_url):
    url = fresh_db(postgres_url)
    keys = KeyStore(url)
    _, key = keys.create("app", "auditor")
    audit = AuditLog(url, load_signing_key(cache_root() / "audit-signing.key"))
    app = build_app(ScriptedEngine(FINAL), ServerSettings(model_name="m"), ResponseStore(url),
                    audit, keys)
    with running_server(app) as u:
        h = {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"{u}/v1/responses", json={"model": "m", "input": "hi"}, headers=h)
        assert r.status_code == 200
        assert httpx.get(f"{u}/v1/responses/{r.json()['id']}", headers=h).status_code == 200
        v = httpx.get(f"{u}/v1/audit/verify", headers=h).json()
        assert v["ok"] and v["records"] == 2


def test_tenancy_and_erasure_on_postgres(postgres_url):
    """Issue 17 on PostgreSQL: another tenant's stored response is a 404; erasing a subject
    removes their stored responses and content (then VACUUMs the tables)."""
    from inhouse.governance.privacy import PersonalData

    url = fresh_db(postgres_url)
    keys = KeyStore(url)
    _, a = keys.create("a", "user", subject="erin")
    _, b = keys.create("b", "user")
    audit = AuditLog(url, load_signing_key(cache_root() / "audit-signing.key"))
    store = ResponseStore(url)
    app = build_app(ScriptedEngine(FINAL), ServerSettings(model_name="m", audit_content="full"),
                    store, audit, keys)
    with running_server(app) as u:
        r = httpx.post(f"{u}/v1/responses", json={"model": "m", "input": "erin's words"},
                       headers={"Authorization": f"Bearer {a}"})
        rid = r.json()["id"]
        assert httpx.get(f"{u}/v1/responses/{rid}",
                         headers={"Authorization": f"Bearer {b}"}).status_code == 404
    done = PersonalData(audit, store).erase("erin")
    assert (done.audit_records, done.stored_responses) == (1, 1)
    assert store.export("erin") == [] and "erin's words" not in str(audit.export("erin"))
    assert audit.verify(audit.key.public_key()).ok
