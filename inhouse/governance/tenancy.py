"""Who is asking: an API key resolved to the tenant that owns what it stores and the subject its
requests are about (docs/tenancy.md).

- Every stored object belongs to a tenant. A key's tenant is the one it was created with
  (`keys create --tenant T`), else the key alone. Another tenant's objects do not exist for a
  caller (404, never 403); admin keys see every tenant.
- The subject (the person a request is about: audit records, export, erasure) is the key's bound
  subject (`--subject S`). `X-Subject-Id` or the body's `user` may name another subject only for
  keys allowed to speak for others (`--on-behalf`, and admin keys); any other key naming one is
  refused, so nobody can file records under someone else or hide their own.
- A server with no keys at all (loopback only, see `serve`) has one caller: the tenant `local`,
  speaking for whoever it names.
"""

from __future__ import annotations

from dataclasses import dataclass

from inhouse.errors import RequestError

LOCAL_TENANT = "local"


@dataclass(frozen=True)
class Caller:
    key_id: str | None  # None: the server has no keys
    tenant: str
    subject: str | None
    sees_all_tenants: bool = False

    def owns(self, tenant: str | None) -> bool:
        return self.sees_all_tenants or tenant == self.tenant


@dataclass(frozen=True)
class KeyGrant:
    """What a key may do as a caller (read from the key store or a static `--api-key`)."""

    key_id: str
    tenant: str
    subject: str | None
    may_speak_for_others: bool
    is_admin: bool


def resolve_caller(grant: KeyGrant | None, claimed: str | None,
                   claimed_param: str = "user") -> Caller:
    """The caller of one request; `claimed` is the subject the request names (header or body)."""
    claimed = claimed or None
    if grant is None:
        return Caller(None, LOCAL_TENANT, claimed, sees_all_tenants=False)
    subject = grant.subject
    if claimed is not None and claimed != grant.subject:
        if not (grant.may_speak_for_others or grant.is_admin):
            raise RequestError(f"key {grant.key_id} may not name a subject other than its own; "
                               "create a key bound to the subject (`inhouse keys create --subject "
                               "S`) or one allowed to speak for others (`--on-behalf`)",
                               param=claimed_param, status=403, code="subject_not_allowed",
                               kind="permission_error")
        subject = claimed
    return Caller(grant.key_id, grant.tenant, subject, sees_all_tenants=grant.is_admin)
