"""The herder store: every SQL statement of the farm lives in this package (docs/architecture.md).

Rules (DESIGN §2, §5, §10):

- Every state change is one transaction. Task transitions are guarded in SQL
  (``UPDATE tasks … WHERE state IN (TASK_SOURCES[event]) … RETURNING``) and
  write an ``events`` row in the same transaction.
- Times come from the database clock: one ``db_now()`` read at the start of
  each transaction; deadlines are computed from it.
- SQLite has one writer per process (a lock plus ``BEGIN IMMEDIATE``);
  PostgreSQL claims with ``FOR UPDATE SKIP LOCKED`` and write transactions
  are retried on deadlock or serialization failure.

``Store`` is composed of mixins, one module per thing it owns: ``tx``
(transactions, the clock), ``jobs``, ``deps`` (depends_on: held and released
jobs), ``control`` (pause, resume, retry, change), ``claims``, ``completions``, ``leases``
(heartbeats, reaper, locks), ``retention`` (pruning under the maintenance
lock), ``agents``, ``masters`` (the directory), ``blobs``, ``logs`` (events
and logs) and, when present, ``results``.
"""

from __future__ import annotations

from herder.store.agents import AgentsMixin
from herder.store.common import REAPER_LOCK, ClaimOutcome, MasterStatus, SubmittedJob, WakeTarget
from herder.store.control import ControlMixin, JobChanges
from herder.store.leases import LeasesMixin
from herder.store.masters import MastersMixin
from herder.store.retention import PruneReport, RetentionMixin, RetentionPolicy

try:
    from herder.store.results import ResultsMixin
except ImportError:  # pragma: no cover - the results module is optional

    class ResultsMixin:  # type: ignore[no-redef]
        pass


__all__ = [
    "REAPER_LOCK",
    "ClaimOutcome",
    "JobChanges",
    "MasterStatus",
    "PruneReport",
    "RetentionPolicy",
    "Store",
    "SubmittedJob",
    "WakeTarget",
]


class Store(RetentionMixin, LeasesMixin, AgentsMixin, MastersMixin, ResultsMixin, ControlMixin):
    """Synchronous, thread-safe access to the farm's database."""
