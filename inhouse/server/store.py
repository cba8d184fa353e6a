"""Stored Responses (`store: true`), for `previous_response_id` and GET/DELETE /v1/responses/{id}.

SQLAlchemy Core over any URL; a SQLite file in the cache by default. Each row keeps the full
input history (earlier responses' items expanded) and the response object, as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sqlalchemy import (Column, Float, MetaData, String, Table, Text, create_engine, delete,
                        event, insert, select)

metadata = MetaData()
responses = Table(
    "responses", metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("model", String(200), nullable=False),
    Column("input_items", Text, nullable=False),  # JSON list: the whole conversation so far
    Column("response", Text, nullable=False),  # JSON: the response object
)


def default_url(cache_root: Path) -> str:
    """The server's own SQLite file: stored responses and API keys."""
    cache_root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{cache_root / 'server.db'}"


class ResponseStore:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _):  # concurrent readers and one writer, safely
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA busy_timeout=5000")
        metadata.create_all(self.engine)

    def save(self, response: dict, input_items: list[dict]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(responses).values(
                id=response["id"], created_at=time.time(), model=response["model"],
                input_items=json.dumps(input_items, ensure_ascii=False),
                response=json.dumps(response, ensure_ascii=False)))

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(responses.c.response, responses.c.input_items)
                               .where(responses.c.id == response_id)).first()
        if row is None:
            return None
        return json.loads(row.response), json.loads(row.input_items)

    def delete(self, response_id: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(delete(responses).where(responses.c.id == response_id)).rowcount > 0
