"""Issue 18, tried as a skeptical auditor would: a log written by real requests through the server,
then every single-value edit of every table, every row deletion, insertions and swaps, deleted
checkpoints, rollbacks to every earlier copy, and a swapped signing key. `verify` with the pinned
public key and the witness must catch every one."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.config import ServerSettings
from inhouse.governance.audit_log import (AuditLog, checkpoint_message, load_signing_key,
                                          public_key_pem)
from inhouse.governance.audit_verify import key_id
from inhouse.governance.witness import FileWitness, read_witness
from inhouse.server import UVICORN_IMPL, build_app
from tests.server_utils import ScriptedEngine, running_server
from tests.test_server_chat import FINAL

MODEL = "tiny-test"
TABLES = ("audit_leaves", "audit_leaf_content", "audit_checkpoints", "audit_head")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A log of 8 chat and Responses requests (content kept), one erasure, sealed every 4
    records and at the end; a copy of the database after each checkpoint (for rollbacks)."""
    tmp = tmp_path_factory.mktemp("audit")
    db, key = tmp / "audit.db", load_signing_key(tmp / "signing.key")
    witness = tmp / "witness.jsonl"
    log = AuditLog(f"sqlite:///{db}", key, checkpoint_every=4, checkpoint_seconds=1e9,
                   witness=FileWitness(witness))
    copies = []
    settings = ServerSettings(model_name=MODEL, audit_content="full")
    with running_server(build_app(ScriptedEngine(FINAL), settings, audit_log=log)) as u:
        for i in range(8):
            user = f"user{i % 3}"
            if i % 2:
                httpx.post(f"{u}/v1/responses", json={"model": MODEL, "input": f"q{i}",
                                                      "user": user})
            else:
                httpx.post(f"{u}/v1/chat/completions", json={
                    "model": MODEL, "user": user, "stop": ["zz"],
                    "messages": [{"role": "user", "content": f"question {i}"}]})
            if i % 2:
                copies.append(tmp / f"copy{i}.db")
                _copy(db, copies[-1])
    log.erase(subject="user1")
    log.close()  # the final seal
    assert log.verify(key.public_key(), read_witness(witness)).ok
    return db, key, witness, copies


def _copy(src: Path, dst: Path) -> None:
    con = sqlite3.connect(src)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    shutil.copy(src, dst)


def _verify(db: Path, key, witness: Path, public=None):
    log = AuditLog(f"sqlite:///{db}")
    return log.verify(public or key.public_key(), read_witness(witness))


def _rows(db: Path, table: str) -> tuple[list[str], list[tuple]]:
    con = sqlite3.connect(db)
    cur = con.execute(f"SELECT * FROM {table}")
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    con.close()
    return cols, rows


def _pk(table: str) -> str:
    return {"audit_leaves": "idx", "audit_leaf_content": "idx", "audit_checkpoints": "tree_size",
            "audit_head": "id"}[table]


def _other(value):
    if isinstance(value, bool) or value is None:
        return "x"
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"


def _edits(db: Path):
    """(description, SQL, params) for every single-value change, row deletion and swap."""
    for table in TABLES:
        cols, rows = _rows(db, table)
        pk = _pk(table)
        for row in rows:
            key = row[cols.index(pk)]
            for c, v in zip(cols, row):
                if c == pk:
                    continue
                yield (f"{table}.{c} of {key}", f"UPDATE {table} SET {c} = ? WHERE {pk} = ?",
                       (_other(v), key))
            yield f"delete {table} {key}", f"DELETE FROM {table} WHERE {pk} = ?", (key,)
        if table in ("audit_leaves", "audit_leaf_content") and len(rows) > 2:
            a, b = rows[1], rows[-2]
            for c in cols:
                if c == pk:
                    continue
                i = cols.index(c)
                yield (f"swap {table}.{c} of rows {a[0]} and {b[0]}",
                       f"UPDATE {table} SET {c} = CASE {pk} WHEN ? THEN ? WHEN ? THEN ? END "
                       f"WHERE {pk} IN (?, ?)", (a[0], b[i], b[0], a[i], a[0], b[0]))
    cols, rows = _rows(db, "audit_leaf_content")
    first = rows[0]
    yield ("insert a content row for a record that committed none",
           "INSERT INTO audit_leaf_content VALUES (?, ?, ?, ?)",
           (10_000, first[1], first[2], first[3]))


