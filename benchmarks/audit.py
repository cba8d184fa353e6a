"""The audit log's costs: `verify` of a large log, and what the log adds to each request.

    python benchmarks/audit.py [--records 1000000] [--requests 200]

1. Builds a log of --records leaves (request/completion records shaped like the server's, a
   third with content, a signed checkpoint every 100 and a witness line for each) in a SQLite
   file, written in bulk, then times `verify` with the pinned key, and with the witness.
2. Per request: the same scripted requests through a real server on 127.0.0.1 with the audit log
   on (content redacted, the default) and off, interleaved, and the median time of one
   `append` (one leaf, one transaction).
Writes benchmarks/results/audit.json.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from sqlalchemy import insert, update  # noqa: E402

from benchmarks.common import machine, memory, report  # noqa: E402
from inhouse.governance import merkle  # noqa: E402
from inhouse.governance.audit_log import (AuditLog, canonical, checkpoints_t, contents_t,  # noqa: E402
                                          head_t, leaves_t, load_signing_key)
from inhouse.governance.audit_verify import checkpoint_message, commitment, key_id  # noqa: E402


def build(log: AuditLog, key, n: int, every: int = 100) -> list[dict]:
    """n leaves in bulk (what n appends would write), checkpoints every `every`; returns the
    witness lines."""
    kid = key_id(key.public_key())
    t0 = 1_790_000_000.0
    hashes: list[bytes] = []
    witnessed = []
    batch_leaves, batch_content, batch_cps = [], [], []
    stack: list[tuple[int, bytes]] = []
    with log.engine.begin() as conn:
        for i in range(n):
            rid = f"chatcmpl_{i // 2:022d}-0"
            body = {"index": i, "record_id": rid, "kind": "request" if i % 2 == 0 else "completion",
                    "subject": f"user{i % 97}", "created_at": round(t0 + i * 0.01, 6)}
            if i % 2 == 0:
                body |= {"endpoint": "/v1/chat/completions", "model": "gpt-oss-20b",
                         "model_digest": "sha256:" + "ab" * 32, "params": {"max_tokens": 256}}
            else:
                body |= {"finish_reason": "stop", "seed": i, "completion_tokens": 42,
                         "output_ids_sha256": "cd" * 32}
            if i % 3 == 0:
                salt, content = secrets.token_hex(16), canonical({"answer": f"text {i}"}).decode()
                body["content_sha256"] = commitment(salt, content)
                batch_content.append(dict(idx=i, record_id=rid, salt=salt, content=content))
            raw = canonical(body)
            h = merkle.leaf_hash(raw)
            hashes.append(h)
            batch_leaves.append(dict(idx=i, record_id=rid, kind=body["kind"],
                                     subject=body["subject"], created_at=body["created_at"],
                                     record=raw.decode(), leaf_hash=h.hex()))
            stack.append((1, h))
            while len(stack) > 1 and stack[-1][0] == stack[-2][0]:
                (s, right), (_, left) = stack.pop(), stack.pop()
                stack.append((2 * s, merkle.node_hash(left, right)))
            if (i + 1) % every == 0:
                r = stack[-1][1]
                for _, left in reversed(stack[:-1]):
                    r = merkle.node_hash(left, r)
                signed_at = round(t0 + i * 0.01, 6)
                cp = dict(tree_size=i + 1, root=r.hex(), signed_at=signed_at, key_id=kid,
                          signature=key.sign(checkpoint_message(i + 1, r.hex(), signed_at)).hex())
                batch_cps.append(cp)
                witnessed.append(cp)
            if len(batch_leaves) >= 20_000:
                conn.execute(insert(leaves_t), batch_leaves)
                if batch_content:
                    conn.execute(insert(contents_t), batch_content)
                if batch_cps:
                    conn.execute(insert(checkpoints_t), batch_cps)
                batch_leaves, batch_content, batch_cps = [], [], []
        for table, rows in ((leaves_t, batch_leaves), (contents_t, batch_content),
                            (checkpoints_t, batch_cps)):
            if rows:
                conn.execute(insert(table), rows)
        conn.execute(update(head_t).values(size=n))
    return witnessed


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def per_request(requests: int, folder: Path) -> dict:
    from inhouse.config import ServerSettings
    from inhouse.server import build_app
    from tests.server_utils import ScriptedEngine, running_server
    from tests.test_server_chat import FINAL

    body = {"model": "m", "messages": [{"role": "user", "content": "My SIN is 046 454 286."}]}
    key = load_signing_key(folder / "k")
    logs = {"on": AuditLog(f"sqlite:///{folder / 'req.db'}", key), "off": None}
    times: dict[str, list[float]] = {"on": [], "off": []}
    apps = {name: build_app(ScriptedEngine(FINAL), ServerSettings(model_name="m",
                                                                  audit=name == "on"),
                            audit_log=log) for name, log in logs.items()}
    with running_server(apps["on"]) as on, running_server(apps["off"]) as off:
        with httpx.Client() as c:
            for url in (on, off):  # warm up
                c.post(f"{url}/v1/chat/completions", json=body)
            for _ in range(requests):  # interleaved: the machine's noise hits both alike
                for name, url in (("on", on), ("off", off)):
                    t = time.perf_counter()
                    assert c.post(f"{url}/v1/chat/completions", json=body).status_code == 200
                    times[name].append(time.perf_counter() - t)
    appends = []
    log = logs["on"]
    for i in range(200):
        t = time.perf_counter()
        log.append({"i": i}, content={"answer": "x" * 200}, subject="s")
        appends.append(time.perf_counter() - t)
    on_ms, off_ms = (statistics.median(times[k]) * 1000 for k in ("on", "off"))
    return {"requests": requests, "median_ms_audit_on": round(on_ms, 2),
            "median_ms_audit_off": round(off_ms, 2), "added_ms": round(on_ms - off_ms, 2),
            "append_median_ms": round(statistics.median(appends) * 1000, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key = load_signing_key(folder / "signing.key")
        log = AuditLog(f"sqlite:///{folder / 'audit.db'}", key)
        t = time.perf_counter()
        witnessed = build(log, key, args.records)
        build_s = time.perf_counter() - t
        fresh = AuditLog(f"sqlite:///{folder / 'audit.db'}")
        verify_s, plain = timed(lambda: fresh.verify(key.public_key()))
        witness_s, with_witness = timed(lambda: fresh.verify(key.public_key(), witnessed))
        assert plain.ok and with_witness.ok, (plain, with_witness)
        rss = memory()
        size_mb = (folder / "audit.db").stat().st_size / 2**20
        req = per_request(args.requests, folder)
    rows = [("records (checkpoints)", f"{args.records} ({plain.num_checkpoints})"),
            ("database size", f"{size_mb:.0f} MiB (built in {build_s:.0f} s)"),
            ("verify --public-key", f"{verify_s:.1f} s"),
            ("verify --public-key --witness", f"{witness_s:.1f} s ({len(witnessed)} lines)"),
            ("peak RSS (this process)", f"{rss['VmHWM'] / 2**30:.2f} GiB"),
            ("request, audit on / off (median)",
             f"{req['median_ms_audit_on']} / {req['median_ms_audit_off']} ms "
             f"(+{req['added_ms']} ms)"),
            ("one append (median)", f"{req['append_median_ms']} ms")]
    report("audit log: verify at scale and the cost per request", rows,
           {"machine": machine(), "records": args.records, "build_s": build_s,
            "verify_s": verify_s, "verify_witness_s": witness_s, "db_mib": size_mb,
            "memory": rss, "per_request": req}, "audit")


if __name__ == "__main__":
    main()
