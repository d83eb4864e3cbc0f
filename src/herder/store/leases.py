"""Leases: heartbeat reconciliation, the reaper, maintenance locks (DESIGN §5)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import (
    Heartbeat,
    HeartbeatResponse,
)
from herder.core.rules import (
    DEFAULT_MAINTENANCE_TTL_S,
    Assigned,
    AttemptPhase,
    FailureKind,
    reconcile,
)
from herder.core.states import (
    TASK_SOURCES,
    TaskEvent,
    TaskState,
    task_target,
)
from herder.errors import NotFound
from herder.store.claims import ClaimsMixin
from herder.store.common import (
    _ACTIVE_ATTEMPT_SQL,
    REAPER_LOCK,
)
from herder.store.schema import (
    agents,
    attempts,
    maintenance_lock,
    tasks,
)
from herder.store.stops import job_not_over
from herder.store.tx import _Tx
from herder.store.watch import heartbeat_progress


class LeasesMixin(ClaimsMixin):
    """Part of :class:`herder.store.Store`: leases, reaping and locks."""

    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse:
        """Renew the leases of the agent's current attempts; reconcile both ways.

        ``herder.core.rules.reconcile`` decides: an attempt assigned to this
        agent, acknowledged more than ``heartbeat_grace_s`` ago, that the
        heartbeat does not list is requeued as an infrastructure failure; one
        it lists that is not (or no longer) assigned to it is in ``cancel``.
        """
        listed = {r.attempt_id: r.token for r in hb.running}

        def tx(t: _Tx) -> HeartbeatResponse:
            found = t.conn.execute(
                sa.update(agents)
                .where(agents.c.id == agent_id)
                .values(
                    last_seen_at=t.now,
                    usage=hb.usage.model_dump(mode="json") if hb.usage else None,
                    mode=hb.mode,
                    state="draining"
                    if hb.draining
                    else sa.case((agents.c.drain_requested, "draining"), else_="online"),
                )
                .returning(agents.c.id, agents.c.drain_requested)
            ).first()
            if found is None:
                raise NotFound(f"agent {agent_id} not found")
            lease = t.now + timedelta(seconds=self.lease_s)
            # Everything the database assigns to this agent (the partial index).
            rows = {
                r.id: r
                for r in t.conn.execute(
                    self._active_attempts_query()
                    .add_columns(
                        attempts.c.token,
                        attempts.c.state.label("attempt_state"),
                        attempts.c.started_at,
                        attempts.c.ack_deadline,
                        tasks.c.state.label("task_state"),
                    )
                    .where(attempts.c.agent_id == agent_id)
                    .order_by(attempts.c.task_id)
                )
            }
            rec = reconcile(
                (
                    Assigned(r.id, r.token, AttemptPhase(r.attempt_state), r.started_at)
                    for r in rows.values()
                ),
                listed,
                t.now,
                self.heartbeat_grace_s,
            )
            if rec.renew:
                renew = list(rec.renew)
                t.cur.execute(self._sql.renew(len(renew)), [self._sql.ts(lease), *renew])
                heartbeat_progress(t, hb.running, rec.renew)
            for aid in rec.ack:
                self._ack(t, aid, None, agent_id)
            if hb.mode == "autonomous":
                # No master may be up to reap: an offer made to this agent that it never
                # received (the answer lost with its master) is requeued at its ack deadline,
                # as the reaper would.
                lost = [
                    r
                    for r in rows.values()
                    if r.id not in listed
                    and r.attempt_state == "offered"
                    and r.task_state == TaskState.OFFERED.value
                    and r.ack_deadline is not None
                    and r.ack_deadline < t.now
                ]
                if lost:
                    self._expire_offers(t, lost)
            for aid in rec.requeue:
                self._lease_lost(t, rows[aid], "not reported by its agent's heartbeat")
            return HeartbeatResponse(
                cancel=list(rec.cancel),
                lease_expires_at=lease if rec.renew else None,
                lease_s=self.lease_s,
                drain=bool(found.drain_requested),
            )

        return self._write(tx)

    def _active_attempts_query(self) -> sa.Select[Any]:
        return (
            sa.select(
                attempts.c.id,
                attempts.c.task_id,
                attempts.c.number,
                attempts.c.agent_id,
                tasks.c.job_id,
                tasks.c.failures,
                tasks.c.infra_failures,
                tasks.c.max_attempts,
            )
            .join_from(
                attempts,
                tasks,
                sa.and_(
                    tasks.c.id == attempts.c.task_id, tasks.c.attempt_count == attempts.c.number
                ),
            )
            .where(sa.text(_ACTIVE_ATTEMPT_SQL))
        )

    def _lease_lost(self, t: _Tx, row: Any, reason: str) -> str | None:
        """A running attempt is lost: requeue its task, or fail it once the infra budget is spent."""
        tk = tasks.c
        d = self._decide(FailureKind.LOST, row)
        error = reason if d.retry else f"{reason} (infrastructure budget spent)"
        values = self._failure_values(d, row.agent_id, error, t.now)
        if d.retry:
            del values["error"]  # keep the last command error, if any
        done = t.conn.execute(
            sa.update(tasks)
            .where(
                tk.id == row.task_id,
                tk.attempt_count == row.number,
                tk.state.in_([s.value for s in TASK_SOURCES[TaskEvent.LEASE_EXPIRED]]),
                tk.failures == row.failures,
                tk.infra_failures == row.infra_failures,
                # A terminal job's task is never requeued (herder.store.stops).
                job_not_over() if d.retry else sa.true(),
            )
            .values(**values, updated_at=t.now)
            .returning(tk.state)
        ).first()
        if done is None:
            if d.retry:
                self._stop_if_over(t, row.job_id)
            return None
        t.conn.execute(
            sa.update(attempts)
            .where(attempts.c.id == row.id)
            .values(state="lost", error=reason, finished_at=t.now)
        )
        assert TaskState.RUNNING in TASK_SOURCES[d.event]
        t.event(
            f"task.{d.event.value}",
            job_id=row.job_id,
            task_id=row.task_id,
            attempt_id=row.id,
            agent_id=row.agent_id,
            from_state=TaskState.RUNNING.value,
            to_state=done.state,
            reason=reason,
        )
        if not d.retry:
            self._fail_job(t, row.job_id, f"task {row.task_id} failed: {reason}")
        else:
            t.woke = True
        return str(done.state)

    def reap(self) -> int:
        """Requeue offers past their ack deadline and attempts whose lease expired.

        Returns the number of tasks changed. Safe to run on several masters at
        once (every requeue is a compare-and-set on the task's state and
        attempt number), but periodic reaping goes through ``maintain`` so that
        one master at a time does it.
        """
        return self._write(self._reap)

    def maintain(
        self, holder: str, ttl_s: float = DEFAULT_MAINTENANCE_TTL_S, name: str = REAPER_LOCK
    ) -> int | None:
        """Reap, if ``holder`` holds (or can take) the maintenance lock; ``None`` if not.

        The lock is taken or renewed in the same transaction as the reap: on
        PostgreSQL the lock row stays locked until the reap commits, so two
        masters never reap at once even if a reap outlasts the TTL.
        """

        def tx(t: _Tx) -> int | None:
            if not self._take_lock(t, name, holder, ttl_s):
                return None
            return self._reap(t)

        if self._maintenance_quiet(holder, ttl_s, name):
            return 0
        return self._write(tx)

    def _maintenance_quiet(self, holder: str, ttl_s: float, name: str) -> bool:
        """Nothing is due and ``holder`` holds the lock for over half its TTL: skip the write.

        One read instead of a write transaction each round, so an idle farm does
        not take the writer lock every second (issue 9); the lock is still renewed
        once half its TTL has gone. Reading a little late is harmless: whatever
        falls due after the probe is reaped next round.
        """

        def q(conn: Connection) -> bool:
            now = self._now_fn(conn)
            lock = conn.execute(
                sa.select(maintenance_lock.c.holder, maintenance_lock.c.expires_at).where(
                    maintenance_lock.c.name == name
                )
            ).first()
            if (
                lock is None
                or lock.holder != holder
                or lock.expires_at <= now + timedelta(seconds=ttl_s / 2)
            ):
                return False
            at = attempts.c
            due = conn.execute(
                sa.select(at.id)
                .where(
                    sa.text(_ACTIVE_ATTEMPT_SQL),
                    sa.or_(
                        sa.and_(at.state == "offered", at.ack_deadline < now),
                        sa.and_(at.state == "running", at.lease_expires_at < now),
                    ),
                )
                .limit(1)
            ).first()
            return due is None

        return bool(self._read(q))

    def try_lock(
        self, holder: str, ttl_s: float = DEFAULT_MAINTENANCE_TTL_S, name: str = REAPER_LOCK
    ) -> bool:
        """Take or renew a maintenance lock for ``ttl_s`` (database clock). True if held."""
        return self._write(lambda t: self._take_lock(t, name, holder, ttl_s))

    def release_lock(self, holder: str, name: str = REAPER_LOCK) -> bool:
        """Give a held lock up now (graceful shutdown), so another master takes over at once."""

        def tx(t: _Tx) -> bool:
            ml = maintenance_lock.c
            done = t.conn.execute(
                sa.update(maintenance_lock)
                .where(ml.name == name, ml.holder == holder)
                .values(expires_at=t.now - timedelta(seconds=1))
                .returning(ml.name)
            ).first()
            return done is not None

        return self._write(tx)

    def lock_holder(self, name: str = REAPER_LOCK) -> tuple[str, datetime] | None:
        """``(holder, expires_at)`` of a lock row, held or not; None if never taken."""

        def q(conn: Connection) -> tuple[str, datetime] | None:
            row = conn.execute(
                sa.select(maintenance_lock.c.holder, maintenance_lock.c.expires_at).where(
                    maintenance_lock.c.name == name
                )
            ).first()
            return None if row is None else (str(row.holder), row.expires_at)

        return self._read(q)

    def _take_lock(self, t: _Tx, name: str, holder: str, ttl_s: float) -> bool:
        """herder.core.rules.may_take_lock as one conditional UPDATE, then insert-if-missing.

        Race-free: on PostgreSQL a concurrent UPDATE of the row waits for the
        first and re-checks the condition on the new row; the INSERT … ON
        CONFLICT DO NOTHING lets exactly one of two first-comers create it.
        """
        ml = maintenance_lock.c
        expires = t.now + timedelta(seconds=ttl_s)
        got = t.conn.execute(
            sa.update(maintenance_lock)
            .where(ml.name == name, sa.or_(ml.holder == holder, ml.expires_at < t.now))
            .values(holder=holder, expires_at=expires)
            .returning(ml.name)
        ).first()
        if got is not None:
            return True
        ins = self._insert_ignore(maintenance_lock).values(
            name=name, holder=holder, expires_at=expires
        )
        return t.conn.execute(ins.returning(ml.name)).first() is not None

    def _expire_offers(self, t: _Tx, unacked: Sequence[Any]) -> int:
        """Requeue offers past their ack deadline (compare-and-set on state and attempt)."""
        n = 0
        target = task_target(TaskEvent.OFFER_EXPIRED).value
        for row in unacked:
            d = self._decide(FailureKind.UNACKED, row)
            assert d.event is TaskEvent.OFFER_EXPIRED and d.retry
            done = t.conn.execute(
                sa.update(tasks)
                .where(
                    tasks.c.id == row.task_id,
                    tasks.c.attempt_count == row.number,
                    tasks.c.state.in_([s.value for s in TASK_SOURCES[TaskEvent.OFFER_EXPIRED]]),
                    job_not_over(),
                )
                .values(state=target, agent_id=None, updated_at=t.now)
                .returning(tasks.c.id)
            ).first()
            if done is None:
                self._stop_if_over(t, row.job_id)
                continue
            reason = "offer not acknowledged in time"
            t.conn.execute(
                sa.update(attempts)
                .where(attempts.c.id == row.id)
                .values(state="lost", error=reason, finished_at=t.now)
            )
            t.event(
                f"task.{TaskEvent.OFFER_EXPIRED.value}",
                job_id=row.job_id,
                task_id=row.task_id,
                attempt_id=row.id,
                agent_id=row.agent_id,
                from_state=TaskState.OFFERED.value,
                to_state=target,
                reason=reason,
            )
            n += 1
        return n

    def _reap(self, t: _Tx) -> int:
        n = 0
        unacked = t.conn.execute(
            self._active_attempts_query()
            .where(
                attempts.c.state == "offered",
                tasks.c.state == TaskState.OFFERED.value,
                attempts.c.ack_deadline < t.now,
            )
            .order_by(attempts.c.task_id)
        ).all()
        n += self._expire_offers(t, unacked)
        expired = t.conn.execute(
            self._active_attempts_query()
            .where(
                attempts.c.state == "running",
                tasks.c.state == TaskState.RUNNING.value,
                attempts.c.lease_expires_at < t.now,
            )
            .order_by(attempts.c.task_id)
        ).all()
        for row in expired:
            if self._lease_lost(t, row, "lease expired") is not None:
                n += 1
        if n:
            t.woke = True
        n += self._expire_inputs(t)  # jobs whose inputs never came (herder.store.inputs)
        return n