def test_every_edit_deletion_and_swap_is_detected(written, tmp_path):
    db, key, witness, _ = written
    missed, total = [], 0
    for what, sql, params in _edits(db):
        copy = tmp_path / "t.db"
        _copy(db, copy)
        con = sqlite3.connect(copy)
        changed = con.execute(sql, params).rowcount
        con.commit()
        con.close()
        if not changed:
            continue
        total += 1
        if _verify(copy, key, witness).ok:
            missed.append(what)
    assert total > 150 and missed == [], f"{len(missed)} of {total} missed: {missed[:10]}"


def test_deleted_checkpoints_are_detected_by_the_witness(written, tmp_path):
    db, key, witness, _ = written
    copy = tmp_path / "t.db"
    _copy(db, copy)
    con = sqlite3.connect(copy)
    con.execute("DELETE FROM audit_checkpoints")
    con.commit()
    con.close()
    # without checkpoints, the records would have to carry their own signatures: they do not
    alone = AuditLog(f"sqlite:///{copy}").verify(key.public_key())
    assert not alone.ok and "not signed" in alone.problem
    report = _verify(copy, key, witness)
    assert not report.ok


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_truncation_is_detected_by_the_witness(written, tmp_path, cut):
    db, key, witness, _ = written
    copy = tmp_path / "t.db"
    _copy(db, copy)
    con = sqlite3.connect(copy)
    n = con.execute("SELECT size FROM audit_head").fetchone()[0]
    con.execute("DELETE FROM audit_leaves WHERE idx >= ?", (n - cut,))
    con.execute("DELETE FROM audit_leaf_content WHERE idx >= ?", (n - cut,))
    con.execute("DELETE FROM audit_checkpoints WHERE tree_size > ?", (n - cut,))
    con.execute("UPDATE audit_head SET size = ?", (n - cut,))
    con.commit()
    con.close()
    report = _verify(copy, key, witness)
    # the last leaf is the erasure: without it, user1's missing content shows first
    assert not report.ok and ("fewer than the" in report.problem
                              or "no erasure covers it" in report.problem)


def test_every_rollback_to_an_earlier_copy_is_detected(written):
    db, key, witness, copies = written
    assert copies
    for copy in copies:
        assert AuditLog(f"sqlite:///{copy}").verify(key.public_key()).ok  # fine on its own
        report = _verify(copy, key, witness)
        assert not report.ok, copy


def test_a_swapped_signing_key_is_refused_by_the_pinned_key(written, tmp_path):
    db, key, witness, _ = written
    copy = tmp_path / "t.db"
    _copy(db, copy)
    forger = load_signing_key(tmp_path / "forger.key")
    con = sqlite3.connect(copy)
    for size, root, signed_at in con.execute(
            "SELECT tree_size, root, signed_at FROM audit_checkpoints").fetchall():
        sig = forger.sign(checkpoint_message(size, root, signed_at)).hex()
        con.execute("UPDATE audit_checkpoints SET signature = ?, key_id = ? WHERE tree_size = ?",
                    (sig, key_id(forger.public_key()), size))
    con.commit()
    con.close()
    # what the old `verify` did: trust the key beside the database (here, the forger's)
    assert AuditLog(f"sqlite:///{copy}").verify(forger.public_key()).ok
    report = _verify(copy, key, witness)  # the pinned key
    assert not report.ok and "not the pinned key" in report.problem


def test_a_rewrite_re_signed_with_the_real_key_is_caught_by_the_witness(written, tmp_path):
    """An insider with the signing key rewrites a record and re-signs every checkpoint: only
    the witness's earlier copy of the checkpoints shows it."""
    from tests.test_audit_log import rewrite

    db, key, witness, _ = written
    copy = tmp_path / "t.db"
    _copy(db, copy)
    log = AuditLog(f"sqlite:///{copy}", key)
    rewrite(log, lambda rows: [dict(r, finish_reason="length") if r["kind"] == "completion"
                               else r for r in rows])
    from inhouse.governance.audit_verify import leaf_message

    con = sqlite3.connect(copy)
    con.execute("DELETE FROM audit_checkpoints")
    for idx, leaf in con.execute("SELECT idx, leaf_hash FROM audit_leaves").fetchall():
        con.execute("UPDATE audit_leaves SET signature = ? WHERE idx = ?",
                    (key.sign(leaf_message(leaf)).hex(), idx))  # the insider signs them all
    con.commit()
    con.close()
    log.checkpoint()  # re-signed with the real key
    assert log.verify(key.public_key()).ok  # consistent in itself
    report = _verify(copy, key, witness)
    assert not report.ok and "witnessed" in report.problem


