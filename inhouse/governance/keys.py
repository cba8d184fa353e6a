"""API keys with roles, stored hashed (sha256); the plaintext is shown once, at creation.

Roles: `user` (the model APIs), `auditor` (also the audit endpoints), `admin` (everything, every
tenant). Each key belongs to a tenant (its own unless `tenant` groups it with others), may be
bound to a subject, and may be allowed to name other subjects (see tenancy.py).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import (Boolean, Column, Float, Integer, MetaData, String, Table, insert, select,
                        update)

from inhouse.errors import InhouseError
from inhouse.governance.database import add_missing_columns, open_database
from inhouse.governance.tenancy import KeyGrant

ROLES = ("user", "auditor", "admin")
RANK = {"user": 0, "auditor": 1, "admin": 2}

metadata = MetaData()
keys_t = Table(
    "api_keys", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("role", String(16), nullable=False),
    Column("key_sha256", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),  # shown in listings: enough to recognise a key
    Column("rate_limit", Integer),  # requests per minute; None: unlimited
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    Column("tenant", String(200)),  # None (keys made before tenants): the key's own id
    Column("subject", String(200)),  # the person this key's requests are about, if bound
    Column("on_behalf", Boolean),  # may name other subjects (X-Subject-Id / user)
)
# columns added after the first release, with their SQL types, for databases made before them
ADDED = {"tenant": "VARCHAR(200)", "subject": "VARCHAR(200)", "on_behalf": "BOOLEAN"}


class KeyError_(InhouseError):
    """A key operation that cannot be done (unknown role, unknown key, ...)."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: str
    prefix: str
    rate_limit: int | None
    created_at: float
    revoked_at: float | None
    tenant: str = ""
    subject: str | None = None
    on_behalf: bool = False

    def allows(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]

    def grant(self) -> KeyGrant:
        return KeyGrant(self.id, self.tenant or self.id, self.subject, self.on_behalf,
                        self.role == "admin")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, url: str) -> None:
        self.engine = open_database(url)
        metadata.create_all(self.engine)
        add_missing_columns(self.engine, "api_keys", ADDED)

    def create(self, name: str, role: str, rate_limit: int | None = None, tenant: str | None = None,
               subject: str | None = None, on_behalf: bool = False) -> tuple[ApiKey, str]:
        """Returns the key record and the plaintext key (shown once, never stored)."""
        if role not in ROLES:
            raise KeyError_(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        if not name.strip():
            raise KeyError_("a key needs a name")
        if rate_limit is not None and rate_limit <= 0:
            raise KeyError_("the rate limit must be a positive number of requests per minute")
        for what, value in (("tenant", tenant), ("subject", subject)):
            if value is not None and (not value.strip() or len(value) > 200):
                raise KeyError_(f"the {what} must be 1 to 200 characters")
        plaintext = "ih-" + secrets.token_urlsafe(32)
        key_id = f"key_{uuid.uuid4().hex[:12]}"
        row = dict(id=key_id, name=name, role=role,
                   key_sha256=digest(plaintext), prefix=plaintext[:10], rate_limit=rate_limit,
                   created_at=time.time(), revoked_at=None, tenant=tenant or key_id,
                   subject=subject, on_behalf=bool(on_behalf))
        with self.engine.begin() as conn:
            conn.execute(insert(keys_t).values(**row))
        return self._key(row), plaintext

    def list(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            return [self._key(r._mapping) for r in conn.execute(select(keys_t)
                                                               .order_by(keys_t.c.created_at))]

    def revoke(self, key_id: str) -> ApiKey:
        with self.engine.begin() as conn:
            n = conn.execute(update(keys_t).where(keys_t.c.id == key_id,
                                                  keys_t.c.revoked_at.is_(None))
                             .values(revoked_at=time.time())).rowcount
        if not n:
            raise KeyError_(f"no active key {key_id}")
        return next(k for k in self.list() if k.id == key_id)

    def any_active(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(keys_t.c.id).where(keys_t.c.revoked_at.is_(None))
                                .limit(1)).first() is not None

    def authenticate(self, plaintext: str) -> ApiKey | None:
        d = digest(plaintext)
        with self.engine.connect() as conn:
            rows = conn.execute(select(keys_t).where(keys_t.c.revoked_at.is_(None))).all()
        for r in rows:  # constant-time comparison of digests
            if hmac.compare_digest(r.key_sha256, d):
                return self._key(r._mapping)
        return None

    @staticmethod
    def _key(r) -> ApiKey:
        return ApiKey(r["id"], r["name"], r["role"], r["prefix"], r["rate_limit"],
                      r["created_at"], r["revoked_at"], r["tenant"] or r["id"], r["subject"],
                      bool(r["on_behalf"]))
