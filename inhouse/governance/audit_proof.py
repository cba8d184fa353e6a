"""Proofs a third party checks offline, with no database: a record's leaves, their RFC 6962
inclusion proofs, and the signed checkpoint they are included in (as Sigstore's Rekor hands a
client an inclusion proof against a signed tree head).

    inhouse audit prove ID --out proof.json [--with-content]
    inhouse audit check-proof proof.json --public-key audit.pub

The proof says: these records (model digest, parameters, token counts, hashes of the prompt and
output ids) are in the log at these positions, and the log's owner signed a tree head that
contains them at time T. With the content (and its salt), it also proves the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from inhouse.errors import InhouseError
from inhouse.governance import merkle
from inhouse.governance.audit_verify import commitment, is_signed, key_id, rotation_key

FORMAT = "inhouse-audit-proof/1"


class ProofError(InhouseError):
    """A proof cannot be made (no such record, not yet sealed) or is not valid."""


def make_proof(log, record_id: str, with_content: bool = False) -> dict:
    """The proof of one record against the first checkpoint that covers all its leaves (the
    newest one if the log has been sealed since)."""
    from inhouse.governance.audit_log import checkpoints_t, contents_t, leaves_t

    with log.engine.connect() as conn:
        mine = conn.execute(select(leaves_t.c.idx, leaves_t.c.record)
                            .where(leaves_t.c.record_id == record_id)
                            .order_by(leaves_t.c.idx)).all()
        if not mine:
            raise ProofError(f"no audit record {record_id}")
        last = mine[-1].idx
        cp = conn.execute(select(checkpoints_t).where(checkpoints_t.c.tree_size > last)
                          .order_by(checkpoints_t.c.tree_size.desc())).first()
        if cp is None:
            raise ProofError(f"record {record_id} is not sealed by a checkpoint yet; wait for "
                             "the next one (at most the seal interval)")
        hashes = [bytes.fromhex(h) for (h,) in conn.execute(
            select(leaves_t.c.leaf_hash).where(leaves_t.c.idx < cp.tree_size)
            .order_by(leaves_t.c.idx))]
        chain = []  # key rotations before this checkpoint, each with the checkpoint that sealed it
        for r in conn.execute(select(leaves_t.c.idx, leaves_t.c.record)
                              .where(leaves_t.c.kind == "key-rotation",
                                     leaves_t.c.idx < cp.tree_size).order_by(leaves_t.c.idx)):
            seal = conn.execute(select(checkpoints_t).where(checkpoints_t.c.tree_size > r.idx)
                                .order_by(checkpoints_t.c.tree_size)).first()
            chain.append({"index": r.idx, "record": r.record,
                          "inclusion": [h.hex() for h in merkle.inclusion_proof(
                              hashes[:seal.tree_size], r.idx)],
                          "checkpoint": _cp(seal)})
        content = {}
        if with_content:
            content = {str(r.idx): {"salt": r.salt, "content": r.content} for r in conn.execute(
                select(contents_t).where(contents_t.c.idx.in_([m.idx for m in mine])))}
    proof = {
        "format": FORMAT, "record_id": record_id,
        "leaves": [{"index": m.idx, "record": m.record,
                    "inclusion": [h.hex() for h in merkle.inclusion_proof(hashes, m.idx)]}
                   for m in mine],
        "checkpoint": _cp(cp),
        "key_chain": chain,
    }
    if with_content:
        proof["content"] = content
    return proof


def _cp(cp) -> dict:
    return {"tree_size": cp.tree_size, "root": cp.root, "signed_at": cp.signed_at,
            "signature": cp.signature, "key_id": cp.key_id}


@dataclass(frozen=True)
class ProofReport:
    record_id: str
    records: list[dict]  # the proven leaves' records
    tree_size: int
    signed_at: float
    key_id: str
    content_proven: list[int]  # leaf indexes whose content the proof also proves


def _follow_chain(chain: list[dict], pinned: Ed25519PublicKey) -> Ed25519PublicKey:
    """The key the log signs with after the rotations in `chain` that start from the pinned
    key: each rotation leaf must be included in a checkpoint signed by the key before it."""
    current = pinned
    for link in chain:
        lcp = link["checkpoint"]
        if lcp["key_id"] != key_id(current):
            continue  # a rotation before the key the auditor pinned
        size, root = int(lcp["tree_size"]), str(lcp["root"])
        if not is_signed(current, size, root, float(lcp["signed_at"]), str(lcp["signature"])):
            raise ProofError(f"the rotation checkpoint at size {size} has a bad signature")
        raw = str(link["record"])
        if not merkle.verify_inclusion(merkle.leaf_hash(raw.encode()), int(link["index"]), size,
                                       [bytes.fromhex(h) for h in link["inclusion"]],
                                       bytes.fromhex(root)):
            raise ProofError(f"the key rotation at {link['index']} is not in its checkpoint")
        body = json.loads(raw)
        nxt = rotation_key(body) if body.get("kind") == "key-rotation" else None
        if nxt is None or body.get("index") != int(link["index"]):
            raise ProofError(f"record {link['index']} is not a valid key rotation")
        current = nxt
    return current


def check_proof(proof: dict, public_key: Ed25519PublicKey) -> ProofReport:
    """Raise ProofError naming what fails; else what the proof establishes."""
    try:
        if proof.get("format") != FORMAT:
            raise ProofError(f"not an inhouse audit proof (format {proof.get('format')!r})")
        cp = proof["checkpoint"]
        size, root = int(cp["tree_size"]), str(cp["root"])
        signer = _follow_chain(proof.get("key_chain") or [], public_key)
        if cp.get("key_id") != key_id(signer):
            raise ProofError(f"the checkpoint names key {cp.get('key_id')}, not the pinned key "
                             f"{key_id(public_key)} (nor one it rotated to)")
        if not is_signed(signer, size, root, float(cp["signed_at"]), str(cp["signature"])):
            raise ProofError(f"the checkpoint at size {size} is not signed by the pinned key")
        records = []
        for leaf in proof["leaves"]:
            index, raw = int(leaf["index"]), str(leaf["record"])
            body = json.loads(raw)
            if body.get("index") != index or body.get("record_id") != proof["record_id"]:
                raise ProofError(f"leaf {index} is not record {proof['record_id']} at {index}")
            ok = merkle.verify_inclusion(merkle.leaf_hash(raw.encode()), index, size,
                                         [bytes.fromhex(h) for h in leaf["inclusion"]],
                                         bytes.fromhex(root))
            if not ok:
                raise ProofError(f"leaf {index} is not included in the signed tree of size {size}")
            records.append(body)
        proven = []
        for index, c in (proof.get("content") or {}).items():
            body = next((r for r in records if r["index"] == int(index)), None)
            if body is None or commitment(c["salt"], c["content"]) != body.get("content_sha256"):
                raise ProofError(f"the content of leaf {index} is not what its record committed")
            proven.append(int(index))
    except (KeyError, TypeError, ValueError) as e:
        raise ProofError(f"the proof is malformed ({type(e).__name__}: {e})") from None
    if not records:
        raise ProofError("the proof holds no records")
    return ProofReport(proof["record_id"], records, size, float(cp["signed_at"]), cp["key_id"],
                       sorted(proven))
