"""Verification of the audit log: every byte of every table is either inside a signed leaf or
checked against one (docs/audit.md has the threat model).

- leaves: indexes 0..n-1, each record's hash, and the denormalised columns (record_id, kind,
  subject, created_at) equal to the values inside the hashed record;
- content: each row is committed by a salted sha256 inside its leaf (`content_sha256`); a row
  that does not match, belongs to no committing leaf, or is missing without a later erasure leaf
  that covers it, is tampering;
- head: the stored size equals the number of leaves;
- checkpoints: signed by the pinned key (its `key_id` too), or by a key a `key-rotation` leaf
  named and a checkpoint of the key before it sealed; roots of the leaves;
- witnessed checkpoints (kept elsewhere, see witness.py): each must be in the database, its root
  must be the root of the leaves the database holds now, and the database's head must be a
  consistent extension of it: rollback, truncation, forks and deleted checkpoints are caught even
  by someone who holds the signing key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from inhouse.governance import merkle


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    num_records: int
    num_checkpoints: int
    unsealed: int  # records after the last checkpoint
    first_bad_index: int | None = None
    problem: str | None = None
    num_witnessed: int = 0  # witnessed checkpoints checked
    legacy_content: int = 0  # content rows written before commitments: not verifiable


def checkpoint_message(size: int, root_hex: str, signed_at: float, version: int = 2) -> bytes:
    """What a checkpoint signs. Version 2 (since leaf signatures) also says: every record after
    this one is signed by itself until the next checkpoint; version 1 checkpoints are older."""
    tag = "inhouse-audit-checkpoint/2" if version == 2 else "inhouse-audit-checkpoint"
    return f"{tag}\n{size}\n{root_hex}\n{signed_at:.6f}".encode()


def leaf_message(leaf_hash_hex: str) -> bytes:
    """What a record's own signature signs, until a checkpoint seals it (then it is cleared)."""
    return f"inhouse-audit-leaf\n{leaf_hash_hex}".encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def commitment(salt_hex: str, content_json: str) -> str:
    """The salted hash a leaf holds of its erasable content (the salt is erased with it, so the
    hash alone says nothing about short contents)."""
    return hashlib.sha256(bytes.fromhex(salt_hex) + content_json.encode()).hexdigest()


@dataclass(frozen=True)
class Leaf:
    idx: int
    record_id: str
    kind: str
    subject: str | None
    created_at: float
    record: str
    leaf_hash: str
    signature: str | None = None  # the record's own signature while unsealed (then cleared)


@dataclass(frozen=True)
class Content:
    idx: int
    record_id: str
    salt: str
    content: str


def leaf_problem(expected: int, row: Leaf) -> tuple[str | None, dict | None]:
    """What is wrong with one stored leaf on its own (None: nothing), and its parsed record."""
    if row.idx != expected:
        return f"record {expected} is missing (the next stored index is {row.idx})", None
    try:
        body = json.loads(row.record)
    except ValueError:
        return f"record {expected} is not valid JSON", None
    if not isinstance(body, dict) or body.get("index") != expected:
        return f"record {expected} claims index {body.get('index') if isinstance(body, dict) else '?'}", None
    if merkle.leaf_hash(row.record.encode()).hex() != row.leaf_hash:
        return f"record {expected} does not match its leaf hash (modified)", body
    for column in ("record_id", "kind", "subject", "created_at"):
        if body.get(column) != getattr(row, column):
            return (f"record {expected}: the {column} column says {getattr(row, column)!r}, the "
                    f"signed record {body.get(column)!r}"), body
    return None, body


def erasure_covers(erasure: dict, leaf: dict) -> bool:
    """Does a (later) erasure leaf cover this leaf's content? Its criteria are signed."""
    if erasure["index"] <= leaf["index"]:
        return False
    if erasure.get("subject") is not None and erasure["subject"] != leaf.get("subject"):
        return False
    before = erasure.get("before")
    return before is None or leaf["created_at"] < before


def content_problem(body: dict, row: Content | None, erasures: list[dict]) -> str | None:
    """What is wrong with one leaf's content row (or its absence); None: nothing."""
    idx, committed = body["index"], body.get("content_sha256")
    if row is not None:
        if committed is None:
            return f"record {idx} committed to no content, yet content is stored (inserted)"
        if row.record_id != body["record_id"]:
            return f"content of record {idx} is filed under another record id (moved)"
        if commitment(row.salt, row.content) != committed:
            return f"content of record {idx} differs from what its record committed (modified)"
        return None
    if committed and not any(erasure_covers(e, body) for e in erasures):
        return f"content of record {idx} is missing, and no erasure covers it (deleted)"
    return None


