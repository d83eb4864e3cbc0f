"""Stopping a job's work: a failed or cancelled job cancels every live task at once.

When a job leaves for a terminal state (a task failed for good, a user
cancelled it), every task of it that is not terminal yet is cancelled in the
same transaction: blocked and queued ones, and offered and running ones with
their active attempts, one ``task.cancel`` event each. Nothing of a terminal
job is queued or offered again: the requeue paths (lease lost, offer expired,
retryable failure, release) carry ``job_not_over()`` in their UPDATE, and the
claim only offers tasks of queued or running jobs (``herder.store.sql``).

The attempts cancelled while they were offered or running are announced
after the commit to the store's cancel listeners
(:meth:`StopsMixin.add_cancel_listener`): a master sends talkback ``cancel``
to their agents, the embedded farm cancels them on its in-process agent.
Listeners only cut latency: an agent that is not told still learns it at its
next heartbeat, whose answer lists every attempt it runs that is no longer
active (``herder.core.rules.reconcile``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from herder.core.states import JOB_TERMINAL, TASK_SOURCES, TaskEvent, task_target
from herder.store.common import _ACTIVE, _ACTIVE_ATTEMPT_SQL
from herder.store.schema import agents, attempts, jobs, tasks
from herder.store.tx import StoreBase, _Tx

log = logging.getLogger("herder.store")

# Every non-terminal task state, in the transition table's order.
LIVE_TASK_STATES: tuple[str, ...] = tuple(s.value for s in TASK_SOURCES[TaskEvent.CANCEL])
_TERMINAL_JOB_STATES: tuple[str, ...] = tuple(sorted(s.value for s in JOB_TERMINAL))
_CANCELLED = task_target(TaskEvent.CANCEL).value


@dataclass(frozen=True)
class CancelledAttempt:
    """An attempt cancelled while offered or running: its agent should kill it now.

    ``talkback_url``/``talkback_token``: the agent's talkback endpoint, read in
    the cancelling transaction (None: the agent has none; its heartbeat tells it).
    """

    agent_id: str
    attempt_id: int
    job_id: int
    task_id: int
    reason: str
    talkback_url: str | None = None
    talkback_token: str | None = None


CancelListener = Callable[[Sequence[CancelledAttempt]], None]


def job_not_over() -> sa.ColumnElement[bool]:
    """SQL: the task's job is not terminal (a guard for every UPDATE that requeues a task)."""
    return sa.not_(
        sa.exists().where(jobs.c.id == tasks.c.job_id, jobs.c.state.in_(_TERMINAL_JOB_STATES))
    )


