"""Classification of database failures (herder.store.dberrors), on real driver errors.

Every error here is one the driver really raised (a refused connection, a
locked or full SQLite file, a terminated PostgreSQL backend is in
tests/integration/test_database_errors.py) or the driver's own class for a
SQLSTATE, as psycopg builds it from a server's answer.
"""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa

from herder.errors import (
    CommitOutcomeUnknown,
    DatabaseBusy,
    DatabaseFull,
    DatabaseUnavailable,
)
from herder.store.dberrors import DbFailure, classify, describe, herder_error


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused_psycopg() -> psycopg.OperationalError:
    try:
        psycopg.connect(f"postgresql://x@127.0.0.1:{closed_port()}/x", connect_timeout=2)
    except psycopg.OperationalError as exc:
        return exc
    raise AssertionError("connected to a closed port")


def wrapped(exc: Exception, *, invalidated: bool = False) -> sa.exc.DBAPIError:
    """``exc`` as SQLAlchemy raises it from a statement."""
    base = psycopg.Error if isinstance(exc, psycopg.Error) else sqlite3.Error
    err = sa.exc.DBAPIError.instance("SELECT 1", {}, exc, base, connection_invalidated=invalidated)
    assert isinstance(err, sa.exc.DBAPIError)
    return err


def test_refused_connection_is_unavailable() -> None:
    exc = refused_psycopg()
    assert classify(exc) is DbFailure.UNAVAILABLE
    assert classify(wrapped(exc)) is DbFailure.UNAVAILABLE
    err = herder_error(wrapped(exc))
    assert isinstance(err, DatabaseUnavailable)
    assert (err.status, err.code) == (503, "busy")
    assert err.message.startswith("database unavailable: ") and "refused" in err.message
    assert "SELECT" not in err.message  # the driver's complaint, not the statement


def test_lost_connection_while_committing_is_an_unknown_outcome() -> None:
    err = herder_error(wrapped(refused_psycopg(), invalidated=True), committing=True)
    assert isinstance(err, CommitOutcomeUnknown)
    assert err.status == 504 and "may or may not" in err.message


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("57P01", DbFailure.UNAVAILABLE),  # AdminShutdown
        ("57P02", DbFailure.UNAVAILABLE),  # CrashShutdown
        ("57P03", DbFailure.UNAVAILABLE),  # CannotConnectNow
        ("08006", DbFailure.UNAVAILABLE),  # ConnectionFailure
        ("53100", DbFailure.FULL),  # DiskFull
        ("53300", DbFailure.BUSY),  # TooManyConnections
        ("55P03", DbFailure.BUSY),  # LockNotAvailable
        ("57014", DbFailure.BUSY),  # QueryCanceled (statement_timeout)
        ("40001", DbFailure.SERIALIZATION),
        ("40P01", DbFailure.SERIALIZATION),
        ("23505", None),  # UniqueViolation: not a database failure
        ("42601", None),  # SyntaxError: a bug, stays a 500
    ],
)
def test_postgres_sqlstates(sqlstate: str, kind: DbFailure | None) -> None:
    exc = psycopg.errors.lookup(sqlstate)("server said no")
    assert exc.sqlstate == sqlstate
    assert classify(exc) is kind
    assert classify(wrapped(exc)) is kind


def test_admin_shutdown_class() -> None:
    exc = psycopg.errors.AdminShutdown("terminating connection due to administrator command")
    assert isinstance(herder_error(wrapped(exc)), DatabaseUnavailable)


def test_pg_disk_full_is_full() -> None:
    err = herder_error(wrapped(psycopg.errors.DiskFull("could not extend file")))
    assert isinstance(err, DatabaseFull) and err.status == 507
    assert err.message.startswith("database full: could not extend file (53100)")


def test_integrity_error_is_not_classified() -> None:
    exc = sa.exc.IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert classify(exc) is None and herder_error(exc) is None


def test_sqlite_locked_beyond_busy_timeout_is_busy(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(db, timeout=0.05, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError) as info:
            other.execute("BEGIN IMMEDIATE")
    finally:
        other.close()
        holder.close()
    assert classify(info.value) is DbFailure.BUSY
    err = herder_error(wrapped(info.value))
    assert isinstance(err, DatabaseBusy) and err.code == "busy" and err.status == 503
    assert "database is locked" in err.message and "SQLITE_BUSY" in err.message


def test_sqlite_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError) as info:
        sqlite3.connect(tmp_path / "missing-dir" / "x.db")
    assert classify(info.value) is DbFailure.UNAVAILABLE


def test_sqlite_full_by_its_error_code() -> None:
    # sqlite3 sets these attributes on what SQLite returned; SQLITE_FULL is 13
    # (the full-disk run itself is tests/chaos/test_database_outage.py).
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = 13  # type: ignore[attr-defined]
    exc.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
    err = herder_error(wrapped(exc))
    assert isinstance(err, DatabaseFull)
    assert (
        err.message
        == "database full: database or disk is full (SQLITE_FULL); free space on its disk"
    )


def test_disk_io_error_is_unavailable() -> None:
    exc = sqlite3.OperationalError("disk I/O error")
    exc.sqlite_errorcode = 10 | (3 << 8)  # type: ignore[attr-defined]  # SQLITE_IOERR_WRITE
    assert classify(wrapped(exc)) is DbFailure.UNAVAILABLE


def test_pool_timeout_is_busy() -> None:
    exc = sa.exc.TimeoutError("QueuePool limit of size 1 overflow 0 reached")
    err = herder_error(exc)
    assert isinstance(err, DatabaseBusy) and err.message.startswith("database busy: QueuePool")


def test_invalidated_connection_is_unavailable_whatever_the_text() -> None:
    exc = wrapped(psycopg.OperationalError("something odd"), invalidated=True)
    assert classify(exc) is DbFailure.UNAVAILABLE


def test_describe_chains_to_the_driver() -> None:
    exc = wrapped(psycopg.errors.AdminShutdown("terminating connection"))
    outer = RuntimeError("wrapper")
    outer.__cause__ = exc
    assert describe(outer) == "wrapper"
    assert classify(outer) is DbFailure.UNAVAILABLE
