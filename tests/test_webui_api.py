"""The APIs behind the web UI, tried as a hostile user and a careful auditor would: conversations
are each user's own (another user or tenant gets a 404), erasure and export reach them, the
console's endpoints answer only their roles, replay runs on the server's own engine, and the
page and /docs load nothing from outside."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx
import pytest

from inhouse.config import ServerSettings, cache_root
from inhouse.governance.audit_log import AuditLog, load_signing_key
from inhouse.governance.keys import KeyStore
from inhouse.server import build_app
from inhouse.server.webui import STATIC
from tests.server_utils import ScriptedEngine, running_server
from tests.test_server_chat import FINAL

MODEL = "tiny-test"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def world(tmp_path):
    """A server with an audit log and keys: two users of tenant A (one bound to a subject), a user
    of tenant B, an auditor and an admin."""
    url = f"sqlite:///{tmp_path / 'server.db'}"
    keys = KeyStore(url)
    made = {
        "alice": keys.create("alice", "user", tenant="A", subject="alice"),
        "bob": keys.create("bob", "user", tenant="A"),
        "carol": keys.create("carol", "user", tenant="B", subject="carol"),
        "auditor": keys.create("dpo", "auditor", tenant="A"),
        "admin": keys.create("root", "admin"),
    }
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}",
                   load_signing_key(cache_root() / "audit-signing.key"), checkpoint_every=2)
    settings = ServerSettings(model_name=MODEL, database_url=url, audit_content="full")
    app = build_app(ScriptedEngine(FINAL), settings, audit_log=log, key_store=keys)
    with running_server(app) as u:
        yield u, {n: bearer(k) for n, (_, k) in made.items()}, {n: r.id for n, (r, _) in made.items()}, \
            tmp_path


CONV = {"title": "Trip plan", "messages": [
    {"role": "user", "content": "zanzibar-marker-42: where should I go?"},
    {"role": "assistant", "content": "Paris.", "reasoning": "They asked.", "finish": "completed",
     "tools": [{"kind": "web_search", "title": "Searched", "detail": "travel"}],
     "citations": [{"title": "Travel policy", "url": "inhouse://documents/doc_1#L3-L4"}]}]}


def test_conversations_belong_to_one_user_of_one_tenant(world):
    u, h, _, _ = world
    made = httpx.post(f"{u}/v1/ui/conversations", json=CONV, headers=h["alice"])
    assert made.status_code == 200, made.text
    cid = made.json()["id"]
    assert httpx.get(f"{u}/v1/ui/conversations/{cid}", headers=h["alice"]).json()["messages"] \
        == CONV["messages"]
    listed = httpx.get(f"{u}/v1/ui/conversations", headers=h["alice"]).json()["data"]
    assert [c["id"] for c in listed] == [cid] and listed[0]["num_messages"] == 2
    for other in ("bob", "carol", "admin"):  # same tenant, another tenant, even the admin
        assert httpx.get(f"{u}/v1/ui/conversations", headers=h[other]).json()["data"] == []
        for method, extra in (("GET", {}), ("POST", {"json": {"title": "mine now"}}),
                              ("DELETE", {})):
            r = httpx.request(method, f"{u}/v1/ui/conversations/{cid}", headers=h[other], **extra)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # updated by its owner only; the title survived the others' attempts
    r = httpx.post(f"{u}/v1/ui/conversations/{cid}", headers=h["alice"],
                   json={"messages": CONV["messages"][:1]})
    assert r.json()["title"] == "Trip plan" and r.json()["num_messages"] == 1
    assert httpx.delete(f"{u}/v1/ui/conversations/{cid}", headers=h["alice"]).status_code == 200
    assert httpx.get(f"{u}/v1/ui/conversations/{cid}", headers=h["alice"]).status_code == 404
    assert httpx.get(f"{u}/v1/ui/conversations").status_code == 401  # no key, no list


@pytest.mark.parametrize("bad, param", [
    ({"title": "", "messages": []}, "title"),
    ({"title": "x" * 201, "messages": []}, "title"),
    ({"title": "t", "messages": [{"role": "system", "content": "obey"}]}, "role"),
    ({"title": "t", "messages": [{"role": "user", "content": "x", "html": "<b>"}]}, "html"),
    ({"title": "t", "owner": "bob"}, "owner"),
    ({"title": "t", "messages": [{"role": "assistant", "content": "x", "citations": [
        {"title": "t", "url": "inhouse://documents/d"}] * 65}]}, "citations"),
    ({"title": "t", "messages": [{"role": "assistant", "content": "x", "citations": [
        {"title": "t", "url": "u" * 2001}]}]}, "url"),
    ({"title": "t", "messages": [{"role": "assistant", "content": "x", "citations": [
        {"url": "u", "onclick": "steal()"}]}]}, "onclick"),
])
def test_bad_conversations_are_clear_400s(world, bad, param):
    u, h, _, _ = world
    r = httpx.post(f"{u}/v1/ui/conversations", json=bad, headers=h["alice"])
    assert r.status_code == 400 and param in (r.json()["error"]["param"] or "") + \
        r.json()["error"]["message"], r.text


def test_erasure_and_export_reach_the_conversations_and_leave_no_text_in_the_file(world):
    u, h, ids, tmp = world
    httpx.post(f"{u}/v1/ui/conversations", json=CONV, headers=h["alice"])
    httpx.post(f"{u}/v1/ui/conversations", json=CONV, headers=h["carol"])
    httpx.post(f"{u}/v1/chat/completions", headers=h["alice"], json={
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}]})
    for who in ("alice", "bob"):  # the console's endpoints: auditors and admins only
        assert httpx.get(f"{u}/v1/audit/export", params={"subject": "alice"},
                         headers=h[who]).status_code == 403
    exported = httpx.get(f"{u}/v1/audit/export", params={"subject": "alice"},
                         headers=h["auditor"]).json()
    assert [c["title"] for c in exported["conversations"]] == ["Trip plan"]
    assert exported["records"] and exported["content"]
    r = httpx.post(f"{u}/v1/audit/erase", json={"subject": "alice", "confirm": "alce"},
                   headers=h["auditor"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "confirm"
    r = httpx.post(f"{u}/v1/audit/erase", json={"subject": "alice", "confirm": "alice"},
                   headers=h["auditor"])
    assert r.status_code == 200 and r.json()["conversations"] == 1 and r.json()["audit_records"] == 1
    assert httpx.get(f"{u}/v1/ui/conversations", headers=h["alice"]).json()["data"] == []
    assert len(httpx.get(f"{u}/v1/ui/conversations", headers=h["carol"]).json()["data"]) == 1
    erasure = [x for x in httpx.get(f"{u}/v1/audit/records", headers=h["auditor"]).json()["data"]
               if x["kind"] == "erasure"]
    assert erasure[-1]["by"] == ids["auditor"] and erasure[-1]["conversations"] == 1
    assert httpx.get(f"{u}/v1/audit/verify", headers=h["auditor"]).json()["ok"]
    # carol's copy keeps the marker; alice's is gone from the file's free pages too
    httpx.post(f"{u}/v1/audit/erase", json={"subject": "carol", "confirm": "carol"},
               headers=h["admin"])
    for f in tmp.glob("server.db*"):
        assert b"zanzibar-marker-42" not in f.read_bytes(), f


def test_pii_is_redacted_before_a_conversation_is_stored(tmp_path):
    url = f"sqlite:///{tmp_path / 'server.db'}"
    settings = ServerSettings(model_name=MODEL, database_url=url, audit=False, pii_mode="mask")
    with running_server(build_app(ScriptedEngine(FINAL), settings)) as u:
        body = {"title": "mail jane.doe@example.com", "messages": [
            {"role": "user", "content": "Write to jane.doe@example.com"}]}
        cid = httpx.post(f"{u}/v1/ui/conversations", json=body).json()["id"]
        got = httpx.get(f"{u}/v1/ui/conversations/{cid}").json()
    assert "jane.doe" not in got["title"] + got["messages"][0]["content"]
    assert "[EMAIL" in got["messages"][0]["content"]


def test_audit_search_filters_by_key_subject_finish_and_time(world):
    u, h, ids, _ = world
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    for who in ("alice", "bob", "alice"):
        assert httpx.post(f"{u}/v1/chat/completions", json=body, headers=h[who]).status_code == 200
    httpx.post(f"{u}/v1/chat/completions", json=body | {"n": 0}, headers=h["bob"])  # refused
    search = lambda **q: httpx.get(f"{u}/v1/audit/search", params=q,  # noqa: E731
                                   headers=h["auditor"]).json()["data"]
    rows = search()
    assert len(rows) >= 3 and all(r["verified"] for r in rows)
    assert [r["api_key_id"] for r in search(key_id=ids["alice"])] == [ids["alice"]] * 2
    assert {r["subject"] for r in search(subject="alice")} == {"alice"}
    assert all(r["finish_reason"] == "stop" for r in search(finish_reason="stop"))
    newest = rows[0]["created_at"]
    assert search(since=newest + 1) == [] and len(search(until=newest + 1)) == len(rows)
    assert len(search(limit=1)) == 1
    assert httpx.get(f"{u}/v1/audit/search", headers=h["bob"]).status_code == 403
    v = httpx.get(f"{u}/v1/audit/verify", headers=h["auditor"]).json()
    assert v["ok"] and v["last_checkpoint"]["tree_size"] >= 2 and len(v["last_checkpoint"]["root"]) == 64


def test_keys_are_managed_by_admins_only_and_shown_once(world):
    u, h, ids, _ = world
    for who in ("alice", "auditor"):
        assert httpx.get(f"{u}/v1/admin/keys", headers=h[who]).status_code == 403
        assert httpx.post(f"{u}/v1/admin/keys", json={"name": "x"}, headers=h[who]).status_code == 403
    made = httpx.post(f"{u}/v1/admin/keys", headers=h["admin"],
                      json={"name": "nurse", "role": "user", "tenant": "A", "subject": "n1"}).json()
    plaintext = made["key"]
    listed = httpx.get(f"{u}/v1/admin/keys", headers=h["admin"])
    assert plaintext not in listed.text and "key_sha256" not in listed.text
    assert any(k["id"] == made["id"] and k["prefix"] == plaintext[:10] for k in listed.json()["data"])
    me = httpx.get(f"{u}/v1/ui/me", headers=bearer(plaintext)).json()
    assert (me["role"], me["tenant"], me["subject"], me["keys_required"]) == ("user", "A", "n1", True)
    bad = httpx.post(f"{u}/v1/admin/keys", json={"name": "x", "role": "god"}, headers=h["admin"])
    assert bad.status_code == 400 and "unknown role" in bad.json()["error"]["message"]
    assert httpx.delete(f"{u}/v1/admin/keys/{made['id']}", headers=h["admin"]).status_code == 200
    assert httpx.get(f"{u}/v1/ui/me", headers=bearer(plaintext)).status_code == 401
    assert httpx.delete(f"{u}/v1/admin/keys/{made['id']}", headers=h["admin"]).status_code == 404


def test_replay_runs_on_the_servers_engine_and_refuses_another_model(checkpoints, tmp_path):
    from inhouse.config import EngineConfig
    from inhouse.engine import AsyncEngine, LLMEngine
    from inhouse.harmony.grammar import GrammarBackend
    from inhouse.kernels import arithmetic
    from inhouse.model import find_checkpoint, load_model
    from inhouse.model.digest import checkpoint_digest

    path = checkpoints["hf"]
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}",
                   load_signing_key(cache_root() / "audit-signing.key"))
    keys = KeyStore(f"sqlite:///{tmp_path / 'server.db'}")
    _, auditor = keys.create("dpo", "auditor")
    settings = ServerSettings(model_name=MODEL, audit_content="full", engine_mode="reproducible",
                              model_digest=checkpoint_digest(find_checkpoint(path)),
                              model_dtype="float32", kernel=arithmetic.path_name(),
                              database_url=f"sqlite:///{tmp_path / 'server.db'}")
    engine = AsyncEngine(LLMEngine(load_model(path), EngineConfig(mode="reproducible"),
                                   grammars=GrammarBackend()))
    try:
        with running_server(build_app(engine, settings, audit_log=log, key_store=keys)) as u:
            for i in range(2):
                r = httpx.post(f"{u}/v1/chat/completions", headers=bearer(auditor), timeout=60,
                               json={"model": MODEL, "max_tokens": 8, "temperature": 1.0,
                                     "messages": [{"role": "user", "content": f"Tell me {i}"}]})
                assert r.status_code == 200
            rids = [x["record_id"] for x in log.list() if x["kind"] == "request"]
            for rid in rids:
                r = httpx.post(f"{u}/v1/audit/records/{rid}/replay", headers=bearer(auditor),
                               timeout=60)
                assert r.status_code == 200 and r.json()["identical"], r.text
                assert r.json()["num_replayed"] == r.json()["num_logged"] > 0
            assert httpx.post(f"{u}/v1/audit/records/nope/replay",
                              headers=bearer(auditor)).status_code == 404
    finally:
        engine.shutdown()
    other = ServerSettings(model_name=MODEL, audit_content="full", engine_mode="reproducible",
                           model_digest="sha256:another", database_url=settings.database_url)
    with running_server(build_app(ScriptedEngine(FINAL), other, audit_log=log,
                                  key_store=keys)) as u:
        r = httpx.post(f"{u}/v1/audit/records/{rids[0]}/replay", headers=bearer(auditor))
        assert r.status_code == 409 and "digest" in r.json()["error"]["message"]


def test_the_page_and_the_api_docs_load_nothing_from_outside(tmp_path):
    settings = ServerSettings(model_name=MODEL, audit=False,
                              database_url=f"sqlite:///{tmp_path / 'server.db'}")
    with running_server(build_app(ScriptedEngine(FINAL), settings)) as u:
        page = httpx.get(f"{u}/")
        assert page.status_code == 200 and "<title>inhouse</title>" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        for asset in re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text):
            r = httpx.get(f"{u}{asset}")
            assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
        assert httpx.get(f"{u}/redoc").status_code == 404  # it fetches its logo from a CDN
        for doc in ("/docs",):
            html = httpx.get(f"{u}{doc}").text
            urls = re.findall(r'(?:src|href|url)\s*[:=]\s*["\']([^"\']+)', html)
            assert urls and all(x.startswith("/") for x in urls), (doc, urls)
            for x in urls:
                if x.startswith("/docs-static/"):
                    assert httpx.get(f"{u}{x}").status_code == 200
        assert '"validatorUrl": null' in httpx.get(f"{u}/docs").text  # no badge from outside
        me = httpx.get(f"{u}/v1/ui/me").json()  # a server with no keys: one local caller
        assert me["keys_required"] is False and me["server"]["models"] == [MODEL]
    off = ServerSettings(model_name=MODEL, audit=False, web_ui=False,
                         database_url=f"sqlite:///{tmp_path / 'server.db'}")
    with running_server(build_app(ScriptedEngine(FINAL), off)) as u:
        assert httpx.get(f"{u}/").status_code == 404 and httpx.get(f"{u}/ui/app.js").status_code == 404


def test_the_vendored_libraries_are_the_published_files():
    """vendor/README.md names each file's package, version and sha256: a changed file fails."""
    table = (STATIC / "vendor" / "README.md").read_text()
    rows = re.findall(r"\| `([^`]+)` \| ([\w.-]+) \| ([\d.]+) \| `[^`]+` \| `([0-9a-f]{64})` \|", table)
    assert {r[0] for r in rows} == {p.name for p in (STATIC / "vendor").glob("*.js")}
    for name, _, _, digest in rows:
        assert hashlib.sha256(Path(STATIC / "vendor" / name).read_bytes()).hexdigest() == digest
    # every script the page runs is ours or vendored: no inline script, no remote import
    for js in STATIC.glob("*.js"):
        imports = re.findall(r'from "([^"]+)"', js.read_text())
        assert all(i.startswith("./") for i in imports), (js.name, imports)
    assert "<script>" not in (STATIC / "index.html").read_text()


def test_one_user_cannot_fill_the_disk_with_conversations(world, monkeypatch):
    from inhouse.governance import conversations_store

    monkeypatch.setattr(conversations_store, "MAX_PER_USER", 2)
    u, h, _, _ = world
    for _ in range(2):
        assert httpx.post(f"{u}/v1/ui/conversations", json=CONV, headers=h["alice"]).status_code == 200
    r = httpx.post(f"{u}/v1/ui/conversations", json=CONV, headers=h["alice"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "too_many_conversations"
    assert httpx.post(f"{u}/v1/ui/conversations", json=CONV, headers=h["bob"]).status_code == 200
