"""The audit log detects every tampering of a sealed log: modification, deletion, insertion,
reordering, truncation, forged checkpoints; and stays valid when content is erased."""

import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import delete, insert, select, update

from inhouse.governance import merkle
from inhouse.governance.audit_log import (AuditLog, canonical, checkpoints_t, contents_t,
                                          head_t, leaves_t, load_signing_key)


def new_log(tmp_path, n=12, every=5, name="audit.db"):
    key = load_signing_key(tmp_path / "signing.key")
    log = AuditLog(f"sqlite:///{tmp_path / name}", key, checkpoint_every=every,
                   checkpoint_seconds=1e9)
    for i in range(n):
        log.append({"endpoint": "/v1/chat/completions", "prompt_ids_sha256": f"{i:064x}",
                    "output_tokens": i}, content={"prompt": f"question {i}"},
                   subject=f"s{i % 3}")
    log.checkpoint()
    return log, key.public_key()


def rewrite(log, mutate):
    """The strongest attacker without the signing key: edit rows, then make every table agree
    again (leaf hashes, content commitments with fresh salts, the head); only the signed
    checkpoints (and a witness) are left to catch it."""
    import secrets

    from inhouse.governance.audit_verify import commitment

    with log.engine.begin() as conn:
        rows = [json.loads(r.record) for r in conn.execute(select(leaves_t.c.record)
                                                           .order_by(leaves_t.c.idx))]
        kept = {(c.record_id, c.idx): c.content for c in conn.execute(select(contents_t))}
        by_leaf = {id(b): kept.get((b["record_id"], b["index"])) for b in rows}
        rows = mutate(rows)
        conn.execute(delete(leaves_t))
        conn.execute(delete(contents_t))
        for i, body in enumerate(rows):
            body = dict(body, index=i)
            content = by_leaf.get(id(body)) or next(
                (v for (rid, _), v in kept.items() if rid == body["record_id"]
                 and "content_sha256" in body), None)
            if content is not None:
                salt = secrets.token_hex(16)
                body["content_sha256"] = commitment(salt, content)
                conn.execute(insert(contents_t).values(idx=i, record_id=body["record_id"],
                                                       salt=salt, content=content))
            conn.execute(insert(leaves_t).values(
                idx=i, record_id=body["record_id"], kind=body["kind"], subject=body["subject"],
                created_at=body["created_at"], record=canonical(body).decode(),
                leaf_hash=merkle.leaf_hash(canonical(body)).hex()))
        conn.execute(update(head_t).values(size=len(rows)))


def test_a_clean_log_verifies(tmp_path):
    log, pub = new_log(tmp_path)
    report = log.verify(pub)
    assert report.ok and report.num_records == 12 and report.num_checkpoints == 3
    assert report.unsealed == 0


def test_the_key_file_is_private(tmp_path):
    load_signing_key(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0


TAMPERS = {
    "modify a field": lambda rows, i, j: [dict(r, output_tokens=999) if k == i else r
                                          for k, r in enumerate(rows)],
    "delete a record": lambda rows, i, j: rows[:i] + rows[i + 1:],
    "insert a record": lambda rows, i, j: rows[:i] + [dict(rows[i], record_id="forged")] + rows[i:],
    "swap two records": lambda rows, i, j: _swap(rows, i, j),
    "truncate the end": lambda rows, i, j: rows[:i],
}


def _swap(rows, i, j):
    rows = list(rows)
    rows[i], rows[j] = rows[j], rows[i]
    return rows


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(sorted(TAMPERS)), i=st.integers(0, 11), j=st.integers(0, 11),
       n=st.integers(6, 12))
def test_every_tampering_of_a_sealed_log_is_detected(tmp_path_factory, kind, i, j, n):
    i, j = i % n, j % n
    if kind == "swap two records" and i == j:
        j = (i + 1) % n
    tmp = tmp_path_factory.mktemp("t")
    log, pub = new_log(tmp, n=n)
    rewrite(log, lambda rows: TAMPERS[kind](rows, i, j))
    report = log.verify(pub)
    assert not report.ok, kind
    assert report.first_bad_index is not None and report.first_bad_index <= max(i, j)


