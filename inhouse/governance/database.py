"""Opening the databases that hold personal data (audit log, stored responses, API keys), so
that what is erased is gone from the files too and nobody else on the machine can read them.

SQLite: the file (and its -wal/-shm, which SQLite creates with the database's mode) is 0600 in a
0700 folder; `secure_delete` overwrites deleted rows' bytes, and `scrub` checkpoints the WAL and
truncates it after an erasure, so erased text survives in neither free pages nor the WAL.
PostgreSQL keeps deleted tuples until VACUUM and in its WAL until recycled: `scrub` runs VACUUM
on the tables named; the WAL, archives and backups are the operator's (docs/privacy.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, delete, event, inspect, text
from sqlalchemy.engine import make_url


def private_dir(path: Path) -> Path:
    """Create a folder (and its missing parents) readable by the owner alone. An existing folder
    is tightened only where it is ours and not shared: a database file named in /tmp must not
    take /tmp (sticky, everyone's) away from everyone else."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(path)
    if st.st_uid == os.geteuid() and not st.st_mode & 0o1000:
        os.chmod(path, 0o700)
    return path


def sqlite_path(url: str) -> Path | None:
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def open_database(url: str, *, manual_begin: bool = False, busy_ms: int = 10000) -> Engine:
    """An engine for `url`; SQLite files are made private and use WAL with secure_delete.
    `manual_begin`: SQLite transactions start with BEGIN IMMEDIATE (writers serialise)."""
    path = sqlite_path(url)
    if path is not None:
        private_dir(path.parent)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        for suffix in ("", "-wal", "-shm"):  # older files may have been made 0644
            p = path.with_name(path.name + suffix)
            if p.exists():
                os.chmod(p, 0o600)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite(dbapi_conn, _):
            if manual_begin:
                dbapi_conn.isolation_level = None  # we issue BEGIN IMMEDIATE ourselves
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute(f"PRAGMA busy_timeout={busy_ms}")
            dbapi_conn.execute("PRAGMA secure_delete=ON")

        if manual_begin:
            @event.listens_for(engine, "begin")
            def _begin(conn):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


def add_missing_columns(engine: Engine, table: str, columns: dict[str, str]) -> None:
    """Columns added to a table after its first release ({name: SQL type}), for databases made
    before them (`create_all` never alters an existing table)."""
    have = {c["name"] for c in inspect(engine).get_columns(table)}
    with engine.begin() as conn:
        for name, sql_type in columns.items():
            if name not in have:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))


def scrub(engine: Engine, tables: tuple[str, ...]) -> None:
    """After an erasure: push deleted bytes out of the WAL (SQLite) or the heap (PostgreSQL)."""
    if engine.dialect.name == "sqlite":
        raw = engine.raw_connection()  # outside any transaction: a checkpoint cannot run in one
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            raw.close()
    elif engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for t in tables:
                conn.execute(text(f'VACUUM "{t}"'))


def erase_rows(engine: Engine, table, time_column, subject: str | None = None,
               before: float | None = None) -> int:
    """Delete a subject's rows of `table`, or those whose `time_column` is older than `before`
    (both: the subject's old ones), then scrub the deleted bytes; returns how many."""
    q = delete(table)
    if subject is not None:
        q = q.where(table.c.subject == subject)
    if before is not None:
        q = q.where(time_column < before)
    with engine.begin() as conn:
        n = conn.execute(q).rowcount
    if n:
        scrub(engine, (table.name,))
    return n
