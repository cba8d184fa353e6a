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
from tests.test_keys import check_concurrent_hits
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


def test_tampering_is_detected_on_postgres(postgres_url, tmp_path):
    """Issue 18 on PostgreSQL: a log written through the server, then one edit of each column of
    each table, one deletion per table, deleted checkpoints and a truncation, each on its own
    copy of the database (CREATE DATABASE ... TEMPLATE): verify with the pinned key and the
    witness catches every one."""
    from inhouse.governance.witness import FileWitness, read_witness

    url = fresh_db(postgres_url)
    key = load_signing_key(tmp_path / "k")
    witness = tmp_path / "w.jsonl"
    log = AuditLog(url, key, checkpoint_every=4, checkpoint_seconds=1e9,
                   witness=FileWitness(witness))
    settings = ServerSettings(model_name="m", audit_content="full")
    stores = (ResponseStore(url), KeyStore(url))
    with running_server(build_app(ScriptedEngine(FINAL), settings, stores[0], log,
                                  stores[1])) as u:
        for i in range(5):
            httpx.post(f"{u}/v1/chat/completions", json={
                "model": "m", "user": f"u{i % 2}",
                "messages": [{"role": "user", "content": f"question {i}"}]})
    log.close()
    lines = read_witness(witness)
    assert log.verify(key.public_key(), lines).ok
    for engine in (log.engine, stores[0].engine, stores[1].engine):
        engine.dispose()  # a template database must have no other sessions
    name = url.rsplit("/", 1)[1]
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    edits = [
        "UPDATE audit_leaves SET record_id = 'x' WHERE idx = 3",
        "UPDATE audit_leaves SET kind = 'x' WHERE idx = 3",
        "UPDATE audit_leaves SET subject = 'someone else' WHERE idx = 3",
        "UPDATE audit_leaves SET created_at = created_at - 86400 WHERE idx = 3",
        "UPDATE audit_leaves SET record = replace(record, '\"m\"', '\"n\"') WHERE idx = 2",
        "UPDATE audit_leaves SET leaf_hash = md5(leaf_hash) || md5(leaf_hash) WHERE idx = 2",
        "UPDATE audit_leaf_content SET content = replace(content, 'question', 'answer')",
        "UPDATE audit_leaf_content SET salt = md5(salt)",
        "DELETE FROM audit_leaf_content WHERE idx = (SELECT min(idx) FROM audit_leaf_content)",
        "UPDATE audit_head SET size = size - 1",
        "DELETE FROM audit_leaves WHERE idx = 4",
        "UPDATE audit_checkpoints SET key_id = 'abcdabcdabcdabcd'",
        "UPDATE audit_checkpoints SET signed_at = signed_at + 1",
        "DELETE FROM audit_checkpoints",
        "DELETE FROM audit_leaves WHERE idx >= 8; DELETE FROM audit_leaf_content WHERE idx >= 8; "
        "DELETE FROM audit_checkpoints WHERE tree_size > 8; UPDATE audit_head SET size = 8",
    ]
    base = postgres_url.rsplit("/", 1)[0]
    for n, sql in enumerate(edits):
        copy = f"{name}_c{n}"
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {copy} TEMPLATE {name}"))
        eng = create_engine(f"{base}/{copy}")
        with eng.begin() as conn:
            for statement in sql.split("; "):
                conn.execute(text(statement))
        eng.dispose()
        tampered = AuditLog(f"{base}/{copy}")
        assert not tampered.verify(key.public_key(), lines).ok, sql
        tampered.engine.dispose()
    admin.dispose()


def test_rate_limits_hold_under_concurrent_heads_on_postgres(postgres_url):
    check_concurrent_hits(fresh_db(postgres_url))