def test_the_cli_pins_the_key_and_reads_the_witness(written, tmp_path):
    db, key, witness, copies = written
    pem = tmp_path / "audit.pub"
    r = CliRunner().invoke(cli, ["audit", "public-key", "--audit-signing-key",
                                 str(tmp_path.parent / "signing.key")])
    pem.write_bytes(public_key_pem(key.public_key()))
    url = f"sqlite:///{db}"
    ok = CliRunner().invoke(cli, ["audit", "verify", "--database-url", url, "--public-key",
                                 str(pem), "--witness", str(witness)])
    assert ok.exit_code == 0 and "witnessed checkpoints agree" in ok.stdout, ok.output
    bad = CliRunner().invoke(cli, ["audit", "verify", "--database-url", f"sqlite:///{copies[0]}",
                                  "--public-key", str(pem), "--witness", str(witness)])
    assert bad.exit_code == 3 and "TAMPERED" in bad.stdout
    assert r.exit_code in (0, 1)


def test_the_public_key_command_prints_the_pinnable_key(tmp_path):
    key = load_signing_key(tmp_path / "k.pem")
    r = CliRunner().invoke(cli, ["audit", "public-key", "--audit-signing-key",
                                 str(tmp_path / "k.pem")])
    assert r.exit_code == 0 and r.stdout.strip() == public_key_pem(key.public_key()).decode().strip()
    assert "PRIVATE" not in r.stdout


def test_list_and_show_mark_what_fails_verification(written, tmp_path):
    db, key, witness, _ = written
    copy = tmp_path / "t.db"
    _copy(db, copy)
    con = sqlite3.connect(copy)
    con.execute("UPDATE audit_leaf_content SET content = replace(content, 'question 2', "
                "'question 9') WHERE content LIKE '%question 2%'")
    con.commit()
    con.close()
    log = AuditLog(f"sqlite:///{copy}")
    marked = [r for r in log.list(limit=1000) if not r["verified"]]
    assert len(marked) == 1 and "modified" in marked[0]["problem"]
    leaves = log.get(marked[0]["record_id"])
    assert leaves[0]["verified"] is False and "question 9" in str(leaves[0]["content"])


# ---- proofs for third parties (no database) ------------------------------------------------------
def _a_record(db):
    log = AuditLog(f"sqlite:///{db}")
    return next(r["record_id"] for r in log.list(limit=1000)
                if r["kind"] == "request" and r.get("subject") == "user0"), log


def test_a_proof_checks_offline_and_every_forgery_fails(written, tmp_path):
    import json

    from inhouse.governance.audit_proof import ProofError, check_proof, make_proof

    db, key, witness, _ = written
    rid, log = _a_record(db)
    proof = make_proof(log, rid, with_content=True)
    report = check_proof(json.loads(json.dumps(proof)), key.public_key())
    assert [r["kind"] for r in report.records] == ["request", "completion"]
    assert report.records[0]["model"] == MODEL and report.content_proven == \
        [r["index"] for r in report.records]
    forgeries = {
        "another answer": lambda p: p["content"].__setitem__(
            next(iter(p["content"])), p["content"][next(iter(p["content"]))]
            | {"content": p["content"][next(iter(p["content"]))]["content"].replace("question",
                                                                                  "answer")}),
        "an edited record": lambda p: p["leaves"][1].__setitem__(
            "record", p["leaves"][1]["record"].replace('"finish_reason":"stop"',
                                                       '"finish_reason":"length"')),
        "a moved leaf": lambda p: p["leaves"][0].__setitem__("index", p["leaves"][0]["index"] + 1),
        "a bent path": lambda p: p["leaves"][0]["inclusion"].__setitem__(0, "00" * 32),
        "another root": lambda p: p["checkpoint"].__setitem__("root", "11" * 32),
        "a forged signature": lambda p: p["checkpoint"].__setitem__("signature", "22" * 64),
        "another key": lambda p: p["checkpoint"].__setitem__("key_id", "0" * 16),
        "garbage": lambda p: p.__setitem__("leaves", "x"),
    }
    for what, forge in forgeries.items():
        forged = json.loads(json.dumps(proof))
        forge(forged)
        with pytest.raises(ProofError):
            check_proof(forged, key.public_key())
            pytest.fail(what)
    other = load_signing_key(tmp_path / "other.key")
    with pytest.raises(ProofError, match="pinned"):
        check_proof(proof, other.public_key())