class StopsMixin(StoreBase):
    """Part of :class:`herder.store.Store`: cancelling the live work of a job."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._cancel_listeners: list[CancelListener] = []
        self._listeners_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def add_cancel_listener(self, fn: CancelListener) -> None:
        """Call ``fn(cancelled)`` after each commit that cancelled offered or running attempts.

        It runs in the thread that ran the transaction, after the commit, and
        must not block (hand the work to another thread or loop).
        """
        with self._listeners_lock:
            self._cancel_listeners.append(fn)

    def remove_cancel_listener(self, fn: CancelListener) -> None:
        with self._listeners_lock:
            if fn in self._cancel_listeners:
                self._cancel_listeners.remove(fn)

    def _announce_cancelled(self, cancelled: Sequence[CancelledAttempt]) -> None:
        with self._listeners_lock:
            listeners = list(self._cancel_listeners)
        for fn in listeners:
            try:
                fn(cancelled)
            except Exception:  # a listener cuts latency only: the heartbeat still cancels
                log.exception("event=cancel_listener_failed attempts=%d", len(cancelled))

    def _lock_job(self, t: _Tx, job_id: int) -> str | None:
        """The job's state, its row locked until commit (PostgreSQL; SQLite has one writer)."""
        stmt = sa.select(jobs.c.state).where(jobs.c.id == job_id)
        if self._is_pg:
            stmt = stmt.with_for_update()
        state = t.conn.execute(stmt).scalar()
        return None if state is None else str(state)

    def _stop_tasks(self, t: _Tx, job_id: int, reason: str) -> int:
        """Cancel every live task of the job, their active attempts too; returns how many.

        The live tasks are locked first (``FOR UPDATE`` on PostgreSQL): a
        transition in flight (a requeue, an ack, a claim) is waited for, and
        its result is what gets cancelled, so no task escapes to ``queued``
        between two statements. The UPDATE is guarded by the same states.
        """
        tk = tasks.c
        live = tk.state.in_(LIVE_TASK_STATES)
        sel = sa.select(tk.id, tk.state).where(tk.job_id == job_id, live).order_by(tk.id)
        if self._is_pg:
            sel = sel.with_for_update()
        before = {int(r.id): str(r.state) for r in t.conn.execute(sel)}
        if not before:
            return 0
        rows = t.conn.execute(
            sa.update(tasks)
            .where(tk.job_id == job_id, live)
            .values(state=_CANCELLED, updated_at=t.now, finished_at=t.now)
            .returning(tk.id, tk.agent_id)
        ).all()
        attempt_of: dict[int, tuple[int, str | None]] = {}
        if any(s in _ACTIVE for s in before.values()):
            # The active attempts of the job's tasks (the partial index on attempts).
            for attempt_id, task_id, agent_id in t.conn.execute(
                sa.update(attempts)
                .where(
                    sa.text(_ACTIVE_ATTEMPT_SQL),
                    attempts.c.task_id.in_(sa.select(tk.id).where(tk.job_id == job_id)),
                )
                .values(state="cancelled", finished_at=t.now, error=reason)
                .returning(attempts.c.id, attempts.c.task_id, attempts.c.agent_id)
            ):
                attempt_of[int(task_id)] = (int(attempt_id), agent_id)
        for r in sorted(rows, key=lambda r: int(r.id)):
            src = before.get(int(r.id), "unknown")
            attempt_id, agent_id = attempt_of.get(int(r.id), (None, None))
            t.event(
                f"task.{TaskEvent.CANCEL.value}",
                job_id=job_id,
                task_id=int(r.id),
                attempt_id=attempt_id,
                agent_id=(agent_id or r.agent_id) if src in _ACTIVE else None,
                from_state=src,
                to_state=_CANCELLED,
                reason=reason,
            )
        if attempt_of:
            self._notify_after_commit(t, job_id, attempt_of, reason)
        return len(rows)

    def _notify_after_commit(
        self,
        t: _Tx,
        job_id: int,
        attempt_of: dict[int, tuple[int, str | None]],
        reason: str,
    ) -> None:
        """Queue the listeners' call, with each agent's talkback endpoint, for after the commit."""
        agent_ids = sorted({a for _, a in attempt_of.values() if a is not None})
        endpoints: dict[str, tuple[str | None, str | None]] = {}
        if agent_ids:
            endpoints = {
                r.id: (r.talkback_url, r.talkback_token)
                for r in t.conn.execute(
                    sa.select(agents.c.id, agents.c.talkback_url, agents.c.talkback_token).where(
                        agents.c.id.in_(agent_ids)
                    )
                )
            }
        cancelled = [
            CancelledAttempt(
                agent_id=agent_id,
                attempt_id=attempt_id,
                job_id=job_id,
                task_id=task_id,
                reason=reason,
                talkback_url=endpoints.get(agent_id, (None, None))[0],
                talkback_token=endpoints.get(agent_id, (None, None))[1],
            )
            for task_id, (attempt_id, agent_id) in sorted(attempt_of.items())
            if agent_id is not None
        ]
        if cancelled:
            t.after_commit.append(lambda: self._announce_cancelled(cancelled))

    def _stop_if_over(self, t: _Tx, job_id: int) -> int:
        """A requeue was refused: if the job is terminal, cancel what of it is still live.

        Heals a database from before jobs stopped their work at once (a failed
        job with running tasks); costs one primary-key read otherwise.
        """
        state = self._lock_job(t, job_id)
        if state is None or state not in _TERMINAL_JOB_STATES:
            return 0
        return self._stop_tasks(t, job_id, f"job {state}")
