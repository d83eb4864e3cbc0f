"""What a database failure means, in one place, for both dialects.

A driver or SQLAlchemy exception falls in one of these kinds:

* ``UNAVAILABLE``: the database cannot be reached or went away (connection
  refused or lost, server shutting down or starting up, SQLite disk I/O
  error): try again later; masters answer a busy deferral (503);
* ``FULL``: the database's disk is full (``SQLITE_FULL``, PostgreSQL
  ``disk_full`` 53100): the transaction rolled back; answered 507 so the
  client sees the reason at once (another master shares the same disk);
* ``BUSY``: locked or overloaded beyond the waits the store allows (SQLite
  ``database is locked`` after its busy timeout, a pool with no free
  connection, a lock or statement timeout): a busy deferral (503);
* ``SERIALIZATION``: a serialization failure or deadlock; the store retries
  the transaction itself (``herder.store.tx``) and surfaces it as busy once
  it gave up.

Anything else (an integrity error, a bug in SQL) is not classified: it stays
what it is. ``herder_error`` turns a classified failure into the domain error
of ``herder.errors`` that the master answers and the embedded farm reports.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterator

import sqlalchemy as sa

from herder.errors import (
    CommitOutcomeUnknown,
    DatabaseBusy,
    DatabaseError,
    DatabaseFull,
    DatabaseUnavailable,
)


class DbFailure(enum.Enum):
    UNAVAILABLE = "unavailable"
    FULL = "full"
    BUSY = "busy"
    SERIALIZATION = "serialization"


# SQLite primary result codes (the low byte of an extended code).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14

_PG_UNAVAILABLE_STATES = {
    "57P01",  # admin_shutdown (pg_ctl stop/restart -m fast)
    "57P02",  # crash_shutdown (a backend crashed, or -m immediate)
    "57P03",  # cannot_connect_now (starting up, shutting down, recovering)
    "57P05",  # idle_session_timeout
    "58030",  # io_error
}
_PG_BUSY_STATES = {
    "53000",  # insufficient_resources
    "53200",  # out_of_memory
    "53300",  # too_many_connections
    "55P03",  # lock_not_available (lock_timeout)
    "57014",  # query_canceled (statement_timeout)
}
_PG_SERIALIZATION_STATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
_PG_FULL_STATE = "53100"  # disk_full

# Client-side libpq/psycopg failures carry no SQLSTATE; these are their words.
_LOST_WORDS = (
    "connection refused",
    "could not connect",
    "connection failed",
    "connection timeout expired",
    "server closed the connection",
    "connection is closed",
    "connection is lost",
    "consuming input failed",
    "sending query failed",
    "terminating connection",
    "no connection to the server",
    "the database system is",
    "ssl syscall error",
    "connection reset",
    "broken pipe",
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the driver error it wraps, and its causes (bounded, cycle-safe)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 16:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)
        for nxt in (orig, e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _classify_sqlite(e: sqlite3.Error) -> DbFailure | None:
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(e).lower()
    if primary == _SQLITE_FULL or "database or disk is full" in text:
        return DbFailure.FULL
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or "database is locked" in text:
        return DbFailure.BUSY
    if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN) or "disk i/o error" in text:
        return DbFailure.UNAVAILABLE
    if "unable to open database file" in text:
        return DbFailure.UNAVAILABLE
    return None


def _classify_psycopg(e: BaseException) -> DbFailure | None:
    import psycopg

    if not isinstance(e, psycopg.Error):
        return None
    state = e.sqlstate
    if state == _PG_FULL_STATE:
        return DbFailure.FULL
    if state in _PG_SERIALIZATION_STATES:
        return DbFailure.SERIALIZATION
    if state in _PG_BUSY_STATES:
        return DbFailure.BUSY
    if state in _PG_UNAVAILABLE_STATES or (state is not None and state.startswith("08")):
        return DbFailure.UNAVAILABLE
    if state is None and isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
        # Raised by the client side (no server answer): the connection failed.
        return DbFailure.UNAVAILABLE
    text = str(e).lower()
    if state is None and any(w in text for w in _LOST_WORDS):
        return DbFailure.UNAVAILABLE
    return None


def classify(exc: BaseException) -> DbFailure | None:
    """The kind of database failure ``exc`` is, or None for anything else."""
    if isinstance(exc, DatabaseError):
        return _KIND_OF_ERROR.get(type(exc))
    for e in _chain(exc):
        if isinstance(e, sa.exc.IntegrityError):
            return None
        if isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated:
            return DbFailure.UNAVAILABLE
        if isinstance(e, sa.exc.TimeoutError):  # no pooled connection free in time
            return DbFailure.BUSY
        if isinstance(e, sqlite3.Error):
            kind = _classify_sqlite(e)
            if kind is not None:
                return kind
        kind = _classify_psycopg(e)
        if kind is not None:
            return kind
    return None


def is_disconnect(exc: BaseException) -> bool:
    return classify(exc) is DbFailure.UNAVAILABLE


def describe(exc: BaseException) -> str:
    """One line naming the driver's complaint (no SQL, no parameters)."""
    for e in _chain(exc):
        if isinstance(e, sa.exc.DBAPIError) and e.orig is not None:
            continue
        if isinstance(e, sa.exc.StatementError):
            continue
        text = " ".join(str(e).split())
        if text:
            code = getattr(e, "sqlite_errorname", None) or getattr(e, "sqlstate", None)
            if len(text) > 300:
                text = text[:297] + "..."
            return f"{text} ({code})" if code else text
    return type(exc).__name__


def herder_error(exc: BaseException, *, committing: bool = False) -> DatabaseError | None:
    """The domain error for a classified database failure (None: not one).

    ``committing``: the failure happened while COMMIT was sent. A connection
    lost then leaves the outcome unknown (the server may have committed), so
    it is reported as such instead of as an outage the client could blindly
    retry.
    """
    if isinstance(exc, DatabaseError):
        return exc
    kind = classify(exc)
    if kind is None:
        return None
    why = describe(exc)
    if kind is DbFailure.UNAVAILABLE:
        if committing:
            return CommitOutcomeUnknown(
                "database connection lost while committing: the request may or may not "
                f"have taken effect; check before repeating it: {why}"
            )
        return DatabaseUnavailable(f"database unavailable: {why}")
    if kind is DbFailure.FULL:
        return DatabaseFull(f"database full: {why}; free space on its disk")
    if kind is DbFailure.SERIALIZATION:
        return DatabaseBusy(f"database busy: conflicting transactions, retried: {why}")
    return DatabaseBusy(f"database busy: {why}")


_KIND_OF_ERROR: dict[type[DatabaseError], DbFailure] = {
    DatabaseUnavailable: DbFailure.UNAVAILABLE,
    CommitOutcomeUnknown: DbFailure.UNAVAILABLE,
    DatabaseFull: DbFailure.FULL,
    DatabaseBusy: DbFailure.BUSY,
}

__all__ = ["DbFailure", "classify", "describe", "herder_error", "is_disconnect"]
