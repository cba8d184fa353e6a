"""The tamper-evident audit log: records are leaves of an append-only RFC 6962 Merkle tree, and
signed checkpoints (Ed25519; the key lives outside the database) seal its prefixes.

- A leaf is the canonical JSON of a record *including its index*, so a leaf's hash binds its
  position: modification, deletion, insertion and reordering all change a hash or a root.
- Content (prompt/answer text) sits in a separate table, outside the leaves, so it can be erased
  while `verify` still passes.
- `verify` recomputes every leaf, checks the indexes are 0..n-1, every checkpoint's signature and
  root, and the consistency of consecutive checkpoints; it names the first bad record it can.
  Records after the last checkpoint are protected by their leaf hashes only until the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, insert, select, update

from inhouse.config import cache_root
from inhouse.errors import InhouseError
from inhouse.governance import merkle
from inhouse.governance.database import open_database, private_dir, scrub

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
)
content_t = Table(
    "audit_content", metadata,
    Column("record_id", String(64), primary_key=True),
    Column("content", Text, nullable=False),  # JSON; erasable, never part of a leaf
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


def checkpoint_message(size: int, root_hex: str, signed_at: float) -> bytes:
    return f"inhouse-audit-checkpoint\n{size}\n{root_hex}\n{signed_at:.6f}".encode()


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


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class AuditEntry:
    index: int
    record_id: str
    leaf_hash: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    num_records: int
    num_checkpoints: int
    unsealed: int  # records after the last checkpoint
    first_bad_index: int | None = None
    problem: str | None = None


class AuditLog:
    def __init__(self, url: str, signing_key: Ed25519PrivateKey | None = None,
                 checkpoint_every: int = 100, checkpoint_seconds: float = 60.0) -> None:
        try:
            self.engine = open_database(url, manual_begin=True)
        except Exception as e:  # noqa: BLE001 - a bad URL or a missing driver
            raise AuditError(f"cannot open the audit database {url!r}: {e}") from None
        metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            if conn.execute(select(head_t.c.size).where(head_t.c.id == 1)).first() is None:
                conn.execute(insert(head_t).values(id=1, size=0))
        self.key = signing_key
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, checkpoint_seconds
        self._lock = threading.Lock()
        self._last_checkpoint = time.time()

    # ---- writing -------------------------------------------------------------------------------
    def append(self, record: dict, content: dict | None = None, record_id: str | None = None,
               kind: str = "request", subject: str | None = None) -> AuditEntry:
        """Append one leaf (committed before returning); content, if any, goes beside it."""
        record_id = record_id or f"aud_{uuid.uuid4().hex[:20]}"
        with self._lock, self.engine.begin() as conn:
            size = conn.execute(select(head_t.c.size).where(head_t.c.id == 1)
                                .with_for_update()).scalar_one()
            body = {"index": size, "record_id": record_id, "kind": kind, "subject": subject,
                    "created_at": round(time.time(), 6)} | record
            leaf = merkle.leaf_hash(canonical(body)).hex()
            conn.execute(insert(leaves_t).values(
                idx=size, record_id=record_id, kind=kind, subject=subject,
                created_at=body["created_at"], record=canonical(body).decode(), leaf_hash=leaf))
            if content is not None and kind == "request":
                conn.execute(insert(content_t).values(record_id=record_id,
                                                      content=canonical(content).decode()))
            conn.execute(update(head_t).where(head_t.c.id == 1).values(size=size + 1))
        entry = AuditEntry(size, record_id, leaf)
        if self.key is not None and ((size + 1) % self.checkpoint_every == 0 or
                                     time.time() - self._last_checkpoint > self.checkpoint_seconds):
            self.checkpoint()
        return entry

    def checkpoint(self) -> tuple[int, str] | None:
        """Sign the current tree head; returns (size, root hex), or None if nothing new."""
        if self.key is None:
            raise AuditError("no signing key: checkpoints cannot be issued")
        with self._lock, self.engine.begin() as conn:
            size = conn.execute(select(head_t.c.size).where(head_t.c.id == 1)
                                .with_for_update()).scalar_one()
            last = conn.execute(select(checkpoints_t.c.tree_size)
                                .order_by(checkpoints_t.c.tree_size.desc())).first()
            if size == 0 or (last is not None and last[0] == size):
                return None
            hashes = [bytes.fromhex(h) for (h,) in conn.execute(
                select(leaves_t.c.leaf_hash).order_by(leaves_t.c.idx))]
            root_hex = merkle.root(hashes).hex()
            signed_at = round(time.time(), 6)
            sig = self.key.sign(checkpoint_message(size, root_hex, signed_at)).hex()
            key_id = hashlib.sha256(public_key_bytes(self.key.public_key())).hexdigest()[:16]
            conn.execute(insert(checkpoints_t).values(tree_size=size, root=root_hex,
                                                      signed_at=signed_at, signature=sig,
                                                      key_id=key_id))
        self._last_checkpoint = time.time()
        return size, root_hex

    # ---- reading -------------------------------------------------------------------------------
    def get(self, record_id: str) -> list[dict]:
        """The leaves of one record id (a request's start and completion), with their content."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(leaves_t.c.record).where(leaves_t.c.record_id == record_id)
                                .order_by(leaves_t.c.idx)).all()
            content = conn.execute(select(content_t.c.content)
                                   .where(content_t.c.record_id == record_id)).first()
        out = [json.loads(r.record) for r in rows]
        if out and content is not None:
            out[0]["content"] = json.loads(content.content)
        return out

    def list(self, subject: str | None = None, since: float | None = None,
             limit: int = 100) -> list[dict]:
        q = select(leaves_t.c.record).order_by(leaves_t.c.idx.desc()).limit(limit)
        if subject is not None:
            q = q.where(leaves_t.c.subject == subject)
        if since is not None:
            q = q.where(leaves_t.c.created_at >= since)
        with self.engine.connect() as conn:
            return [json.loads(r.record) for r in conn.execute(q)][::-1]

    # ---- verification ----------------------------------------------------------------------------
    def verify(self, public_key: Ed25519PublicKey) -> VerifyReport:
        with self.engine.connect() as conn:
            rows = conn.execute(select(leaves_t.c.idx, leaves_t.c.record, leaves_t.c.leaf_hash)
                                .order_by(leaves_t.c.idx)).all()
            cps = conn.execute(select(checkpoints_t).order_by(checkpoints_t.c.tree_size)).all()
        n = len(rows)
        hashes: list[bytes] = []
        for expected, row in enumerate(rows):
            def bad(problem: str) -> VerifyReport:
                return VerifyReport(False, n, len(cps), 0, expected, problem)
            if row.idx != expected:
                return bad(f"record {expected} is missing (the next stored index is {row.idx})")
            try:
                body = json.loads(row.record)
            except ValueError:
                return bad(f"record {expected} is not valid JSON")
            if body.get("index") != expected:
                return bad(f"record {expected} claims index {body.get('index')}")
            leaf = merkle.leaf_hash(row.record.encode())  # the stored bytes, exactly as written
            if leaf.hex() != row.leaf_hash:
                return bad(f"record {expected} does not match its leaf hash (modified)")
            hashes.append(leaf)
        previous = None
        for cp in cps:
            start = previous.tree_size if previous is not None else 0
            try:
                public_key.verify(bytes.fromhex(cp.signature),
                                  checkpoint_message(cp.tree_size, cp.root, cp.signed_at))
            except (InvalidSignature, ValueError):
                return VerifyReport(False, n, len(cps), 0, start,
                                    f"checkpoint at size {cp.tree_size} has a bad signature")
            if cp.tree_size > n:  # the interval lost records: somewhere from `start` on
                return VerifyReport(False, n, len(cps), 0, start,
                                    f"records {start}..{cp.tree_size - 1}: the checkpoint at size "
                                    f"{cp.tree_size} covers records that are gone (only {n} remain)")
            if merkle.root(hashes[:cp.tree_size]).hex() != cp.root:
                return VerifyReport(False, n, len(cps), 0, start,
                                    f"records {start}..{cp.tree_size - 1} do not match the "
                                    f"checkpoint signed at size {cp.tree_size} (changed, "
                                    "inserted, deleted or reordered)")
            if previous is not None:
                proof = merkle.consistency_proof(hashes[:cp.tree_size], previous.tree_size)
                if not merkle.verify_consistency(previous.tree_size, cp.tree_size,
                                                 bytes.fromhex(previous.root),
                                                 bytes.fromhex(cp.root), proof):
                    return VerifyReport(False, n, len(cps), 0, start,
                                        f"checkpoint {cp.tree_size} is not an extension of "
                                        f"checkpoint {previous.tree_size}")
            previous = cp
        sealed = previous.tree_size if previous is not None else 0
        return VerifyReport(True, n, len(cps), n - sealed)

    # ---- privacy operations (PIPEDA 4.5, 4.7; GDPR 15, 17) --------------------------------------
    def export(self, subject: str) -> dict:
        """Everything held about a subject: every leaf, and the content still kept."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(leaves_t.c.record_id, leaves_t.c.record)
                                .where(leaves_t.c.subject == subject).order_by(leaves_t.c.idx)).all()
            ids = sorted({r.record_id for r in rows})
            content = {c.record_id: json.loads(c.content) for c in conn.execute(
                select(content_t).where(content_t.c.record_id.in_(ids)))} if ids else {}
        return {"subject": subject, "exported_at": time.time(),
                "records": [json.loads(r.record) for r in rows], "content": content}

    def erase(self, subject: str | None = None, before: float | None = None,
              reason: str = "request", extra: dict | None = None) -> int:
        """Delete the content (not the leaves) of a subject's records, or of records older than
        `before`; the leaves' hashes stay, so `verify` still passes. The erasure is itself logged.
        Returns how many records' content was erased."""
        if subject is None and before is None:
            raise AuditError("erase needs a subject or a cut-off time")
        q = select(leaves_t.c.record_id).distinct()
        if subject is not None:
            q = q.where(leaves_t.c.subject == subject)
        if before is not None:
            q = q.where(leaves_t.c.created_at < before)
        with self._lock, self.engine.begin() as conn:
            ids = [r.record_id for r in conn.execute(q)]
            erased = 0
            for i in range(0, len(ids), 500):
                erased += conn.execute(content_t.delete().where(
                    content_t.c.record_id.in_(ids[i:i + 500]))).rowcount
        if erased or subject is not None or any((extra or {}).values()):
            self.append({"erased_records": erased, "reason": reason,
                         "before": before} | (extra or {}), kind="erasure", subject=subject)
        if erased:
            scrub(self.engine, ("audit_content",))
        return erased

    def add_content(self, record_id: str, extra: dict) -> None:
        """Merge `extra` into a record's erasable content."""
        with self._lock, self.engine.begin() as conn:
            row = conn.execute(select(content_t.c.content)
                               .where(content_t.c.record_id == record_id)).first()
            merged = (json.loads(row.content) if row else {}) | extra
            if row:
                conn.execute(update(content_t).where(content_t.c.record_id == record_id)
                             .values(content=canonical(merged).decode()))
            else:
                conn.execute(insert(content_t).values(record_id=record_id,
                                                      content=canonical(merged).decode()))

    def content_of(self, record_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(content_t.c.content)
                               .where(content_t.c.record_id == record_id)).first()
        return json.loads(row.content) if row else None