def content_problems(bodies: list[dict], contents: dict[int, Content]) -> Iterator[tuple[int, str]]:
    """(leaf index, problem) for every content row that is not exactly what its leaf committed
    to, and for every committed content missing without an erasure that covers it."""
    n = len(bodies)
    for idx in contents:
        if not 0 <= idx < n:
            yield n, f"content row {idx} belongs to no record (inserted)"
    erasures = [b for b in bodies if b.get("kind") == "erasure"]
    for b in bodies:
        problem = content_problem(b, contents.get(b["index"]), erasures)
        if problem:
            yield b["index"], problem


def verify_rows(rows: list[Leaf], contents: dict[int, Content], cps: list, head_size: int | None,
                public_key: Ed25519PublicKey, witnessed: list[dict] | None = None,
                legacy_content: int = 0) -> VerifyReport:
    n = len(rows)

    def fail(index: int | None, problem: str) -> VerifyReport:
        return VerifyReport(False, n, len(cps), 0, index, problem, len(witnessed or ()),
                            legacy_content)

    hashes: list[bytes] = []
    bodies: list[dict] = []
    for expected, row in enumerate(rows):
        problem, body = leaf_problem(expected, row)
        if problem:
            return fail(expected, problem)
        hashes.append(bytes.fromhex(row.leaf_hash))
        bodies.append(body)
    found: list[tuple[int, str]] = []  # every problem; the earliest record is reported
    if head_size != n:
        found.append((min(head_size or 0, n), f"the head says {head_size} records, the log "
                                              f"holds {n}"))
    found += content_problems(bodies, contents)
    roots = merkle.roots_at(hashes, [cp.tree_size for cp in cps]
                            + [int(w.get("tree_size", 0) or 0) for w in witnessed or ()
                               if str(w.get("tree_size", "")).isdigit()] + [n])
    rotations = [b for b in bodies if b.get("kind") == "key-rotation"]
    problem, chain = check_checkpoints(cps, n, roots, public_key, rotations)
    if problem is None:
        problem = check_witnessed(witnessed or [], hashes, roots, cps, chain.trusted)
    if problem is None:
        problem = check_leaf_signatures(rows, cps[-1].tree_size if cps else 0, chain)
    if problem is not None:
        found.append(problem)
    if found:
        return fail(*min(found))
    sealed = cps[-1].tree_size if cps else 0
    return VerifyReport(True, n, len(cps), n - sealed, None, None, len(witnessed or ()),
                        legacy_content)


@dataclass
class Chain:
    """The chain of trust as the checkpoints walk it: every key reached (key id -> key), the
    current one, and the format of the last checkpoint."""

    trusted: dict[str, Ed25519PublicKey]
    current: str
    last_version: int = 2


def check_checkpoints(cps: list, n: int, roots: dict[int, bytes], public_key: Ed25519PublicKey,
                      rotations: list[dict]) -> tuple[tuple[int, str] | None, Chain]:
    """(first problem or None, the chain of trust). Checkpoints are signed by the current key:
    the pinned one, until a checkpoint it signed seals a `key-rotation` leaf naming the next."""
    current = key_id(public_key)
    trusted = {current: public_key}
    chain = Chain(trusted, current)
    pending = sorted(rotations, key=lambda b: b["index"])
    previous = 0
    for cp in cps:
        if cp.key_id != current:
            return (previous, f"checkpoint at size {cp.tree_size} names key {cp.key_id}, not "
                              f"the pinned key {current} (or one a sealed rotation named)"), chain
        version = signed_version(trusted[current], cp.tree_size, cp.root, cp.signed_at,
                                 cp.signature)
        if not version:
            return (previous, f"checkpoint at size {cp.tree_size} has a bad signature"), chain
        chain.last_version = version
        if cp.tree_size > n:  # the interval lost records: somewhere from `previous` on
            return (previous, f"records {previous}..{cp.tree_size - 1}: the checkpoint at size "
                              f"{cp.tree_size} covers records that are gone (only {n} remain)"), chain
        # NOTE: every root is recomputed from the same leaves, so each checkpoint is an
        # extension of the one before by construction; the consistency proof an offline client
        # needs is checked from the last witnessed head (check_witnessed)
        if roots[cp.tree_size].hex() != cp.root:
            return (previous, f"records {previous}..{cp.tree_size - 1} do not match the "
                              f"checkpoint signed at size {cp.tree_size} (changed, inserted, "
                              "deleted or reordered)"), chain
        while pending and pending[0]["index"] < cp.tree_size:  # sealed by the current key
            rotation = pending.pop(0)
            nxt = rotation_key(rotation)
            if nxt is None:
                return (rotation["index"], f"record {rotation['index']} rotates to a key that "
                                           "is not an Ed25519 public key"), chain
            current = key_id(nxt)
            trusted[current] = nxt
            chain.current = current
        previous = cp.tree_size
    return None, chain


