"""`inhouse keys ...`: create, list and revoke API keys (stored hashed; shown once)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from inhouse.cli.common import cli_errors, out

keys_app = typer.Typer(help="API keys with roles (user, auditor, admin).", no_args_is_help=True)

DbOpt = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy URL of the server "
                                           "database (default: the SQLite file in the cache).")]


def _store(database_url: str | None):
    from inhouse.config import cache_root
    from inhouse.governance.keys import KeyStore
    from inhouse.governance.responses_store import default_url

    return KeyStore(database_url or default_url(cache_root()))


@keys_app.command()
@cli_errors
def create(name: Annotated[str, typer.Option(help="Who or what the key is for.")],
           role: Annotated[str, typer.Option(help="user, auditor or admin.")] = "user",
           rate_limit: Annotated[int | None, typer.Option(help="Requests per minute (default: none).")] = None,
           tenant: Annotated[str | None, typer.Option(
               help="The tenant whose stored objects the key shares (default: its own).")] = None,
           subject: Annotated[str | None, typer.Option(
               help="Bind the key to this subject: its requests are about this person.")] = None,
           on_behalf: Annotated[bool, typer.Option(
               "--on-behalf", help="Allow X-Subject-Id / user to name other subjects.")] = False,
           database_url: DbOpt = None) -> None:
    """Create a key. It is printed once: store it now; only its hash is kept."""
    key, plaintext = _store(database_url).create(name, role, rate_limit, tenant, subject, on_behalf)
    out.print(f"created {key.id} ({key.role}, tenant {key.tenant}"
              f"{', subject ' + key.subject if key.subject else ''}"
              f"{', speaks for others' if key.on_behalf else ''}) for {key.name!r}. "
              "The key, shown only now:")
    out.print(plaintext, markup=False, highlight=False)


@keys_app.command("list")
@cli_errors
def list_keys(database_url: DbOpt = None) -> None:
    """List keys: id, name, role, prefix, rate limit, created, revoked."""
    t = Table()
    t.add_column("id", no_wrap=True)  # ids must stay copyable
    t.add_column("prefix", no_wrap=True)
    for name in ("name", "role", "tenant", "subject", "per minute", "created", "revoked"):
        t.add_column(name)
    fmt = lambda ts: time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""  # noqa: E731
    for k in _store(database_url).list():
        subject = (k.subject or "") + (" (+others)" if k.on_behalf else "")
        t.add_row(k.id, k.prefix + "...", k.name, k.role, k.tenant, subject, str(k.rate_limit or ""),
                  fmt(k.created_at), fmt(k.revoked_at))
    out.print(t)


@keys_app.command()
@cli_errors
def revoke(key_id: Annotated[str, typer.Argument(help="The key id (key_...).")],
           database_url: DbOpt = None) -> None:
    """Revoke a key: requests with it are refused from now on."""
    key = _store(database_url).revoke(key_id)
    out.print(f"revoked {key.id} ({key.name})")