@pytest.mark.parametrize("edit", [
    lambda r: r.replace('"output_tokens":7', '"output_tokens":8'),  # a value
    lambda r: r + " ",  # even a byte that changes nothing when parsed
])
def test_a_naive_edit_is_pinned_to_its_record(tmp_path, edit):
    log, pub = new_log(tmp_path)
    with log.engine.begin() as conn:
        row = conn.execute(select(leaves_t.c.record).where(leaves_t.c.idx == 7)).scalar_one()
        conn.execute(update(leaves_t).where(leaves_t.c.idx == 7).values(record=edit(row)))
    report = log.verify(pub)
    assert not report.ok and report.first_bad_index == 7 and "modified" in report.problem


def test_a_deleted_row_is_a_gap(tmp_path):
    log, pub = new_log(tmp_path)
    with log.engine.begin() as conn:
        conn.execute(delete(leaves_t).where(leaves_t.c.idx == 4))
    report = log.verify(pub)
    assert report.first_bad_index == 4 and "missing" in report.problem


def test_a_forged_checkpoint_fails_its_signature(tmp_path):
    log, pub = new_log(tmp_path)
    rewrite(log, lambda rows: [dict(r, output_tokens=0) for r in rows])
    with log.engine.begin() as conn:  # the attacker also rewrites the roots...
        hashes = [bytes.fromhex(h) for (h,) in conn.execute(select(leaves_t.c.leaf_hash)
                                                             .order_by(leaves_t.c.idx))]
        for (size,) in conn.execute(select(checkpoints_t.c.tree_size)).all():
            conn.execute(update(checkpoints_t).where(checkpoints_t.c.tree_size == size)
                         .values(root=merkle.root(hashes[:size]).hex()))
    report = log.verify(pub)  # ...but cannot sign them
    assert not report.ok and "bad signature" in report.problem


def test_erasing_content_keeps_the_log_valid_deleting_it_does_not(tmp_path):
    log, pub = new_log(tmp_path)
    rid = log.list(subject="s1")[0]["record_id"]
    assert log.content_of(rid) == {"prompt": "question 1"}
    with log.engine.begin() as conn:  # a DBA deletes content behind the log's back
        conn.execute(delete(contents_t).where(contents_t.c.record_id == rid))
    report = log.verify(pub)
    assert not report.ok and "no erasure covers it" in report.problem
    assert [r["verified"] for r in log.get(rid)] == [False]
    log.erase(subject="s1")  # the same content, erased: accounted for by a signed leaf
    assert log.content_of(rid) is None and log.verify(pub).ok


def test_the_unsealed_tail_is_reported(tmp_path):
    log, pub = new_log(tmp_path, n=7, every=100)
    log.append({"endpoint": "x"})
    report = log.verify(pub)
    assert report.ok and report.unsealed == 1


def check_concurrent_writers(url, key, per_writer=30):
    """Six threads over three AuditLog objects ("processes") on one database: indexes stay
    contiguous and the log verifies."""
    logs = [AuditLog(url, key, checkpoint_every=25) for _ in range(3)]

    def write(log, t):
        for i in range(per_writer):
            log.append({"writer": t, "i": i})

    threads = [threading.Thread(target=write, args=(logs[t % 3], t)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logs[0].checkpoint()
    report = logs[0].verify(key.public_key())
    assert report.ok and report.num_records == 6 * per_writer


def test_concurrent_writers_get_contiguous_indexes(tmp_path):
    check_concurrent_writers(f"sqlite:///{tmp_path / 'c.db'}", load_signing_key(tmp_path / "k"))


def test_export_and_erase_a_subject_keep_the_log_valid(tmp_path):
    log, pub = new_log(tmp_path)
    exported = log.export("s1")
    assert len(exported["records"]) == 4 and len(exported["content"]) == 4
    assert all(r["subject"] == "s1" for r in exported["records"])
    assert log.erase(subject="s1") == 4
    assert log.export("s1")["content"] == {} and log.export("s0")["content"]
    erasures = [r for r in log.list() if r["kind"] == "erasure"]
    assert erasures[-1]["subject"] == "s1" and erasures[-1]["erased_records"] == 4
    log.checkpoint()
    assert log.verify(pub).ok


def test_retention_erases_old_content_only(tmp_path):
    import time as _time
    log, pub = new_log(tmp_path, n=4)
    cutoff = _time.time()
    log.append({"late": True}, content={"prompt": "new"}, record_id="late")
    assert log.erase(before=cutoff, reason="retention") == 4
    assert log.content_of("late") == {"prompt": "new"}
    log.checkpoint()
    assert log.verify(pub).ok
