"""Retention: finished jobs past their age are pruned, unreferenced blobs collected (issue 9).

Under the maintenance lock (DESIGN §5), like reaping: every batch takes or
renews the lock in its own transaction, so a second holder never prunes at
the same time (on PostgreSQL the lock row stays locked until the batch
commits). A round is bounded batches, each one transaction:

- **jobs**: at most ``batch_jobs`` jobs (and about ``batch_tasks`` tasks)
  whose state is succeeded, failed or cancelled and whose ``finished_at`` is
  older than the retention, none of whose tasks is still offered or
  running and on which no waiting job depends (a held child keeps its
  failed parent, which a retry may still make succeed), with their stages, tasks, attempts, logs, events and blocklist
  strikes. The condition is in every statement's SQL: a queued, running or
  paused job is never pruned whatever its age.
- **blobs**: blobs older than the grace period (``created_at``, refreshed
  when a client is told the store has one: herder.store.blobs) that no task's
  ``requires`` and no attempt's ``outputs`` names. The reference set is read
  from the JSON columns by the database itself (``json_each`` /
  ``json_array_elements``) in the deleting statement.

A round stops after ``round_budget_s`` so reaping is not held up; the rest
waits for the next round, which is then due at once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from herder.core.rules import DEFAULT_MAINTENANCE_TTL_S
from herder.core.states import JOB_TERMINAL, JobState
from herder.store.common import _ACTIVE, REAPER_LOCK
from herder.store.leases import LeasesMixin
from herder.store.schema import (
    agent_job_failures,
    attempts,
    blobs,
    events,
    job_deps,
    jobs,
    log_chunks,
    stages,
    task_tags,
    tasks,
)
from herder.store.tx import _Tx

log = logging.getLogger("herder.store")

DEFAULT_RETENTION_S = 14 * 86400.0
DEFAULT_BLOB_GRACE_S = 24 * 3600.0
RETENTION_ENV = "HERDER_RETENTION"
BLOB_GRACE_ENV = "HERDER_BLOB_GRACE"

FINISHED_JOB_STATES = tuple(sorted(s.value for s in JOB_TERMINAL))
_WAITING = JobState.WAITING.value

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``14d``, ``2w`` as seconds; ValueError otherwise."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"expected a duration such as 90s, 30m, 12h, 14d or 2w, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_retention(text: str) -> float | None:
    """A retention (``14d`` …) in seconds; ``0`` or ``off``: None (keep everything)."""
    t = text.strip().lower()
    if t in ("0", "off", "none", "never"):
        return None
    seconds = parse_duration(t)
    return seconds if seconds > 0 else None


@dataclass
class RetentionPolicy:
    """What a prune round removes and how much at once."""

    retention_s: float | None = DEFAULT_RETENTION_S  # None: never prune
    blob_grace_s: float = DEFAULT_BLOB_GRACE_S
    interval_s: float = 60.0  # at most one round this often (it follows reaping)
    batch_jobs: int = 500
    batch_tasks: int = 10_000  # a job with more tasks is pruned alone
    batch_blobs: int = 500
    round_budget_s: float = 2.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetentionPolicy:
        """``HERDER_RETENTION`` (``14d``, ``0``/``off``) and ``HERDER_BLOB_GRACE`` (``24h``)."""
        source = os.environ if env is None else env
        policy = cls()
        for name, attr, parse in (
            (RETENTION_ENV, "retention_s", parse_retention),
            (BLOB_GRACE_ENV, "blob_grace_s", parse_duration),
        ):
            value = source.get(name)
            if value:
                try:
                    setattr(policy, attr, parse(value))
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        return policy


@dataclass
class PruneReport:
    """What one prune round (or batch) removed."""

    jobs: int = 0
    tasks: int = 0
    attempts: int = 0
    events: int = 0
    logs: int = 0  # log chunks
    blobs: int = 0
    bytes: int = 0  # of the blobs
    batches: int = 0
    more: bool = False  # the round stopped with work left (budget)

    def add(self, other: PruneReport) -> None:
        for f in fields(self):
            if f.name != "more":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def removed(self) -> bool:
        return bool(self.jobs or self.events or self.blobs)


class RetentionMixin(LeasesMixin):
    """Part of :class:`herder.store.Store`: retention (pruning) under the maintenance lock."""

    _retention: RetentionPolicy | None = None
    _next_prune_at = 0.0  # monotonic
    _pruned: PruneReport | None = None

    @property
    def pruned_total(self) -> PruneReport:
        """What this store's prune rounds removed since it opened (for metrics)."""
        if self._pruned is None:
            self._pruned = PruneReport()
        return self._pruned

    @property
    def retention(self) -> RetentionPolicy:
        """The policy ``prune_due`` follows: set it, or it is read from the environment."""
        if self._retention is None:
            self._retention = RetentionPolicy.from_env()
        return self._retention

    @retention.setter
    def retention(self, policy: RetentionPolicy) -> None:
        self._retention = policy

    def prune_due(
        self, holder: str, ttl_s: float = DEFAULT_MAINTENANCE_TTL_S, name: str = REAPER_LOCK
    ) -> PruneReport | None:
        """A prune round if one is due (``retention.interval_s``); None if none ran.

        Called after each reap by whoever holds the maintenance lock (a master,
        or an agent in autonomous mode); it takes the lock again per batch.
        """
        policy = self.retention
        now = time.monotonic()
        if policy.retention_s is None or now < self._next_prune_at:
            return None
        report = self.prune(holder, policy.retention_s, ttl_s, name, policy=policy)
        self._next_prune_at = now + (
            0.0 if report is not None and report.more else policy.interval_s
        )
        return report

    def prune(
        self,
        holder: str,
        retention_s: float,
        ttl_s: float = DEFAULT_MAINTENANCE_TTL_S,
        name: str = REAPER_LOCK,
        *,
        policy: RetentionPolicy | None = None,
    ) -> PruneReport | None:
        """One round: jobs finished more than ``retention_s`` ago, then unreferenced blobs.

        None if ``holder`` does not hold (and cannot take) the lock; a round
        that loses the lock midway stops and reports what it did.
        """
        p = policy or self.retention
        started = time.monotonic()
        total = PruneReport()
        held = False

        def over_budget() -> bool:
            return time.monotonic() - started > p.round_budget_s

        while True:
            got = self._write(lambda t: self._prune_jobs(t, holder, ttl_s, name, retention_s, p))
            if got is None:
                return total if held else None
            held = True
            batch, more = got
            total.add(batch)
            if not more:
                break
            if over_budget():
                total.more = True
                break
        while not total.more:
            blob_batch = self._write(lambda t: self._collect_blobs(t, holder, ttl_s, name, p))
            if blob_batch is None:
                break
            total.add(blob_batch)
            if blob_batch.blobs < p.batch_blobs:
                break
            if over_budget():
                total.more = True
        self.pruned_total.add(total)
        if total.removed:
            log.info(
                "event=pruned jobs=%d tasks=%d attempts=%d events=%d logs=%d blobs=%d bytes=%d "
                "batches=%d more=%s retention_s=%g holder=%s",
                total.jobs,
                total.tasks,
                total.attempts,
                total.events,
                total.logs,
                total.blobs,
                total.bytes,
                total.batches,
                str(total.more).lower(),
                retention_s,
                holder,
            )
        return total

    def _prune_jobs(
        self,
        t: _Tx,
        holder: str,
        ttl_s: float,
        name: str,
        retention_s: float,
        p: RetentionPolicy,
    ) -> tuple[PruneReport, bool] | None:
        """One batch of finished jobs past retention, in the caller's transaction."""
        if not self._take_lock(t, name, holder, ttl_s):
            return None
        cutoff = t.now - timedelta(seconds=retention_s)
        jc = jobs.c
        # In every statement: never a live job, whatever its age, nor a failed
        # one whose other tasks still run (a failure does not stop them).
        in_flight = sa.exists().where(tasks.c.job_id == jc.id, tasks.c.state.in_(_ACTIVE))
        # Nor a parent a waiting child still depends on (a held child of a failed
        # parent): its job_deps rows would go with it (cascade) and the child would
        # wait forever, with nothing left to retry that could release it.
        child = jobs.alias("child")
        waited_on = (
            sa.exists()
            .where(job_deps.c.parent_id == jc.id, child.c.id == job_deps.c.job_id)
            .where(child.c.state == _WAITING)
        )
        past = sa.and_(
            jc.finished_at < cutoff, jc.state.in_(FINISHED_JOB_STATES), ~in_flight, ~waited_on
        )
        n_tasks = (
            sa.select(sa.func.coalesce(sa.func.sum(stages.c.task_count), 0))
            .where(stages.c.job_id == jc.id)
            .scalar_subquery()
        )
        pick = (
            sa.select(jc.id, n_tasks.label("n_tasks"))
            .where(past)
            .order_by(jc.finished_at, jc.id)
            .limit(p.batch_jobs)
        )
        if self._is_pg:
            pick = pick.with_for_update(of=jobs, skip_locked=True)
        candidates = t.conn.execute(pick).all()
        ids: list[int] = []
        budget = 0
        for row in candidates:
            if ids and budget + int(row.n_tasks) > p.batch_tasks:
                break
            ids.append(int(row.id))
            budget += int(row.n_tasks)
        report = PruneReport(batches=1)
        if not ids:
            return report, False
        job_ids = sa.select(jc.id).where(jc.id.in_(ids), past)
        task_ids = sa.select(tasks.c.id).where(tasks.c.job_id.in_(job_ids))
        attempt_ids = sa.select(attempts.c.id).where(attempts.c.task_id.in_(task_ids))

        def delete(table: sa.Table, where: Any) -> int:
            return int(t.conn.execute(sa.delete(table).where(where)).rowcount or 0)

        # Children first: nothing is left for the foreign keys' cascades to find.
        report.logs = delete(log_chunks, log_chunks.c.attempt_id.in_(attempt_ids))
        report.attempts = delete(attempts, attempts.c.task_id.in_(task_ids))
        delete(task_tags, task_tags.c.task_id.in_(task_ids))
        report.tasks = delete(tasks, tasks.c.job_id.in_(job_ids))
        delete(stages, stages.c.job_id.in_(job_ids))
        delete(agent_job_failures, agent_job_failures.c.job_id.in_(job_ids))
        report.events = delete(events, events.c.job_id.in_(job_ids))
        report.jobs = delete(jobs, sa.and_(jc.id.in_(ids), past))
        self._left_queued.difference_update(ids)
        more = len(candidates) > len(ids) or len(candidates) == p.batch_jobs
        return report, more

    def _blob_refs(self) -> Any:
        """Every digest a task requires or an attempt's outputs name (one column, ``digest``)."""
        if self._is_pg:
            sql = (
                "SELECT r ->> 'digest' AS digest FROM tasks CROSS JOIN LATERAL "
                "json_array_elements(CASE WHEN json_typeof(tasks.requires) = 'array' "
                "THEN tasks.requires ELSE '[]'::json END) AS r "
                "WHERE tasks.requires::text <> '[]' "
                "UNION SELECT o ->> 'digest' FROM attempts CROSS JOIN LATERAL "
                "json_array_elements(CASE WHEN json_typeof(attempts.outputs) = 'array' "
                "THEN attempts.outputs ELSE '[]'::json END) AS o "
                "WHERE attempts.outputs IS NOT NULL AND attempts.outputs::text <> '[]'"
            )
        else:
            sql = (
                "SELECT json_extract(r.value, '$.digest') AS digest FROM tasks, "
                "json_each(CASE WHEN json_type(tasks.requires) = 'array' "
                "THEN tasks.requires ELSE '[]' END) AS r "
                "WHERE tasks.requires <> '[]' "
                "UNION SELECT json_extract(o.value, '$.digest') FROM attempts, "
                "json_each(CASE WHEN json_type(attempts.outputs) = 'array' "
                "THEN attempts.outputs ELSE '[]' END) AS o "
                "WHERE attempts.outputs IS NOT NULL AND attempts.outputs <> '[]'"
            )
        refs = sa.text(sql).columns(digest=sa.String).subquery("refs")
        # NOT IN over a NULL would match nothing: an entry without a digest is no reference.
        return sa.select(refs.c.digest).where(refs.c.digest.is_not(None))

    def _collect_blobs(
        self, t: _Tx, holder: str, ttl_s: float, name: str, p: RetentionPolicy
    ) -> PruneReport | None:
        """One batch of blobs past their grace that nothing kept references."""
        if not self._take_lock(t, name, holder, ttl_s):
            return None
        cutoff = t.now - timedelta(seconds=p.blob_grace_s)
        bc = blobs.c
        victims = (
            sa.select(bc.digest)
            .where(bc.created_at < cutoff, bc.digest.not_in(self._blob_refs()))
            .order_by(bc.created_at)
            .limit(p.batch_blobs)
        )
        # created_at again on the row itself: one refreshed meanwhile is kept.
        sizes = t.conn.execute(
            sa.delete(blobs)
            .where(bc.digest.in_(victims), bc.created_at < cutoff)
            .returning(bc.size)
        ).scalars()
        report = PruneReport(batches=1)
        for size in sizes:
            report.blobs += 1
            report.bytes += int(size)
        return report
