"""The master's view of its database: up, or lost (since when, and why).

Every store call of the master goes through ``ApiContext.call``, which tells
this tracker how it went. The tracker logs one structured line when the
database is lost (unreachable, or its disk full) and one when it is back,
instead of one per failed request; ``/api/v1/health`` and ``/metrics`` show
its state.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
import sqlalchemy as sa

from herder.errors import DatabaseError, DatabaseFull, DatabaseUnavailable

if TYPE_CHECKING:
    from herder.master.metrics import MasterStats

log = logging.getLogger("herder.master")


@dataclass
class DatabaseHealth:
    problem: str | None = None  # "unavailable" or "full" while the database is lost
    message: str = ""
    since: float = 0.0  # time.time() the problem started
    failures: int = 0  # requests and rounds the database failed since the start
    # time.monotonic() the database last came back: calls that started before
    # then (stuck through the outage) fail late, and that is not a new outage
    back_at: float = -1.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def up(self) -> bool:
        return self.problem is None

    def failed(self, exc: DatabaseError, started: float | None = None) -> None:
        """A store call failed with ``exc``: log it when it starts an outage.

        ``started`` is when the call began (``time.monotonic()``): one that began
        before the database last came back is a straggler of the outage that is
        over (counted, but it does not open another).
        """
        if isinstance(exc, DatabaseUnavailable):
            problem = "unavailable"
        elif isinstance(exc, DatabaseFull):
            problem = "full"
        else:  # busy, outcome unknown: the database answers, or did a moment ago
            with self._lock:
                self.failures += 1
            return
        with self._lock:
            self.failures += 1
            if self.problem == problem:
                return
            if started is not None and started < self.back_at:
                return
            self.problem, self.message, self.since = problem, exc.message, time.time()
        log.warning("event=database_lost problem=%s error=%r", problem, exc.message)

    def succeeded(self, *, wrote: bool) -> None:
        """A store call went through: the database is back if it was lost.

        A full disk still serves reads: only a committed write says it is over.
        """
        if self.problem is None:  # the hot path: one attribute read
            return
        with self._lock:
            if self.problem is None or (self.problem == "full" and not wrote):
                return
            problem, down_s = self.problem, time.time() - self.since
            self.problem, self.message = None, ""
            self.back_at = time.monotonic()
        log.warning("event=database_back problem=%s down_s=%.1f", problem, down_s)


# What a database failure raised past the store can look like (the master
# answers them as the store's classified errors, see ``herder.master.app``).
DRIVER_ERRORS: tuple[type[Exception], ...] = (
    sa.exc.SQLAlchemyError,
    sqlite3.Error,
    psycopg.Error,
)


class LoopFailures:
    """Failures of the master's background rounds (reaper, heartbeat, recheck).

    A round that fails the way it failed last time logs nothing: a database
    away for a minute is one line per loop (and the tracker's lost/back pair),
    not one per second. An unexpected error is logged with its traceback the
    first time (a bug to fix) and counted every time.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._last: dict[str, str] = {}

    def ok(self, name: str) -> None:
        if self._last.pop(name, None) is not None:
            self._log.info("event=%s_recovered", name)

    def failed(self, name: str, exc: Exception, stats: MasterStats) -> None:
        if isinstance(exc, DatabaseError):  # busy, then unavailable: still one outage
            key = "database"
            if self._last.get(name) != key:
                self._log.warning("event=%s_failed error=%r", name, exc.message)
        else:
            stats.unhandled_exceptions += 1
            key = repr(exc)
            if self._last.get(name) != key:
                self._log.exception("event=%s_failed error=%r", name, exc)
        self._last[name] = key