def test_prove_and_check_proof_from_the_cli_and_the_server(written, tmp_path):
    db, key, witness, _ = written
    rid, log = _a_record(db)
    pem = tmp_path / "audit.pub"
    pem.write_bytes(public_key_pem(key.public_key()))
    runner = CliRunner()
    made = runner.invoke(cli, ["audit", "prove", rid, "--out", str(tmp_path / "p.json"),
                               "--database-url", f"sqlite:///{db}"])
    assert made.exit_code == 0, made.output
    ok = runner.invoke(cli, ["audit", "check-proof", str(tmp_path / "p.json"), "--public-key",
                             str(pem)])
    assert ok.exit_code == 0 and "valid" in ok.stdout and "model_digest" in ok.stdout, ok.output
    (tmp_path / "p.json").write_text((tmp_path / "p.json").read_text().replace(
        '"tree_size": ', '"tree_size": 1'))
    bad = runner.invoke(cli, ["audit", "check-proof", str(tmp_path / "p.json"), "--public-key",
                              str(pem)])
    assert bad.exit_code == 3 and "INVALID" in bad.stdout
    from inhouse.governance.keys import KeyStore
    keys = KeyStore(f"sqlite:///{tmp_path / 'k.db'}")
    _, auditor = keys.create("dpo", "auditor")
    app = build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL), audit_log=log,
                    key_store=keys)
    with running_server(app) as u:
        h = {"Authorization": f"Bearer {auditor}"}
        r = httpx.get(f"{u}/v1/audit/records/{rid}/proof", headers=h)
        assert r.status_code == 200 and r.json()["record_id"] == rid and "content" not in r.json()
        from inhouse.governance.audit_proof import check_proof
        assert check_proof(r.json(), key.public_key()).record_id == rid
        assert httpx.get(f"{u}/v1/audit/records/nope/proof", headers=h).status_code == 404


# ---- sealing and witnesses ---------------------------------------------------------------------
def test_sealing_on_a_timer_and_at_close(tmp_path):
    key = load_signing_key(tmp_path / "k")
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", key, checkpoint_every=1000,
                   checkpoint_seconds=0.3)
    log.start_sealing(tick_s=0.05)
    log._last_checkpoint = 0  # the first record waits no longer than the interval
    log.append({"x": 1})
    import time
    deadline = time.time() + 5
    while log.verify(key.public_key()).unsealed and time.time() < deadline:
        time.sleep(0.05)
    assert log.verify(key.public_key()).unsealed == 0  # sealed by the timer, no write needed
    log.checkpoint_seconds = 1e9
    log.append({"x": 2})
    assert log.verify(key.public_key()).unsealed == 1
    log.close()
    assert log.verify(key.public_key()).unsealed == 0  # sealed at shutdown


def test_a_clean_server_shutdown_seals_the_log(tmp_path):
    import socket
    import threading

    import uvicorn

    key = load_signing_key(tmp_path / "k")
    witness = tmp_path / "w.jsonl"
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", key, checkpoint_every=1000,
                   checkpoint_seconds=1e9, witness=FileWitness(witness))
    app = build_app(ScriptedEngine(FINAL), ServerSettings(model_name=MODEL), audit_log=log)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", **UVICORN_IMPL))
    thread = threading.Thread(target=server.run)
    thread.start()
    import time
    while not server.started:
        time.sleep(0.02)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body).status_code == 200
    assert log.verify(key.public_key()).unsealed == 6
    server.should_exit = True  # what SIGTERM and SIGINT do
    thread.join(timeout=20)
    report = log.verify(key.public_key(), read_witness(witness))
    assert report.ok and report.unsealed == 0 and report.num_witnessed == 1


def test_an_http_witness_is_retried_until_it_accepts(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from inhouse.governance.witness import HttpWitness

    got, refusals = [], {"left": 2}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            if refusals["left"]:
                refusals["left"] -= 1
                self.send_response(503)
            else:
                got.append(json.loads(body))
                self.send_response(201)
            self.end_headers()

        def log_message(self, *args):
            pass

    import json
    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = load_signing_key(tmp_path / "k")
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", key, checkpoint_every=2,
                   witness=HttpWitness(f"http://127.0.0.1:{server.server_address[1]}/cp"))
    import time
    t0 = time.perf_counter()
    for i in range(4):
        log.append({"i": i})
    assert time.perf_counter() - t0 < 2  # appends never wait for the witness
    deadline = time.time() + 15
    while len(got) < 2 and time.time() < deadline:
        time.sleep(0.1)
    log.close()
    server.shutdown()
    assert [c["tree_size"] for c in got] == [2, 4]
    assert log.verify(key.public_key(), got).ok


