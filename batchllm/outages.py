"""The one outage classifier: is this exception a database or broker that is down or restarting?

Every retry loop (worker writes, heartbeats, the scheduler's steps, the CLI's exit code 5) asks here, so a
connection refused, a server restarting or a dropped socket is treated the same way everywhere. It is built
on the drivers' own error classes (kombu's Redis transport ``connection_errors``, psycopg's
``OperationalError``/``InterfaceError``, SQLite's locked/unopenable database) and on the
``connection_invalidated`` flag the database layer sets on errors that killed their connection. A bug
(a ``KeyError``, a constraint violation, NUL in text) is never an outage: it must not be retried forever.
"""

from __future__ import annotations

import errno
import socket
import sqlite3
from collections.abc import Iterator
from enum import StrEnum
from functools import lru_cache

from batchllm.errors import ServiceUnavailable


class Service(StrEnum):
    """Which backing service an outage is of."""

    DATABASE = "database"
    BROKER = "broker"


# SQLite reports a busy writer or a vanished file through OperationalError, like a syntax error: tell them apart.
_SQLITE_TRANSIENT = ("database is locked", "unable to open database file", "disk i/o error", "database table is locked")


@lru_cache(maxsize=1)
def _broker_errors() -> tuple[type[BaseException], ...]:
    """kombu's Redis transport connection errors, without the generic ``KeyError`` kombu also lists there."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from kombu.transport.redis import Transport

    # kombu lists plain OSError (any file error would look like Redis being down) and KeyError: both are
    # replaced by the socket-level errors a lost connection raises; _NET_ERRNOS covers the rest.
    generic = (KeyError, OSError)
    found = [e for e in (*Transport.connection_errors, KombuOperationalError) if e not in generic]
    return (*found, ConnectionError, TimeoutError, socket.gaierror)


_NET_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.ECONNABORTED}


@lru_cache(maxsize=1)
def _database_errors() -> tuple[type[BaseException], ...]:
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """The exception, what caused it, and the driver error a database-layer wrapper carries (``orig``)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([getattr(e, "orig", None), e.__cause__, e.__context__])


def outage_of(exc: BaseException) -> Service | None:
    """Which service ``exc`` says is unreachable, or None when it is not an outage.

    Args:
        exc: any exception.

    Returns:
        ``Service.DATABASE`` or ``Service.BROKER``; None for every other error.
    """
    for e in _chain(exc):
        if isinstance(e, ServiceUnavailable):
            return Service.DATABASE if e.service == "database" else Service.BROKER
        if getattr(e, "connection_invalidated", False) or isinstance(e, _database_errors()):
            return Service.DATABASE
        if isinstance(e, sqlite3.OperationalError) and str(e).lower().startswith(_SQLITE_TRANSIENT):
            return Service.DATABASE
    for e in _chain(exc):
        if isinstance(e, _broker_errors()) or (isinstance(e, OSError) and e.errno in _NET_ERRNOS):
            return Service.BROKER
    return None


def is_outage(exc: BaseException) -> bool:
    """True when retrying later can help: the database or the broker is down, restarting or unreachable."""
    return outage_of(exc) is not None
