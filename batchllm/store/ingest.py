"""Bulk ingestion of request rows: COPY on PostgreSQL, executemany on SQLite; never a row at a time."""

from __future__ import annotations

import io
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from batchllm.store.models import Request

_COLS = ("batch_id", "line_no", "custom_id", "model", "kind", "chunk_id", "body", "error_code", "error_message")


class RequestWriter:
    """Buffers request rows and writes them in bulk inside the caller's transaction.

    Args:
        session: the ingest session (one transaction for the whole file, so --strict can roll back).
        flush_every: rows per bulk write.
    """

    def __init__(self, session: Session, flush_every: int = 20_000) -> None:
        self.session = session
        self.flush_every = flush_every
        self.rows: list[tuple[Any, ...]] = []
        self.written = 0
        self._pg = session.get_bind().dialect.name == "postgresql"

    def add(self, row: tuple[Any, ...]) -> None:
        """Queue one row, ordered as ``_COLS``."""
        self.rows.append(row)
        if len(self.rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered."""
        if not self.rows:
            return
        if self._pg:
            self._copy()
        else:
            self.session.execute(insert(Request), [dict(zip(_COLS, r, strict=True)) for r in self.rows])
        self.written += len(self.rows)
        self.rows.clear()

    def _copy(self) -> None:
        # COPY is several times faster than multi-row INSERT for large batches; it runs on the
        # session's own connection, so it stays inside the ingest transaction.
        conn = self.session.connection()
        raw: Any = conn.connection.dbapi_connection
        buf = io.StringIO()
        for r in self.rows:
            buf.write("\t".join(_copy_field(v) for v in r))
            buf.write("\n")
        with raw.cursor() as cur, cur.copy(f"COPY requests ({', '.join(_COLS)}) FROM STDIN") as cp:
            cp.write(buf.getvalue())


def _copy_field(v: Any) -> str:
    if v is None:
        return "\\N"
    s = str(v)
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        s = s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return s
