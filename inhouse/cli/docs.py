"""`inhouse docs ...`: the organisation's documents the browser tool searches (per tenant)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from inhouse.cli.common import cli_errors, err, out

docs_app = typer.Typer(help="The document index the browser tool searches (never the web).",
                       no_args_is_help=True)

DbOpt = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy URL of the server "
                                           "database (default: the SQLite file in the cache).")]
TenantOpt = Annotated[str, typer.Option(help="The tenant whose collection this is (a keyless "
                                        "server's tenant is 'local').")]


def _store(database_url: str | None):
    from inhouse.config import cache_root
    from inhouse.governance.responses_store import default_url
    from inhouse.tools.documents import DocumentStore

    return DocumentStore(database_url or default_url(cache_root()))


def _files(paths: list[Path]) -> list[Path]:
    from inhouse.errors import InhouseError

    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            found.append(p)
        else:
            raise InhouseError(f"no such file or folder: {p}")
    return found


@docs_app.command()
@cli_errors
def add(paths: Annotated[list[Path], typer.Argument(help="Files or folders (text, Markdown, "
                                                    "HTML, PDF).")],
        tenant: TenantOpt = "local",
        collection: Annotated[str, typer.Option(help="Collection name.")] = "default",
        database_url: DbOpt = None) -> None:
    """Index documents; a file of the same name in the collection is replaced."""
    from inhouse.tools.extract import ExtractError

    store, files = _store(database_url), _files(paths)
    added = 0
    for f in files:
        try:
            info = store.add(tenant, collection, f.name, f.read_bytes())
        except ExtractError as e:  # one bad file is reported, the rest still indexed
            err.print(f"skipped: {e}", markup=False, soft_wrap=True)
            continue
        added += 1
        out.print(f"{info.id}  {info.num_lines:>6} lines  {f}", markup=False, highlight=False)
    out.print(f"indexed {added} of {len(files)} file(s) into {tenant}/{collection}")
    if added < len(files):
        raise typer.Exit(1)


@docs_app.command("list")
@cli_errors
def list_(tenant: TenantOpt = "local",
          collection: Annotated[str | None, typer.Option(help="Only this collection.")] = None,
          database_url: DbOpt = None) -> None:
    """The indexed documents of a tenant."""
    table = Table("collection", "name", "title", "lines", "sha256")
    table.add_column("id", no_wrap=True)
    for d in _store(database_url).list(tenant, collection):
        table.add_row(d.collection, d.name, d.title, str(d.num_lines), d.sha256[:16], d.id)
    out.print(table)


@docs_app.command()
@cli_errors
def remove(doc_id: Annotated[str, typer.Argument(help="The document's id (see `docs list`).")],
           tenant: TenantOpt = "local", database_url: DbOpt = None) -> None:
    """Remove a document from the index."""
    from inhouse.errors import InhouseError

    if not _store(database_url).remove(tenant, doc_id):
        raise InhouseError(f"no document {doc_id} for tenant {tenant}")
    out.print(f"removed {doc_id}")


@docs_app.command()
@cli_errors
def search(query: Annotated[str, typer.Argument(help="Words to look for.")],
           tenant: TenantOpt = "local", database_url: DbOpt = None) -> None:
    """Search the index as the browser tool does, and print what the model would read."""
    from inhouse.tools.browser import Browser

    out.print(Browser(_store(database_url), tenant).call("search", _json({"query": query})),
              markup=False, highlight=False, soft_wrap=True)


def _json(obj) -> str:
    import json

    return json.dumps(obj)
