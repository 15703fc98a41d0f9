"""Bulk ingestion of request rows: COPY on PostgreSQL, executemany on SQLite; never a row at a time.

On PostgreSQL the rows are formatted into COPY text by the caller's thread and sent by a background
thread, one ``COPY`` statement per ``flush_every`` rows, so the database inserts (and runs the foreign-key
and index work of) one slice while the caller validates the next: the two run on different cores.
"""

from __future__ import annotations

import queue
import re
import threading
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from batchllm.store.models import Request

#: A request row, in this order (``RequestWriter.add``).
COLUMNS = ("batch_id", "line_no", "custom_id", "model", "endpoint", "chunk_id", "body", "error_code", "error_message",
           "error_param")
_COLS = COLUMNS
_COPY_SQL = f"COPY requests ({', '.join(_COLS)}) FROM STDIN"
_SQLITE_INSERT = f"INSERT INTO requests ({', '.join(_COLS)}) VALUES ({', '.join('?' * len(_COLS))})"
_NULL = "\\N"
_SPECIAL = re.compile(r"[\t\n\r\\]")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class RequestWriter:
    """Buffers request rows and writes them in bulk inside the caller's transaction.

    On PostgreSQL, rows added past each ``flush_every`` are on their way to the database in the
    background; :meth:`flush` returns once every row is written. Between the first :meth:`add` and
    :meth:`flush` the session's connection belongs to the writer: do not use the session meanwhile.
    Call :meth:`abort` instead of :meth:`flush` when giving up (the transaction is then rolled back).

    Args:
        session: the ingest session (one transaction for the whole file, so --strict can roll back).
        flush_every: rows per bulk write (one COPY statement or one executemany).
    """

    def __init__(self, session: Session, flush_every: int = 20_000) -> None:
        self.session = session
        self.flush_every = flush_every
        self.rows: list[tuple[Any, ...]] = []
        self.written = 0
        dialect = session.get_bind().dialect.name
        self._pg = dialect == "postgresql"
        self._sqlite = dialect == "sqlite"
        self._copier: _CopyThread | None = None

    def add(self, row: tuple[Any, ...]) -> None:
        """Queue one row, ordered as ``COLUMNS`` (``body`` as str or UTF-8 bytes of JSON)."""
        self.rows.append(row)
        if len(self.rows) >= self.flush_every:
            self._send()

    def flush(self) -> None:
        """Write what is buffered and wait until the database has every row added so far."""
        self._send()
        if self._copier is not None:
            copier, self._copier = self._copier, None
            copier.finish()

    def abort(self) -> None:
        """Stop writing (after an error elsewhere); buffered rows are dropped. Never raises."""
        self.rows.clear()
        if self._copier is not None:
            copier, self._copier = self._copier, None
            copier.abort()

    def _send(self) -> None:
        if not self.rows:
            return
        if self._pg:
            if self._copier is None:
                self._copier = _CopyThread(self._dbapi_connection())
            self._copier.put(_copy_text(self.rows))
        elif self._sqlite:  # the driver's executemany over plain tuples, on the session's own connection
            self._dbapi_connection().executemany(_SQLITE_INSERT, [_text_row(r) for r in self.rows])
        else:
            self.session.execute(insert(Request), [dict(zip(_COLS, r, strict=True)) for r in self.rows])
        self.written += len(self.rows)
        self.rows = []

    def _dbapi_connection(self) -> Any:
        return self.session.connection().connection.dbapi_connection


def _text_row(r: tuple[Any, ...]) -> tuple[Any, ...]:
    return r if type(r[6]) is not bytes else (*r[:6], r[6].decode(), *r[7:])


class _CopyThread:
    """Runs one ``COPY requests FROM STDIN`` per slice of text on a background thread.

    COPY is several times faster than multi-row INSERT; it runs on the session's own connection, so it
    stays inside the ingest transaction. At most two slices wait, so memory stays flat.
    """

    def __init__(self, dbapi_connection: Any) -> None:
        self._conn = dbapi_connection
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name="batchllm-copy", daemon=True)
        self._thread.start()

    def put(self, text: str) -> None:
        """Hand over one slice (blocks while two are waiting); raises the writer's error, if any."""
        while True:
            if self._error is not None:
                self._raise()
            try:
                self._queue.put(text, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait for every slice to be written; raise what the writer raised."""
        self._put_end()
        self._thread.join()
        if self._error is not None:
            self._raise()

    def abort(self) -> None:
        """Drop what is waiting and stop after the statement in flight."""
        self._aborted = True
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._put_end()
        self._thread.join(timeout=600)

    def _put_end(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        err = self._error
        assert err is not None
        raise err.with_traceback(err.__traceback__)

    def _run(self) -> None:
        while True:
            text = self._queue.get()
            if text is None:
                return
            if self._error is not None or self._aborted:
                continue  # drain until the end marker so put() never blocks forever
            try:
                with self._conn.cursor() as cur, cur.copy(_COPY_SQL) as cp:
                    cp.write(text)
            except BaseException as e:  # handed to the caller's thread by put()/finish()
                self._error = e


def _copy_text(rows: list[tuple[Any, ...]]) -> str:
    """Rows as COPY text: tab-separated, ``\\N`` for NULL, backslash escapes where needed."""
    lines: list[str] = []
    append = lines.append
    for r in rows:
        if r[7] is None and r[8] is None and r[9] is None and r[5] is not None:
            # A valid request's row (seven values, three NULLs). JSON text holds no raw tab or line break, so
            # only its backslashes (JSON escapes) need doubling; ids and names are checked for the rest.
            body = r[6].decode() if type(r[6]) is bytes else r[6]
            names = f"{r[2]}{r[3]}"
            if not _SPECIAL.search(names) and "\t" not in body and "\n" not in body and "\r" not in body:
                append(f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\t{r[4]}\t{r[5]}\t{body.replace(chr(92), chr(92) * 2)}\t\\N\t\\N\t\\N")
                continue
        append("\t".join([_copy_field(v) for v in r]))
    append("")
    return "\n".join(lines)


def _copy_field(v: Any) -> str:
    if v is None:
        return _NULL
    if type(v) is bytes:
        v = v.decode()
    return str(v).translate(_ESCAPES)
