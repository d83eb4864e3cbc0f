"""Transactions of the store: per-transaction state, retries, the database clock."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from herder.core.rules import (
    DEFAULT_BLOCKLIST_FORGIVE_S,
    DEFAULT_BLOCKLIST_THRESHOLD,
    DEFAULT_HEARTBEAT_GRACE_S,
    DEFAULT_INFRA_BUDGET,
    DEFAULT_RETRY_ELSEWHERE_S,
    BlocklistPolicy,
    PlacementPolicy,
    RetryPolicy,
)
from herder.errors import DatabaseBusy
from herder.store import dberrors
from herder.store import engine as _engine
from herder.store.common import (
    _MAX_TX_RETRIES,
)
from herder.store.dberrors import DbFailure
from herder.store.sql import HotSql

T = TypeVar("T")

_READ_RETRIES = 3


class CallGuard:
    """Lets the caller of a store call stop waiting without the call committing later.

    The master runs each store call in a worker thread and answers busy when
    it takes too long (``herder.master.context``); the call may still be
    waiting for a connection. ``abandon`` tells it to roll back instead of
    committing; it fails (returns False) once a COMMIT is being sent or was
    sent, and the caller must then wait for the outcome. Set for a thread
    with ``guarded_call``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._committing = False
        self.abandoned = False
        self.commits = 0  # write transactions of the call that committed

    def abandon(self) -> bool:
        with self._lock:
            if self._committing or self.commits:  # something is (or may be) in already
                return False
            self.abandoned = True
            return True

    def begin_commit(self) -> bool:
        with self._lock:
            if self.abandoned:
                return False
            self._committing = True
            return True

    def end_commit(self, committed: bool) -> None:
        with self._lock:
            self._committing = False
            self.commits += committed


_guards = threading.local()


@contextlib.contextmanager
def guarded_call(guard: CallGuard) -> Iterator[None]:
    """Store transactions of this thread check ``guard`` before they commit."""
    previous = getattr(_guards, "current", None)
    _guards.current = guard
    try:
        yield
    finally:
        _guards.current = previous