# ---- key rotation ------------------------------------------------------------------------------
def test_a_rotated_key_is_followed_from_the_pinned_one_and_a_forged_rotation_is_not(tmp_path):
    import json

    from inhouse.governance.audit_proof import ProofError, check_proof, make_proof

    old, new = load_signing_key(tmp_path / "old"), load_signing_key(tmp_path / "new")
    witness = tmp_path / "w.jsonl"
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", old, checkpoint_every=3,
                   witness=FileWitness(witness))
    for i in range(4):
        log.append({"i": i}, record_id=f"r{i}")
    log.rotate_key(new)
    for i in range(4, 9):
        log.append({"i": i}, record_id=f"r{i}")
    log.close()
    report = log.verify(old.public_key(), read_witness(witness))  # pinned before the rotation
    assert report.ok and report.num_witnessed >= 3
    assert not log.verify(new.public_key()).ok  # the new key alone cannot vouch for the past
    proof = make_proof(log, "r7")
    assert proof["key_chain"] and check_proof(proof, old.public_key()).record_id == "r7"
    assert check_proof(proof, new.public_key()).record_id == "r7"  # pinned after: no chain needed
    early = make_proof(log, "r1")  # against the newest checkpoint, signed by the new key
    assert check_proof(early, old.public_key()).record_id == "r1"
    assert check_proof(early, new.public_key()).record_id == "r1"
    stranger = load_signing_key(tmp_path / "stranger")
    with pytest.raises(ProofError):
        check_proof(early, stranger.public_key())
    forged = json.loads(json.dumps(proof))
    forged["key_chain"][0]["record"] = forged["key_chain"][0]["record"].replace("rotation", "rotatio")
    with pytest.raises(ProofError):
        check_proof(forged, old.public_key())

    # an attacker without the old key writes a rotation to a key of their own
    mallory = load_signing_key(tmp_path / "mallory")
    forged_log = AuditLog(f"sqlite:///{tmp_path / 'b.db'}", old, checkpoint_every=1000)
    for i in range(3):
        forged_log.append({"i": i})
    forged_log.checkpoint()
    forged_log.key = mallory  # no rotation leaf sealed by the old key
    forged_log.append({"i": 3})
    forged_log.checkpoint()
    bad = forged_log.verify(old.public_key())
    assert not bad.ok and "not the pinned key" in bad.problem


def test_rotate_key_from_the_cli(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    key = load_signing_key(tmp_path / "old")
    log = AuditLog(url, key)
    log.append({"x": 1})
    log.checkpoint()
    pem = tmp_path / "old.pub"
    pem.write_bytes(public_key_pem(key.public_key()))
    r = CliRunner().invoke(cli, ["audit", "rotate-key", "--new-key", str(tmp_path / "new"),
                                 "--database-url", url, "--audit-signing-key",
                                 str(tmp_path / "old")])
    assert r.exit_code == 0 and "rotated from key" in r.stdout, r.output
    nxt = load_signing_key(tmp_path / "new")
    after = AuditLog(url, nxt)
    after.append({"x": 2})
    after.checkpoint()
    ok = CliRunner().invoke(cli, ["audit", "verify", "--database-url", url, "--public-key", str(pem)])
    assert ok.exit_code == 0, ok.output


def test_records_written_behind_the_logs_back_are_never_sealed(tmp_path):
    """The window before the next seal: a well-formed record appended by someone without the
    key is refused by verify and by the next checkpoint (which would otherwise vouch for it)."""
    from tests.test_audit_log import canonical, merkle  # noqa: F401 - same helpers

    key = load_signing_key(tmp_path / "k")
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", key, checkpoint_every=1000)
    for i in range(3):
        log.append({"i": i}, subject="s")
    log.checkpoint()
    log.append({"i": 3}, subject="s")
    assert log.verify(key.public_key()).ok  # the tail signs itself
    con = sqlite3.connect(tmp_path / "a.db")
    body = {"index": 4, "record_id": "forged", "kind": "request", "subject": "s",
            "created_at": 1.0, "endpoint": "/v1/chat/completions"}
    raw = canonical(body)
    con.execute("INSERT INTO audit_leaves (idx, record_id, kind, subject, created_at, record, "
                "leaf_hash) VALUES (4, 'forged', 'request', 's', 1.0, ?, ?)",
                (raw.decode(), merkle.leaf_hash(raw).hex()))
    con.execute("UPDATE audit_head SET size = 5")
    con.commit()
    con.close()
    report = log.verify(key.public_key())
    assert not report.ok and report.first_bad_index == 4 and "not signed" in report.problem
    from inhouse.governance.audit_log import AuditError
    with pytest.raises(AuditError, match="refusing to seal"):
        log.checkpoint()
