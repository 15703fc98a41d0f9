"""Engines, sessions, schema migration and the mapping of database outages to ``ServiceUnavailable``."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from batchllm.errors import InputError, ServiceUnavailable, mask_url

log = logging.getLogger(__name__)
T = TypeVar("T")


def rowcount(result: Any) -> int:
    """Rows an UPDATE/DELETE matched (typed access to ``CursorResult.rowcount``)."""
    return int(getattr(result, "rowcount", 0) or 0)


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (the driver we install)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    """True for SQLite URLs."""
    return url.startswith("sqlite")


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """A pooled engine per URL (cached). SQLite gets WAL and a busy timeout so threads can share it."""
    url = normalize_url(url)
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragma(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        connect_args={"connect_timeout": 5},
    )


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextlib.contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error; outages become ``ServiceUnavailable``."""
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except OperationalError as e:
        session.rollback()
        raise ServiceUnavailable("database", url, _short(e)) from e
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _short(e: Exception) -> str:
    orig = getattr(e, "orig", None) or e
    return mask_url(str(orig).strip().splitlines()[0][:160]) if str(orig).strip() else type(orig).__name__


def check_database(url: str) -> None:
    """Connect once; raise ``ServiceUnavailable`` (exit 5) naming the URL, or ``InputError`` if not migrated."""
    try:
        with get_engine(url).connect() as conn:
            tables = set(inspect(conn).get_table_names())
    except (OperationalError, DBAPIError) as e:
        raise ServiceUnavailable("database", url, _short(e)) from e
    if "batches" not in tables:
        if is_sqlite(url):
            upgrade(url)
            return
        raise InputError(f"database {mask_url(url)} has no batchllm tables; run `batchllm db upgrade` first")


def with_db_retry(fn: Callable[[], T], url: str, budget_s: float, what: str = "write") -> T:
    """Run ``fn`` and retry it with exponential backoff while the database is unreachable.

    Workers use this for result writes so a database restart mid-batch loses nothing.

    Args:
        fn: the unit of work; it must be idempotent (upserts), since it may run more than once.
        url: database URL, for the message.
        budget_s: how long to keep retrying before giving up.
        what: words for the log line.
    """
    deadline = time.monotonic() + budget_s
    delay = 0.5
    while True:
        try:
            return fn()
        except (ServiceUnavailable, OperationalError) as e:
            if time.monotonic() > deadline:
                raise
            log.warning("database unavailable during %s, retrying in %.1fs: %s", what, delay, mask_url(str(e))[:200])
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            with contextlib.suppress(Exception):
                get_engine(url).dispose()


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package, or at the source tree's root."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise InputError("alembic migrations not found next to the batchllm package; reinstall batchllm")


def _alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Run Alembic migrations up to ``revision``."""
    from alembic import command

    try:
        command.upgrade(_alembic_config(url), revision)
    except OperationalError as e:
        raise ServiceUnavailable("database", url, _short(e)) from e


def current(url: str) -> str | None:
    """The Alembic revision the database is at (None if never migrated)."""
    from alembic.runtime.migration import MigrationContext

    try:
        with get_engine(url).connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as e:
        raise ServiceUnavailable("database", url, _short(e)) from e
