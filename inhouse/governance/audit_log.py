"""The tamper-evident audit log: records are leaves of an append-only RFC 6962 Merkle tree, and
signed checkpoints (Ed25519; the key lives outside the database) seal its prefixes.

- A leaf is the canonical JSON of a record *including its index*, so a leaf's hash binds its
  position: modification, deletion, insertion and reordering all change a hash or a root.
- Content (prompt/answer text) sits in a separate table, committed by a salted hash inside its
  leaf, so that any edit shows while erasure stays possible: an erasure is itself a leaf, and
  content missing without an erasure that covers it is reported as tampering.
- `verify` (audit_verify.py) checks every leaf, column, content row, the head, every checkpoint
  against the pinned public key, and the database against a witness's copy of the checkpoints;
  it names the first bad record it can. Records after the last checkpoint are sealed by a timer
  (`start_sealing`) and at shutdown (`close`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, Text, and_, func, insert,
                        select, update)

from inhouse.config import cache_root
from inhouse.errors import InhouseError
from inhouse.governance import merkle
from inhouse.governance.audit_verify import (Content, Leaf, VerifyReport, checkpoint_message,
                                             commitment, content_problem, key_id, leaf_message,
                                             leaf_problem, leaf_signed, signed_version,
                                             verify_rows)
from inhouse.governance.database import add_missing_columns, open_database, private_dir, scrub
from inhouse.governance.witness import Witness

log = logging.getLogger("inhouse.audit")
metadata = MetaData()
leaves_t = Table(
    "audit_leaves", metadata,
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("record_id", String(64), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("subject", String(200), index=True),
    Column("created_at", Float, nullable=False),
    Column("record", Text, nullable=False),  # canonical JSON, hashed into the leaf
    Column("leaf_hash", String(64), nullable=False),
    # Ed25519 over the leaf hash while the record is unsealed; cleared by the sealing checkpoint
    Column("signature", String(128)),
)
contents_t = Table(  # one row per leaf that has content; its salted hash is in the leaf
    "audit_leaf_content", metadata,
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("record_id", String(64), nullable=False, index=True),
    Column("salt", String(32), nullable=False),
    Column("content", Text, nullable=False),  # canonical JSON; erasable
)
content_t = Table(  # logs written before content commitments: read, erased, never verifiable
    "audit_content", metadata,
    Column("record_id", String(64), primary_key=True),
    Column("content", Text, nullable=False),
)
checkpoints_t = Table(
    "audit_checkpoints", metadata,
    Column("tree_size", Integer, primary_key=True, autoincrement=False),
    Column("root", String(64), nullable=False),
    Column("signed_at", Float, nullable=False),
    Column("signature", String(128), nullable=False),
    Column("key_id", String(64), nullable=False),
)
head_t = Table(  # one row: serialises writers (a row lock on PostgreSQL, BEGIN IMMEDIATE on SQLite)
    "audit_head", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("size", Integer, nullable=False),
)


class AuditError(InhouseError):
    """The audit log cannot be opened or written (bad URL, unreadable key, ...)."""


def default_url() -> str:
    """The audit database when none is given: a SQLite file in inhouse's cache."""
    private_dir(cache_root())
    return f"sqlite:///{cache_root() / 'audit.db'}"


