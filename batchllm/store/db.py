"""Engines, sessions, schema migration and the mapping of database outages to ``ServiceUnavailable``."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from batchllm.errors import InputError, ServiceUnavailable, mask_url
from batchllm.outages import Service, outage_of
from batchllm.store.clock import db_now

log = logging.getLogger(__name__)
T = TypeVar("T")


def rowcount(result: Any) -> int:
    """Rows an UPDATE/DELETE matched (typed access to ``CursorResult.rowcount``)."""
    return int(getattr(result, "rowcount", 0) or 0)


def after_row(entity: Any, ref: Any, ascending: bool = False) -> Any:
    """The keyset-paging condition: rows of ``entity`` after ``ref`` in (created_at, id) order."""
    if ascending:
        return (entity.created_at > ref.created_at) | ((entity.created_at == ref.created_at) & (entity.id > ref.id))
    return (entity.created_at < ref.created_at) | ((entity.created_at == ref.created_at) & (entity.id < ref.id))


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (the driver we install)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    """True for SQLite URLs."""
    return url.startswith("sqlite")


_idle_tx_ms: int | None = None  # see end_idle_transactions_after


def end_idle_transactions_after(seconds: float) -> None:
    """Have PostgreSQL end this process's sessions that sit idle inside a transaction for ``seconds``.

    For processes whose transactions are all short (workers). One frozen (SIGSTOP, a paused VM) or cut off
    inside a transaction holds row locks that would block the scheduler's recovery and other workers' claims
    until the server noticed, which on a silent network is hours; ended, its locks go and its late commit
    fails. Long readers (export, ingest) must not use it. Call before the process's first database use.
    """
    global _idle_tx_ms
    _idle_tx_ms = max(1, int(seconds * 1000))
    get_engine.cache_clear()
    _sessionmaker.cache_clear()


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
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        # A partitioned network drops packets without a reset: keepalives and tcp_user_timeout turn a
        # hung connection into an error within seconds, so retries and fencing take over.
        connect_args={"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                      "keepalives_count": 3, "tcp_user_timeout": 10_000},
    )
    if _idle_tx_ms is not None:
        ms = _idle_tx_ms

        @event.listens_for(engine, "connect")
        def _idle_limit(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # A SET, not the URL's ``options``: a user's own ``options`` (search_path …) stays as given.
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET idle_in_transaction_session_timeout = {ms}")
            dbapi_conn.commit()

    return engine


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextlib.contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error; outages become ``ServiceUnavailable``.

    Only the store's own modules open sessions; everything else calls their named functions.
    """
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except ServiceUnavailable:
        _rollback(session)
        raise
    except Exception as e:
        _rollback(session)
        if outage_of(e) is Service.DATABASE:
            raise ServiceUnavailable("database", url, _short(e)) from e
        raise
    except BaseException:
        _rollback(session)
        raise
    finally:
        session.close()


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except Exception:  # the connection is gone: nothing to roll back
        log.debug("rollback failed", exc_info=True)


def now(url: str) -> float:
    """The database's clock, in epoch seconds (the one "now" every process agrees on)."""
    with session_scope(url) as s:
        return float(s.scalar(select(db_now())) or 0.0)


def _short(e: Exception) -> str:
    orig = getattr(e, "orig", None) or e
    return mask_url(str(orig).strip().splitlines()[0][:160]) if str(orig).strip() else type(orig).__name__


def check_database(url: str) -> None:
    """Connect once; raise ``ServiceUnavailable`` (exit 5) naming the URL, or ``InputError`` if not migrated."""
    try:
        with get_engine(url).connect() as conn:
            tables = set(inspect(conn).get_table_names())
            revision = _revision(conn) if "alembic_version" in tables else None
    except DBAPIError as e:
        raise ServiceUnavailable("database", url, _short(e)) from e
    if revision != head_revision():
        if is_sqlite(url):  # a file of our own: bring it up to date, as `batchllm run` users expect
            upgrade(url)
            return
        what = ("has no batchllm tables" if "batches" not in tables
                else f"is at schema {revision}, this batchllm needs {head_revision()}")
        raise InputError(f"database {mask_url(url)} {what}; run `batchllm db upgrade` first")


def with_db_retry(fn: Callable[[], T], url: str, budget_s: float, what: str = "write") -> T:
    """Run ``fn`` and retry it with exponential backoff while the database is unreachable.

    Workers use this for result writes so a database restart mid-batch loses nothing.

    Args:
        fn: the unit of work; it must be idempotent (fenced, insert-only), since it may run more than once.
        url: database URL, for the message.
        budget_s: how long to keep retrying; the last try is made at the deadline, then the outage is raised.
        what: words for the log line.
    """
    deadline = time.monotonic() + budget_s
    delay = 0.25
    while True:
        try:
            return fn()
        except Exception as e:
            left = deadline - time.monotonic()
            if outage_of(e) is not Service.DATABASE or left <= 0:
                raise
            # The last try lands on the deadline: an outage shorter than the budget is always ridden out.
            wait = min(delay, left)
            log.warning("database unavailable during %s, retrying in %.1fs: %s", what, wait, mask_url(str(e))[:200])
            time.sleep(wait)
            delay = min(delay * 2, 5.0)
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
    except DBAPIError as e:
        if outage_of(e) is Service.DATABASE:
            raise ServiceUnavailable("database", url, _short(e)) from e
        raise


def current(url: str) -> str | None:
    """The Alembic revision the database is at (None if never migrated)."""
    try:
        with get_engine(url).connect() as conn:
            return _revision(conn)
    except DBAPIError as e:
        raise ServiceUnavailable("database", url, _short(e)) from e


def _revision(conn: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    """The newest migration this batchllm ships."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()
