"""Engines for the two supported databases, and the Alembic migration runner.

SQLite (DESIGN §1, §10): WAL, ``synchronous=NORMAL``, foreign keys on, a busy
timeout, and SQLAlchemy (not the sqlite3 module) emits ``BEGIN``: a plain
``BEGIN`` for reads, ``BEGIN IMMEDIATE`` for connections flagged with the
``herder_write`` execution option, so that a writer takes the database's write
lock up front instead of failing on upgrade from a read lock.

PostgreSQL: ``postgresql+psycopg://`` (plain ``postgresql://`` is rewritten),
a pool of 10 + 10 connections by default, with timeouts that turn a server
gone away into errors (``herder.store.dberrors`` classifies them).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 5
PG_POOL_TIMEOUT_S = 10.0
_PG_MIGRATION_LOCK = 0x6865726472  # pg_advisory_xact_lock key: "herdr"

# One writer lock per SQLite file per process, shared by every Store on it.
_sqlite_locks: dict[str, threading.Lock] = {}
_sqlite_locks_guard = threading.Lock()


def sqlite_lock(key: str) -> threading.Lock:
    with _sqlite_locks_guard:
        lock = _sqlite_locks.get(key)
        if lock is None:
            lock = _sqlite_locks[key] = threading.Lock()
        return lock


def normalize_url(url: str) -> sa.URL:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise ValueError(
            f"unsupported database URL {u.drivername!r}: use sqlite:///path or postgresql+psycopg://…"
        )
    return u


def is_memory_sqlite(u: sa.URL) -> bool:
    return u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:")


def make_engine(u: sa.URL, *, pool_size: int = 10, max_overflow: int = 10) -> Engine:
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(u)
    return sa.create_engine(
        u,
        pool_size=pool_size,
        max_overflow=max_overflow,
        # No pre-ping (a round trip per checkout on the hot path): a dead pooled
        # connection invalidates the pool (SQLAlchemy drops every connection
        # older than the failure) and the store retries the transaction
        # (herder.store.tx), so a restarted server costs one failed statement.
        pool_recycle=3600,
        # A request waits this long for a free connection, then is deferred.
        pool_timeout=PG_POOL_TIMEOUT_S,
        connect_args=_pg_connect_args(u),
    )


def _pg_connect_args(u: sa.URL) -> dict[str, Any]:
    """libpq settings that make a lost server an error instead of a hang.

    ``connect_timeout`` bounds a connect to a host that does not answer;
    keepalives and ``tcp_user_timeout`` bound how long a connection whose
    peer vanished (a network partition) looks alive. Settings in the URL's
    query win.
    """
    wanted: dict[str, Any] = {
        "connect_timeout": PG_CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "tcp_user_timeout": 20_000,
    }
    return {k: v for k, v in wanted.items() if k not in u.query}


def _sqlite_engine(u: sa.URL) -> Engine:
    kwargs: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
    }
    memory = is_memory_sqlite(u)
    if memory:
        kwargs["poolclass"] = StaticPool
    else:
        assert u.database is not None
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["pool_size"] = 8
        kwargs["max_overflow"] = 32
    engine = sa.create_engine(u, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, emit BEGIN (the documented recipe).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # On the driver's connection: this runs once per transaction (the hot path).
        raw = conn.connection.dbapi_connection
        assert raw is not None
        stmt = "BEGIN IMMEDIATE" if conn.get_execution_options().get("herder_write") else "BEGIN"
        try:
            raw.execute(stmt)
        except sqlite3.Error as exc:  # as exec_driver_sql raises it ("database is locked": retried)
            raise sa.exc.DBAPIError.instance(stmt, (), exc, sqlite3.Error) from exc

    return engine


# The newest migration's revision. A store that is already there starts without
# importing Alembic at all (a third of `herder run`'s start-up otherwise);
# tests/integration/test_migrations.py checks that it names Alembic's head.
HEAD_REVISION = "0011"


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at (``alembic_version``), None when it has none."""
    try:
        with conn.begin_nested():
            row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
    except sa.exc.DBAPIError:
        return None
    return None if row is None else str(row[0])


def _create_at_head(conn: Connection) -> None:
    """An empty database: create the head schema at once and stamp it.

    The same schema the migrations build (test_migrations.py compares both with
    ``herder.store.schema``), without importing Alembic or replaying history:
    a fresh ``herder run`` directory starts a second sooner.
    """
    from herder.store.schema import metadata

    metadata.create_all(conn)
    version = sa.Table(
        "alembic_version",
        sa.MetaData(),
        sa.Column("version_num", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
    )
    version.create(conn)
    conn.execute(version.insert().values(version_num=HEAD_REVISION))


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(conn: Connection, revision: str = "head") -> None:
    """Run ``alembic upgrade`` on an open connection inside its transaction.

    On PostgreSQL a transaction-scoped advisory lock makes concurrent masters
    starting at once migrate one after the other.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
    if revision in ("head", HEAD_REVISION):
        current = current_revision(conn)
        if current == HEAD_REVISION:
            return
        # "head" on an empty database: create it at once. (An explicit revision
        # always goes through Alembic: the migration tests rely on that.)
        if revision == "head" and current is None and not sa.inspect(conn).get_table_names():
            _create_at_head(conn)
            return
    from alembic import command

    command.upgrade(alembic_config(conn), revision)