@dataclass
class _Tx:
    """Per-transaction state: the clock read at its start, pending events, wake flag.

    ``cur`` is a raw driver cursor on the transaction's connection (hot-path SQL,
    ``herder.store.sql``); ``at`` is ``now`` bound as the driver stores it.
    ``stage_done`` counts successes per ``(job_id, stage)``: the stage counters
    are updated at the end of the transaction (``StoreBase._finish``), to
    shorten how long PostgreSQL holds their row locks. ``after_commit``
    callbacks run once the transaction committed.
    """

    conn: Connection
    now: datetime
    cur: Any = None
    at: Any = None
    events: list[tuple[Any, ...]] = field(default_factory=list)
    woke: bool = False
    stage_done: dict[tuple[int, int], int] = field(default_factory=dict)
    after_commit: list[Callable[[], None]] = field(default_factory=list)

    def event(
        self,
        kind: str,
        *,
        job_id: int | None = None,
        task_id: int | None = None,
        attempt_id: int | None = None,
        agent_id: str | None = None,
        from_state: str | None = None,
        to_state: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.events.append(
            (self.at, job_id, task_id, attempt_id, agent_id, kind, from_state, to_state, reason)
        )


def _sqlite_now(conn: Connection) -> datetime:
    raw = conn.exec_driver_sql("SELECT strftime('%Y-%m-%d %H:%M:%f','now')").scalar_one()
    return datetime.fromisoformat(raw).replace(tzinfo=UTC)


def _pg_now(conn: Connection) -> datetime:
    value = conn.exec_driver_sql("SELECT now()").scalar_one()
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


def _retryable(exc: DBAPIError, elapsed_s: float) -> bool:
    """A transaction worth running again at once (nothing of it was committed)."""
    kind = dberrors.classify(exc)
    if kind is DbFailure.SERIALIZATION:
        return True
    if exc.connection_invalidated:
        # A pooled connection that died (a server restart): the pool is
        # invalidated with it, the next try connects afresh, and fails fast
        # (connection refused) if the server is really gone.
        return True
    if kind is DbFailure.BUSY and "database is locked" in str(exc.orig):
        # Locked well before the busy timeout ran out (SQLite skips its busy
        # handler in some lock upgrades): worth another try. Locked after the
        # busy timeout is a busy deferral, not minutes more of waiting.
        return elapsed_s < _engine.SQLITE_BUSY_TIMEOUT_MS / 2000
    return False


class StoreBase:
    """The store's engine, settings and transactions; the mixins build on it."""

    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        lease_s: float = 30.0,
        ack_timeout_s: float = 30.0,
        infra_budget: int = DEFAULT_INFRA_BUDGET,
        heartbeat_grace_s: float = DEFAULT_HEARTBEAT_GRACE_S,
        offline_after_s: float | None = None,
        retry_elsewhere_s: float = DEFAULT_RETRY_ELSEWHERE_S,
        blocklist_threshold: int = DEFAULT_BLOCKLIST_THRESHOLD,
        blocklist_forgive_s: float = DEFAULT_BLOCKLIST_FORGIVE_S,
        pool_size: int = 10,
        max_overflow: int = 10,
    ) -> None:
        self.url = _engine.normalize_url(url)
        self.lease_s = float(lease_s)
        self.ack_timeout_s = float(ack_timeout_s)
        self.infra_budget = int(infra_budget)
        self.retry_policy = RetryPolicy(infra_budget=self.infra_budget)
        self.placement_policy = PlacementPolicy(retry_elsewhere_s=float(retry_elsewhere_s))
        self.blocklist_policy = BlocklistPolicy(
            threshold=int(blocklist_threshold), forgive_s=float(blocklist_forgive_s)
        )
        self.heartbeat_grace_s = float(heartbeat_grace_s)
        self.offline_after_s = (
            float(offline_after_s) if offline_after_s is not None else max(3 * self.lease_s, 10.0)
        )
        self._engine = _engine.make_engine(self.url, pool_size=pool_size, max_overflow=max_overflow)
        self.dialect: str = self._engine.dialect.name
        self._is_pg = self.dialect == "postgresql"
        self._db_clock = _pg_now if self._is_pg else _sqlite_now
        self._clock_offset = timedelta(0)
        self._sql = HotSql(self._is_pg)
        self._driver_error: type[Exception] = self._engine.dialect.loaded_dbapi.Error
        # Jobs known to have left ``queued`` (a job never returns to it): no START update.
        self._left_queued: set[int] = set()
        self._wlock: contextlib.AbstractContextManager[Any]
        self._rlock: contextlib.AbstractContextManager[Any]
        if self._is_pg:
            self._wlock = contextlib.nullcontext()
            self._rlock = contextlib.nullcontext()
        elif _engine.is_memory_sqlite(self.url):
            # One shared connection: reads must be serialized with writes too.
            lock = threading.RLock()
            self._wlock = lock
            self._rlock = lock
        else:
            assert self.url.database is not None
            from pathlib import Path

            key = str(Path(self.url.database).expanduser().resolve())
            self._wlock = _engine.sqlite_lock(key)
            self._rlock = contextlib.nullcontext()
        if migrate:
            self.migrate()

    @classmethod
    def open(cls, url: str, migrate: bool = True, **kwargs: Any) -> Self:
        return cls(url, migrate=migrate, **kwargs)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def migrate(self, revision: str = "head") -> None:
        try:
            with self._write_conn() as conn, conn.begin():
                _engine.upgrade(conn, revision)
        except (DBAPIError, sa.exc.TimeoutError) as exc:
            raise self._database_error(exc) from exc

    @contextlib.contextmanager
    def _write_conn(self) -> Iterator[Connection]:
        with self._wlock, self._engine.connect() as conn:
            conn.execution_options(herder_write=True)
            yield conn

    def _write(self, fn: Callable[[_Tx], T]) -> T:
        """Run ``fn`` in one write transaction; retried on deadlock/serialization failure.

        Database failures leave as ``herder.errors.DatabaseError`` (classified
        by ``herder.store.dberrors``); the transaction is rolled back. A
        connection lost during COMMIT is never retried here: the server may
        have committed, so it is reported as ``CommitOutcomeUnknown``.
        """
        sql = self._sql
        for attempt in range(_MAX_TX_RETRIES):
            started = time.monotonic()
            committing = False
            try:
                with self._write_conn() as conn, conn.begin() as trans:
                    try:
                        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                        now = self._raw_now(cur)
                        tx = _Tx(conn, now, cur, sql.ts(now))
                        result = fn(tx)
                        self._finish(tx)
                    except self._driver_error as exc:  # raised by hot-path SQL on the raw cursor
                        raise self._wrap_driver_error(exc, conn) from exc
                    guard: CallGuard | None = getattr(_guards, "current", None)
                    if guard is not None and not guard.begin_commit():
                        raise DatabaseBusy(
                            "database busy: the request was given up before it committed"
                        )
                    committing = True
                    committed = False
                    try:
                        trans.commit()
                        committed = True
                    finally:
                        if guard is not None:
                            guard.end_commit(committed)
            except DBAPIError as exc:
                if isinstance(exc, IntegrityError):
                    raise
                if committing and self._is_pg and dberrors.is_disconnect(exc):
                    raise self._database_error(exc, committing=True) from exc
                if (
                    attempt == _MAX_TX_RETRIES - 1
                    or not _retryable(exc, time.monotonic() - started)
                    or getattr(getattr(_guards, "current", None), "abandoned", False)
                ):
                    raise self._database_error(exc) from exc
                time.sleep(0.005 * (2**attempt) * (0.5 + secrets.randbelow(1000) / 1000))
                continue
            except sa.exc.TimeoutError as exc:  # no pooled connection came free
                raise self._database_error(exc) from exc
            for callback in tx.after_commit:
                callback()
            return result
        raise AssertionError("unreachable")

    @staticmethod
    def _database_error(exc: Exception, *, committing: bool = False) -> Exception:
        """``exc`` as a domain error when it is a known database failure, else itself."""
        return dberrors.herder_error(exc, committing=committing) or exc

    def _wrap_driver_error(self, exc: Exception, conn: Connection) -> DBAPIError:
        """A driver exception as SQLAlchemy would have raised it (IntegrityError, invalidation)."""
        dialect = self._engine.dialect
        dead = False
        with contextlib.suppress(Exception):
            dead = bool(dialect.is_disconnect(exc, conn.connection.dbapi_connection, None))  # type: ignore[arg-type]
        if dead:
            with contextlib.suppress(Exception):
                conn.invalidate(exc)
        wrapped = DBAPIError.instance(
            None,
            None,
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=dead,
            dialect=dialect,
        )
        assert isinstance(wrapped, DBAPIError)
        return wrapped

    def _raw_now(self, cur: Any) -> datetime:
        cur.execute(self._sql.now)
        value = cur.fetchone()[0]
        if isinstance(value, str):
            value = datetime.fromisoformat(value).replace(tzinfo=UTC)
        else:
            value = value.astimezone(UTC)
        return value + self._clock_offset  # type: ignore[no-any-return]

    def _finish(self, t: _Tx) -> None:
        """End of a write transaction: pending events, then the stage counters (last)."""
        self._flush_events(t)
        if t.stage_done:
            self._flush_stages(t)
            self._flush_events(t)

    def _flush_events(self, t: _Tx) -> None:
        if t.events:
            self._sql.insert_events(t.cur, t.events)
            t.events.clear()

    def _flush_stages(self, t: _Tx) -> None:
        """Apply ``t.stage_done`` (herder.store.jobs)."""
        raise NotImplementedError

    def _stage_finished(self, t: _Tx, job_id: int, stage: int) -> None:
        """Every task of the stage succeeded (herder.store.jobs)."""
        raise NotImplementedError

    def _read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a read transaction; failures as in ``_write``."""
        for attempt in range(_READ_RETRIES):
            try:
                with self._rlock, self._engine.connect() as conn, conn.begin():
                    return fn(conn)
            except DBAPIError as exc:
                if isinstance(exc, IntegrityError):
                    raise
                # A read changes nothing: retried after a dead pooled connection.
                if attempt == _READ_RETRIES - 1 or not _retryable(exc, 0.0):
                    raise self._database_error(exc) from exc
            except sa.exc.TimeoutError as exc:
                raise self._database_error(exc) from exc
        raise AssertionError("unreachable")

    def _now_fn(self, conn: Connection) -> datetime:
        return self._db_clock(conn) + self._clock_offset

    def db_now(self) -> datetime:
        return self._read(self._now_fn)

    def advance_clock(self, seconds: float) -> None:
        """Move this store's view of the database clock forward (tests and simulations).

        Lease, offer and grace deadlines are compared with the clock read at the
        start of each transaction, so moving it is how a test lets time pass
        without sleeping and without racing a loaded machine.
        """
        self._clock_offset += timedelta(seconds=seconds)

    def _insert_ignore(self, table: sa.Table) -> Any:
        if self._is_pg:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