def default_key_path() -> Path:
    """The checkpoint signing key when none is given: in the cache, outside the database."""
    return cache_root() / "audit-signing.key"


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key that signs checkpoints; created (mode 0600) if missing."""
    try:
        if path.is_file():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise AuditError(f"{path} is not an Ed25519 private key")
            return key
        key = Ed25519PrivateKey.generate()
        private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return key
    except (ValueError, OSError) as e:
        raise AuditError(f"cannot use the audit signing key {path}: {e}") from None


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A pinned public key (PEM), as `audit public-key` printed it."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, OSError) as e:
        raise AuditError(f"cannot read the public key {path}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"{path} is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class AuditEntry:
    index: int
    record_id: str
    leaf_hash: str



class AuditLog:
    def __init__(self, url: str, signing_key: Ed25519PrivateKey | None = None,
                 checkpoint_every: int = 100, checkpoint_seconds: float = 60.0,
                 witness: Witness | None = None) -> None:
        try:
            self.engine = open_database(url, manual_begin=True)
        except Exception as e:  # noqa: BLE001 - a bad URL or a missing driver
            raise AuditError(f"cannot open the audit database {url!r}: {e}") from None
        metadata.create_all(self.engine)
        add_missing_columns(self.engine, "audit_leaves", {"signature": "VARCHAR(128)"})
        with self.engine.begin() as conn:
            if conn.execute(select(head_t.c.size).where(head_t.c.id == 1)).first() is None:
                conn.execute(insert(head_t).values(id=1, size=0))
        self.key = signing_key
        self.witness = witness
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, checkpoint_seconds
        self._lock = threading.Lock()
        self._last_checkpoint = time.time()
        self._sealer: threading.Thread | None = None
        self._closing = threading.Event()

    # ---- writing -------------------------------------------------------------------------------
    def append(self, record: dict, content: dict | None = None, record_id: str | None = None,
               kind: str = "request", subject: str | None = None) -> AuditEntry:
        """Append one leaf (committed before returning). Content, if any, goes beside it, and
        the leaf holds its salted hash (`content_sha256`)."""
        record_id = record_id or f"aud_{uuid.uuid4().hex[:20]}"
        salt = secrets.token_hex(16)
        content_json = canonical(content).decode() if content is not None else None
        with self._lock, self.engine.begin() as conn:
            size = conn.execute(select(head_t.c.size).where(head_t.c.id == 1)
                                .with_for_update()).scalar_one()
            body = {"index": size, "record_id": record_id, "kind": kind, "subject": subject,
                    "created_at": round(time.time(), 6)} | record
            if content_json is not None:
                body["content_sha256"] = commitment(salt, content_json)
            leaf = merkle.leaf_hash(canonical(body)).hex()
            sig = self.key.sign(leaf_message(leaf)).hex() if self.key is not None else None
            conn.execute(insert(leaves_t).values(
                idx=size, record_id=record_id, kind=kind, subject=subject,
                created_at=body["created_at"], record=canonical(body).decode(), leaf_hash=leaf,
                signature=sig))
            if content_json is not None:
                conn.execute(insert(contents_t).values(idx=size, record_id=record_id, salt=salt,
                                                       content=content_json))
            conn.execute(update(head_t).where(head_t.c.id == 1).values(size=size + 1))
        entry = AuditEntry(size, record_id, leaf)
        if self.key is not None and ((size + 1) % self.checkpoint_every == 0 or
                                     time.time() - self._last_checkpoint > self.checkpoint_seconds):
            self._seal_quietly()
        return entry

    def _seal_quietly(self) -> None:
        """Seal now; a log that refuses to be sealed (a record written behind its back) keeps
        the record this call wrote, says so loudly, and leaves the rest to `verify`."""
        try:
            self.checkpoint()
        except AuditError as e:
            self._last_checkpoint = time.time()  # the timer tries again an interval later
            log.error("audit log NOT SEALED: %s", e)

    def checkpoint(self) -> tuple[int, str] | None:
        """Sign the current tree head and hand it to the witness; returns (size, root hex), or
        None if nothing is new."""
        if self.key is None:
            raise AuditError("no signing key: checkpoints cannot be issued")
        with self._lock, self.engine.begin() as conn:
            size = conn.execute(select(head_t.c.size).where(head_t.c.id == 1)
                                .with_for_update()).scalar_one()
            last = conn.execute(select(checkpoints_t.c.tree_size)
                                .order_by(checkpoints_t.c.tree_size.desc())).first()
            if size == 0 or (last is not None and last[0] == size):
                self._last_checkpoint = time.time()
                return None
            sealed = last[0] if last is not None else 0
            self._check_tail(conn, sealed)
            hashes = [bytes.fromhex(h) for (h,) in conn.execute(
                select(leaves_t.c.leaf_hash).order_by(leaves_t.c.idx))]
            root_hex = merkle.root(hashes).hex()
            signed_at = round(time.time(), 6)
            sig = self.key.sign(checkpoint_message(size, root_hex, signed_at)).hex()
            cp = dict(tree_size=size, root=root_hex, signed_at=signed_at, signature=sig,
                      key_id=key_id(self.key.public_key()))
            conn.execute(insert(checkpoints_t).values(**cp))
            conn.execute(update(leaves_t).where(leaves_t.c.idx >= sealed, leaves_t.c.idx < size)
                         .values(signature=None))
        self._last_checkpoint = time.time()
        if self.witness is not None:
            try:
                self.witness.send(cp)
            except OSError as e:  # the log stays written; verify --witness will show the gap
                log.error("audit witness: checkpoint %d not recorded (%s)", size, e)
        return size, root_hex

    def _check_tail(self, conn, sealed: int) -> None:
        """Before sealing: every record since the last checkpoint must carry its own signature
        by this log's key, or someone wrote it behind the log's back; sealing it would vouch
        for it. (The tail after a checkpoint of a log older than record signatures is not
        signed: it is sealed once, as it is.)"""
        public = self.key.public_key()
        cp = conn.execute(select(checkpoints_t).where(checkpoints_t.c.tree_size == sealed)).first()
        if cp is not None and signed_version(public, cp.tree_size, cp.root, cp.signed_at,
                                             cp.signature) == 1:
            return
        for leaf in self._leaves(conn, leaves_t.c.idx >= sealed):
            if merkle.leaf_hash(leaf.record.encode()).hex() != leaf.leaf_hash or \
                    not leaf_signed(public, leaf):
                raise AuditError(f"refusing to seal: record {leaf.idx} is not signed by this "
                                 "log's key (written behind the log's back?); run "
                                 "`inhouse audit verify`")

    def rotate_key(self, new_key: Ed25519PrivateKey) -> None:
        """A `key-rotation` leaf naming the next key, sealed by a checkpoint of the current key;
        from then on checkpoints are signed by the next key. Rotate with the server stopped:
        a process still holding the old key would sign checkpoints verify then refuses."""
        if self.key is None:
            raise AuditError("no signing key: nothing to rotate from")
        public = new_key.public_key()
        self.append({"next_key_id": key_id(public),
                     "next_public_key": public_key_pem(public).decode()},
                    record_id=f"rot_{uuid.uuid4().hex[:20]}", kind="key-rotation")
        self.checkpoint()
        self.key = new_key

    def start_sealing(self, tick_s: float = 1.0) -> None:
        """Seal on a timer: records older than `checkpoint_seconds` never wait for the next
        write to be covered by a checkpoint."""
        if self.key is None or self._sealer is not None:
            return

        def run() -> None:
            while not self._closing.wait(min(tick_s, self.checkpoint_seconds)):
                if time.time() - self._last_checkpoint >= self.checkpoint_seconds:
                    try:
                        self._seal_quietly()
                    except Exception:  # noqa: BLE001 - a busy database: the next tick retries
                        log.exception("audit sealing failed; retrying")

        self._sealer = threading.Thread(target=run, name="inhouse-audit-seal", daemon=True)
        self._sealer.start()

    def close(self) -> None:
        """Stop the timer and seal what is left (clean shutdown: SIGTERM, SIGINT)."""
        self._closing.set()
        if self._sealer is not None:
            self._sealer.join(timeout=5)
            self._sealer = None
        if self.key is not None:
            self._seal_quietly()
        if self.witness is not None:
            self.witness.close()

    # ---- reading -------------------------------------------------------------------------------
    def _leaves(self, conn, where=None, order_desc: bool = False, limit: int | None = None):
        q = select(leaves_t).order_by(leaves_t.c.idx.desc() if order_desc else leaves_t.c.idx)
        if where is not None:
            q = q.where(where)
        if limit is not None:
            q = q.limit(limit)
        return [Leaf(r.idx, r.record_id, r.kind, r.subject, r.created_at, r.record, r.leaf_hash,
                     r.signature) for r in conn.execute(q)]

    def _marked(self, conn, rows: list[Leaf]) -> list[dict]:
        """The records of these leaves, each marked `"verified": false` with its problem when it
        fails the checks that concern it alone (its hash, its columns, its content)."""
        contents = self._contents(conn, [r.idx for r in rows])
        checked = [(row, *leaf_problem(row.idx, row)) for row in rows]
        erasures = []  # read only when some committed content is missing: a scan of the log
        if any(p is None and b.get("content_sha256") and row.idx not in contents
               for row, p, b in checked):
            erasures = [json.loads(r.record)
                        for r in self._leaves(conn, leaves_t.c.kind == "erasure")]
        out = []
        for row, problem, body in checked:
            if body is None:
                body = {"index": row.idx, "record_id": row.record_id, "kind": row.kind}
            if problem is None:
                problem = content_problem(body, contents.get(row.idx), erasures)
            out.append(body | ({"verified": False, "problem": problem} if problem
                               else {"verified": True}))
        return out

    def _contents(self, conn, idxs: list[int]) -> dict[int, Content]:
        out: dict[int, Content] = {}
        for i in range(0, len(idxs), 500):
            for r in conn.execute(select(contents_t).where(contents_t.c.idx.in_(idxs[i:i + 500]))):
                out[r.idx] = Content(r.idx, r.record_id, r.salt, r.content)
        return out

    def get(self, record_id: str) -> list[dict]:
        """The leaves of one record id (a request's start and completion), marked verified or
        not; the first carries the record's content (all parts merged; see `content_of`)."""
        with self.engine.connect() as conn:
            out = self._marked(conn, self._leaves(conn, leaves_t.c.record_id == record_id))
        content = self.content_of(record_id)
        if out and content is not None:
            out[0]["content"] = content
        return out

    def list(self, subject: str | None = None, since: float | None = None,
             limit: int = 100) -> list[dict]:
        where = []
        if subject is not None:
            where.append(leaves_t.c.subject == subject)
        if since is not None:
            where.append(leaves_t.c.created_at >= since)
        with self.engine.connect() as conn:
            rows = self._leaves(conn, and_(*where) if where else None, order_desc=True,
                                limit=limit)
            return self._marked(conn, rows[::-1])

    def scan(self, below: int | None = None, subject: str | None = None,
             since: float | None = None, until: float | None = None,
             limit: int = 1000) -> list[dict]:
        """Leaves newest first, below index `below` (a page of a walk back through the log),
        marked as `list` marks them; `audit_search` groups them into records."""
        where = []
        if below is not None:
            where.append(leaves_t.c.idx < below)
        if subject is not None:
            where.append(leaves_t.c.subject == subject)
        if since is not None:
            where.append(leaves_t.c.created_at >= since)
        if until is not None:
            where.append(leaves_t.c.created_at < until)
        with self.engine.connect() as conn:
            rows = self._leaves(conn, and_(*where) if where else None, order_desc=True,
                                limit=limit)
            return self._marked(conn, rows)

    def latest_checkpoint(self) -> dict | None:
        """The last signed checkpoint (tree size, root, when, by which key), if any."""
        with self.engine.connect() as conn:
            cp = conn.execute(select(checkpoints_t)
                              .order_by(checkpoints_t.c.tree_size.desc())).first()
            size = conn.execute(select(head_t.c.size).where(head_t.c.id == 1)).scalar_one()
        if cp is None:
            return None
        return {"tree_size": cp.tree_size, "root": cp.root, "signed_at": cp.signed_at,
                "key_id": cp.key_id, "log_size": size}

    def content_of(self, record_id: str) -> dict | None:
        """A record's content: its parts (request, completion) merged in log order; a log
        written before commitments keeps one merged row."""
        with self.engine.connect() as conn:
            parts = [json.loads(r.content) for r in conn.execute(
                select(contents_t.c.content).where(contents_t.c.record_id == record_id)
                .order_by(contents_t.c.idx))]
            legacy = conn.execute(select(content_t.c.content)
                                  .where(content_t.c.record_id == record_id)).first()
        if legacy is not None:
            parts.insert(0, json.loads(legacy.content))
        if not parts:
            return None
        merged: dict = {}
        for p in parts:
            merged |= p
        return merged

    # ---- verification ----------------------------------------------------------------------------
    def verify(self, public_key: Ed25519PublicKey,
               witnessed: list[dict] | None = None) -> VerifyReport:
        """Everything in the database against `public_key` (pin it: never derive it from a
        private key that sits beside the database) and, if given, a witness's checkpoints."""
        with self.engine.connect() as conn:
            rows = self._leaves(conn)
            contents = {r.idx: Content(r.idx, r.record_id, r.salt, r.content)
                        for r in conn.execute(select(contents_t))}
            cps = conn.execute(select(checkpoints_t).order_by(checkpoints_t.c.tree_size)).all()
            head = conn.execute(select(head_t.c.size)).all()
            legacy = conn.execute(select(func.count()).select_from(content_t)).scalar_one()
        head_size = head[0].size if len(head) == 1 else None
        return verify_rows(rows, contents, cps, head_size, public_key, witnessed, legacy)

    # ---- privacy operations (PIPEDA 4.5, 4.7; GDPR 15, 17) --------------------------------------
    def export(self, subject: str) -> dict:
        """Everything held about a subject: every leaf (marked verified or not), and the content
        still kept."""
        with self.engine.connect() as conn:
            records = self._marked(conn, self._leaves(conn, leaves_t.c.subject == subject))
        ids = sorted({r["record_id"] for r in records})
        content = {i: c for i in ids if (c := self.content_of(i)) is not None}
        return {"subject": subject, "exported_at": time.time(), "records": records,
                "content": content}

    def erase(self, subject: str | None = None, before: float | None = None,
              reason: str = "request", extra: dict | None = None) -> int:
        """Delete the content (not the leaves) of a subject's records, or of records older than
        `before`; the erasure is itself a leaf whose criteria (subject, before) say which
        missing content is accounted for, so `verify` still passes. Returns how many records'
        content was erased."""
        if subject is None and before is None:
            raise AuditError("erase needs a subject or a cut-off time")
        q = select(leaves_t.c.idx, leaves_t.c.record_id)
        if subject is not None:
            q = q.where(leaves_t.c.subject == subject)
        if before is not None:
            q = q.where(leaves_t.c.created_at < before)
        with self._lock, self.engine.begin() as conn:
            found = conn.execute(q).all()
            idxs, ids = [r.idx for r in found], sorted({r.record_id for r in found})
            erased: set[str] = set()
            for i in range(0, len(idxs), 500):
                chunk = idxs[i:i + 500]
                erased |= {r.record_id for r in conn.execute(
                    select(contents_t.c.record_id).where(contents_t.c.idx.in_(chunk)))}
                conn.execute(contents_t.delete().where(contents_t.c.idx.in_(chunk)))
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                erased |= {r.record_id for r in conn.execute(
                    select(content_t.c.record_id).where(content_t.c.record_id.in_(chunk)))}
                conn.execute(content_t.delete().where(content_t.c.record_id.in_(chunk)))
        if erased or subject is not None or any((extra or {}).values()):
            self.append({"erased_records": len(erased), "reason": reason,
                         "before": before} | (extra or {}), kind="erasure", subject=subject)
        if erased:
            scrub(self.engine, ("audit_leaf_content", "audit_content"))
        return len(erased)
