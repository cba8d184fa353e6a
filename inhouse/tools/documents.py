"""The organisation's document index: full-text search over its own documents, in collections
per tenant, in our database. SQLite (the default) searches with FTS5 (porter stemming, bm25
ranking); PostgreSQL with its own full text (a generated tsvector, a GIN index, ts_rank).

Documents are stored as display lines (wrapped at 80 characters, `extract.wrap_lines`) and
indexed in chunks of `CHUNK_LINES` lines, so that a hit names the lines the browser shows and a
citation points at. Every read filters by tenant: another tenant's documents do not exist.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, Text, delete, insert,
                        select, text)

from inhouse.errors import InhouseError
from inhouse.governance.database import open_database
from inhouse.tools.extract import extract_text, wrap_lines

CHUNK_LINES = 12
MAX_DOCUMENT_BYTES = 64 << 20
_WORD = re.compile(r"\w+", re.UNICODE)

metadata = MetaData()
documents = Table(
    "documents", metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant", String(200), nullable=False, index=True),
    Column("collection", String(200), nullable=False),
    Column("name", String(500), nullable=False),
    Column("title", String(500), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("num_lines", Integer, nullable=False),
    Column("body", Text, nullable=False),  # display lines joined by "\n"
)
chunks = Table(
    "document_chunks", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("document_id", String(40), nullable=False, index=True),
    Column("tenant", String(200), nullable=False, index=True),
    Column("collection", String(200), nullable=False),
    Column("line_start", Integer, nullable=False),
    Column("line_end", Integer, nullable=False),  # inclusive
    Column("body", Text, nullable=False),
)


class DocumentError(InhouseError):
    pass


@dataclass(frozen=True)
class DocumentInfo:
    id: str
    tenant: str
    collection: str
    name: str
    title: str
    sha256: str
    num_lines: int
    created_at: float


@dataclass(frozen=True)
class Document:
    info: DocumentInfo
    lines: list[str]


@dataclass(frozen=True)
class SearchHit:
    info: DocumentInfo
    line_start: int
    line_end: int
    snippet: str
    score: float


def _neutralise(text: str) -> str:
    """A document cannot write citation marks of its own (the browser's 【 】 brackets)."""
    return text.replace("【", "〖").replace("】", "〗")


def _info(row) -> DocumentInfo:
    return DocumentInfo(row.id, row.tenant, row.collection, row.name, row.title, row.sha256,
                        row.num_lines, row.created_at)


class DocumentStore:
    def __init__(self, url: str) -> None:
        self.engine = open_database(url, busy_ms=5000)
        self.dialect = self.engine.dialect.name
        metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            if self.dialect == "sqlite":
                conn.exec_driver_sql("CREATE VIRTUAL TABLE IF NOT EXISTS document_chunks_fts "
                                     "USING fts5(body, tokenize='porter unicode61')")
            elif self.dialect == "postgresql":
                conn.exec_driver_sql(
                    "ALTER TABLE document_chunks ADD COLUMN IF NOT EXISTS tsv tsvector "
                    "GENERATED ALWAYS AS (to_tsvector('english', body)) STORED")
                conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS document_chunks_tsv "
                                     "ON document_chunks USING gin (tsv)")
            else:
                raise DocumentError(f"the document index needs SQLite or PostgreSQL, not "
                                    f"{self.dialect}")

    # ---- writing --------------------------------------------------------------------------------
    def add(self, tenant: str, collection: str, name: str, data: bytes,
            doc_id: str | None = None) -> DocumentInfo:
        """Index one document; a document of the same name in the collection is replaced.
        `doc_id`: a fixed id (the demo's sample documents), else a random one."""
        if len(data) > MAX_DOCUMENT_BYTES:
            raise DocumentError(f"{name}: larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
        title, body = extract_text(name, data)
        lines = wrap_lines(_neutralise(body))
        while lines and not lines[-1].strip():
            lines.pop()
        if not any(line.strip() for line in lines):
            raise DocumentError(f"{name}: no text to index")
        digest = hashlib.sha256(data).hexdigest()
        info = DocumentInfo(doc_id or f"doc_{secrets.token_hex(12)}", tenant, collection, name,
                            _neutralise(title)[:500], digest, len(lines), time.time())
        with self.engine.begin() as conn:
            old = conn.execute(select(documents.c.id).where(
                (documents.c.tenant == tenant) & (documents.c.collection == collection)
                & (documents.c.name == name))).scalars().all()
            for doc_id in old:
                self._delete(conn, doc_id)
            conn.execute(insert(documents).values(
                id=info.id, tenant=tenant, collection=collection, name=name, title=info.title,
                sha256=digest, created_at=info.created_at, num_lines=len(lines),
                body="\n".join(lines)))
            for start in range(0, len(lines), CHUNK_LINES):
                part = "\n".join(lines[start:start + CHUNK_LINES])
                if not part.strip():
                    continue
                row_id = conn.execute(insert(chunks).values(
                    document_id=info.id, tenant=tenant, collection=collection, line_start=start,
                    line_end=min(start + CHUNK_LINES, len(lines)) - 1, body=part)
                ).inserted_primary_key[0]
                if self.dialect == "sqlite":
                    conn.execute(text("INSERT INTO document_chunks_fts(rowid, body) "
                                      "VALUES (:id, :body)"), {"id": row_id, "body": part})
        return info

    def _delete(self, conn, doc_id: str) -> None:
        if self.dialect == "sqlite":
            conn.execute(text("DELETE FROM document_chunks_fts WHERE rowid IN "
                              "(SELECT id FROM document_chunks WHERE document_id = :d)"),
                         {"d": doc_id})
        conn.execute(delete(chunks).where(chunks.c.document_id == doc_id))
        conn.execute(delete(documents).where(documents.c.id == doc_id))

    def remove(self, tenant: str, doc_id: str) -> bool:
        with self.engine.begin() as conn:
            found = conn.execute(select(documents.c.id).where(
                (documents.c.id == doc_id) & (documents.c.tenant == tenant))).first()
            if found is None:
                return False
            self._delete(conn, doc_id)
        return True

    # ---- reading (always within one tenant) -----------------------------------------------------
    def list(self, tenant: str, collection: str | None = None) -> list[DocumentInfo]:
        q = select(documents.c.id, documents.c.tenant, documents.c.collection, documents.c.name,
                   documents.c.title, documents.c.sha256, documents.c.num_lines,
                   documents.c.created_at).where(documents.c.tenant == tenant)
        if collection is not None:
            q = q.where(documents.c.collection == collection)
        with self.engine.connect() as conn:
            return [_info(r) for r in conn.execute(q.order_by(documents.c.created_at))]

    def get(self, tenant: str, doc_id: str) -> Document | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(documents).where(
                (documents.c.id == doc_id) & (documents.c.tenant == tenant))).first()
        if row is None:
            return None
        return Document(_info(row), row.body.split("\n"))

    def search(self, tenant: str, query: str, limit: int = 10,
               collections: tuple[str, ...] | None = None) -> list[SearchHit]:
        """The best chunks for any of the query's words (never the query's own syntax: it is
        reduced to words first), best first, at most one per document."""
        words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))[:32]
        if not words:
            return []
        where = "c.tenant = :tenant"
        params: dict = {"tenant": tenant, "limit": limit * 4}
        if collections is not None:
            names = [f":col{i}" for i in range(len(collections))]
            where += f" AND c.collection IN ({', '.join(names) or 'NULL'})"
            params |= {f"col{i}": c for i, c in enumerate(collections)}
        if self.dialect == "sqlite":
            params["q"] = " OR ".join('"' + w.replace('"', "") + '"' for w in words)
            sql = ("SELECT c.id, c.document_id, c.line_start, c.line_end, c.body, "
                   "bm25(document_chunks_fts) AS rank FROM document_chunks_fts f "
                   "JOIN document_chunks c ON c.id = f.rowid "
                   f"WHERE document_chunks_fts MATCH :q AND {where} ORDER BY rank LIMIT :limit")
        else:
            params["q"] = " | ".join(words)
            sql = ("SELECT c.id, c.document_id, c.line_start, c.line_end, c.body, "
                   "-ts_rank(c.tsv, to_tsquery('english', :q)) AS rank FROM document_chunks c "
                   f"WHERE c.tsv @@ to_tsquery('english', :q) AND {where} "
                   "ORDER BY rank LIMIT :limit")
        with self.engine.connect() as conn:
            rows = conn.execute(text(sql), params).all()
            hits, seen = [], set()
            for r in rows:
                if r.document_id in seen:
                    continue
                seen.add(r.document_id)
                doc = conn.execute(select(documents).where(documents.c.id == r.document_id)).first()
                hits.append(SearchHit(_info(doc), r.line_start, r.line_end, r.body,
                                      -float(r.rank)))
                if len(hits) == limit:
                    break
        return hits