def check_leaf_signatures(rows: list[Leaf], sealed: int, chain: Chain) -> tuple[int, str] | None:
    """Sealed records carry no signature of their own (the checkpoint replaced it); each record
    after the last checkpoint must be signed by the current key, so that nobody without it can
    add records the next checkpoint would seal. After a version-1 checkpoint (a log older than
    leaf signatures) the tail is not signed."""
    for row in rows[:sealed]:
        if row.signature is not None:
            return row.idx, f"record {row.idx} is sealed yet carries a record signature (edited)"
    if chain.last_version < 2:
        return None
    for row in rows[sealed:]:
        if not leaf_signed(chain.trusted[chain.current], row):
            return row.idx, (f"record {row.idx} is not yet sealed and not signed by the log's key "
                             "(written behind the log's back)")
    return None


def rotation_key(body: dict) -> Ed25519PublicKey | None:
    """The next key a `key-rotation` record names, if it is one and matches its key id."""
    try:
        key = serialization.load_pem_public_key(str(body["next_public_key"]).encode())
    except (KeyError, ValueError):
        return None
    if not isinstance(key, Ed25519PublicKey) or key_id(key) != body.get("next_key_id"):
        return None
    return key


def check_witnessed(witnessed: list[dict], hashes: list[bytes], roots: dict[int, bytes],
                    cps: list, trusted: dict[str, Ed25519PublicKey]) -> tuple[int, str] | None:
    """The database against checkpoints kept elsewhere; (index, problem) or None."""
    n = len(hashes)
    in_db = {cp.tree_size: cp for cp in cps}
    last = None
    for w in witnessed:
        try:
            size, root, signed_at, sig = (int(w["tree_size"]), str(w["root"]),
                                          float(w["signed_at"]), str(w["signature"]))
        except (KeyError, TypeError, ValueError):
            return 0, f"a witnessed line is not a checkpoint: {str(w)[:80]}"
        key = trusted.get(w.get("key_id"))
        if key is None or not is_signed(key, size, root, signed_at, sig):
            return 0, f"the witnessed checkpoint at size {size} is not signed by the pinned key"
        if size > n:
            return n, (f"the log holds {n} records, fewer than the {size} witnessed (truncated "
                       "or rolled back)")
        if roots[size].hex() != root:
            return 0, (f"records 0..{size - 1} are not what was witnessed at size {size} "
                       "(rewritten, rolled back or forked)")
        if size not in in_db or in_db[size].root != root or in_db[size].signature != sig:
            return size, f"the witnessed checkpoint at size {size} is missing from the database"
        last = (size, root) if last is None or size > last[0] else last
    if last is not None and not _consistent(hashes, last[0], last[1], n, roots[n].hex()):
        return last[0], f"the log's head is not an extension of the witnessed size {last[0]}"
    return None


def signed_version(public_key: Ed25519PublicKey, size: int, root: str, signed_at: float,
                   signature: str) -> int:
    """2 or 1: the checkpoint format the signature is valid for; 0: not valid."""
    for version in (2, 1):
        try:
            public_key.verify(bytes.fromhex(signature),
                              checkpoint_message(size, root, signed_at, version))
            return version
        except (InvalidSignature, ValueError):
            continue
    return 0


def is_signed(public_key: Ed25519PublicKey, size: int, root: str, signed_at: float,
              signature: str) -> bool:
    return signed_version(public_key, size, root, signed_at, signature) > 0


def leaf_signed(public_key: Ed25519PublicKey, row: Leaf) -> bool:
    try:
        public_key.verify(bytes.fromhex(row.signature or ""), leaf_message(row.leaf_hash))
        return True
    except (InvalidSignature, ValueError):
        return False


def _consistent(hashes: list[bytes], old_size: int, old_root: str, new_size: int,
                new_root: str) -> bool:
    """An RFC 6962 consistency proof from the old tree head to the new, built from the leaves
    and checked as a client without them would check it."""
    proof = merkle.consistency_proof(hashes[:new_size], old_size)
    return merkle.verify_consistency(old_size, new_size, bytes.fromhex(old_root),
                                     bytes.fromhex(new_root), proof)
