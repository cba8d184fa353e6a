"""Per-key rate limits counted in the keys' database, so that every API process on that database
(several heads of a Ray Serve deployment, a restarted server) counts the same requests.

A sliding minute: a request is let through while the key has fewer than `per_minute` requests
in the last 60 s. One transaction a request: its hit is written first (on SQLite that takes the
write lock, which serialises the count), the key's row is locked on PostgreSQL (FOR UPDATE), then
the window is counted; a refused request takes its hit back.
"""

from __future__ import annotations

import time

from sqlalchemy import (Column, Float, Index, Integer, MetaData, String, Table, delete, func,
                        insert, select)

from inhouse.governance.keys import keys_t, metadata as keys_metadata

WINDOW_S = 60.0

metadata = MetaData()
hits_t = Table(
    "rate_hits", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(32), nullable=False),
    Column("at", Float, nullable=False),  # wall-clock time: shared by every process
    Index("rate_hits_key_at", "key_id", "at"),
)


class SharedRateLimiter:
    def __init__(self, engine) -> None:
        self.engine = engine
        metadata.create_all(engine)
        keys_metadata.create_all(engine)  # the row lock needs the keys table (it exists by now)

    def hit(self, key_id: str, per_minute: int) -> int:
        """Record a request; 0 if allowed, else the whole seconds to wait before the next."""
        now = time.time()
        with self.engine.begin() as conn:
            mine = conn.execute(insert(hits_t).values(key_id=key_id, at=now)).inserted_primary_key[0]
            # PostgreSQL: one counter at a time per key (SQLite: the insert holds the write lock)
            conn.execute(select(keys_t.c.id).where(keys_t.c.id == key_id).with_for_update())
            conn.execute(delete(hits_t).where(hits_t.c.key_id == key_id,
                                              hits_t.c.at <= now - WINDOW_S))
            count, oldest = conn.execute(
                select(func.count(), func.min(hits_t.c.at)).where(hits_t.c.key_id == key_id,
                                                                  hits_t.c.id != mine)).one()
            if count < per_minute:
                return 0
            conn.execute(delete(hits_t).where(hits_t.c.id == mine))
        return max(1, int(WINDOW_S - (now - oldest)) + 1)
