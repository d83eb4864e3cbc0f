"""Control of a job the user already submitted: pause, resume, retry, change (issue 13).

Each operation is one transaction: the job's transition (``JOB_TRANSITIONS``
in ``herder.core.states``) as a compare-and-set, its tasks' transitions as
``UPDATE … WHERE state IN (TASK_SOURCES[event]) RETURNING``, and an event
for each. An operation the job's state does not allow is a ``Conflict``
(409) and changes nothing.

- pause: nothing new starts (the claim only offers tasks of queued or
  running jobs). A waiting job (``depends_on``) is refused (409): none of its
  tasks started, and a pause that outlived the release would need a state of
  its own; cancel or change it instead. With ``kill`` the offered and running
  tasks are preempted: queued again, their attempts cancelled and announced to the cancel
  listeners like ``cancel_job``'s, no failure counted.
- resume: the job runs again (the caller wakes the agents).
- retry: the failed and cancelled tasks of a failed or cancelled job go back
  to queued (blocked in a stage still waiting for its predecessor) with a
  fresh failure budget; the job runs again. A task's ``ram_mb`` keeps what
  memory-aware retry raised it to (the task needed it), but its
  ``memory_failures`` restart at 0: it gets its raises again.
- update: priority, tags, cpus and ram_mb of the tasks not started yet,
  max_attempts of every live task; allowed from every state
  ``JobEvent.UPDATE`` keeps (waiting, queued, running, paused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from herder.api_models import JobView
from herder.core.states import (
    JOB_SOURCES,
    TASK_SOURCES,
    JobEvent,
    JobState,
    TaskEvent,
    task_target,
)
from herder.errors import Conflict, NotFound
from herder.store.common import _ACTIVE_ATTEMPT_SQL
from herder.store.jobs import JobsMixin
from herder.store.schema import attempts, jobs, stages, task_tags, tasks
from herder.store.stops import LIVE_TASK_STATES
from herder.store.tx import _Tx

_NOT_STARTED = ("blocked", "queued")
_WAITING = JobState.WAITING.value
_PREEMPTED = task_target(TaskEvent.PREEMPT).value


@dataclass(frozen=True)
class JobChanges:
    """The fields of a job to change (None: unchanged); validated by ``JobUpdate``."""

    priority: int | None = None
    tags: list[str] | None = None
    cpus: int | None = None
    ram_mb: int | None = None
    gpus: int | None = None
    max_attempts: int | None = None

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _states(event: TaskEvent) -> list[str]:
    return [s.value for s in TASK_SOURCES[event]]


class ControlMixin(JobsMixin):
    """Part of :class:`herder.store.Store`: pause, resume, retry and change a job."""

    def _controlled(self, t: _Tx, job_id: int, event: JobEvent, what: str) -> str:
        """Lock the job; NotFound, or Conflict unless ``event`` is allowed from its state."""
        state = self._lock_job(t, job_id)
        if state is None:
            raise NotFound(f"job {job_id} not found")
        allowed = JOB_SOURCES[event]
        if event is JobEvent.PAUSE and state == _WAITING:
            raise Conflict(
                f"job {job_id} is waiting for the jobs it depends on: none of its tasks "
                "has started, so there is nothing to pause; change it (PATCH), cancel it, "
                "or pause it once it is released",
                detail={"job_id": job_id, "state": state},
            )
        if state not in {s.value for s in allowed}:
            ok = ", ".join(sorted({s.value for s in allowed}))
            raise Conflict(
                f"job {job_id} is {state}: cannot {what} it (only a {ok} job)",
                detail={"job_id": job_id, "state": state},
            )
        return state

    def pause_job(self, job_id: int, *, kill: bool = False) -> JobView:
        """Pause the job; with ``kill`` its offered and running tasks are requeued now."""

        def tx(t: _Tx) -> None:
            self._controlled(t, job_id, JobEvent.PAUSE, "pause")
            reason = "paused by user" + (" (running tasks stopped)" if kill else "")
            self._job_transition(t, job_id, JobEvent.PAUSE, reason)
            if kill:
                self._preempt_tasks(t, job_id)

        self._write(tx)
        return self.get_job(job_id)

    def _preempt_tasks(self, t: _Tx, job_id: int) -> int:
        """Requeue the job's offered and running tasks, cancelling their attempts.

        The tasks are locked first (PostgreSQL), as in ``_stop_tasks``: a
        completion in flight is waited for and the task it finished is left
        alone; one that comes later is fenced (its attempt is cancelled).
        """
        tk = tasks.c
        sources = _states(TaskEvent.PREEMPT)
        sel = sa.select(tk.id).where(tk.job_id == job_id, tk.state.in_(sources))
        if self._is_pg:
            sel = sel.with_for_update()
        if not t.conn.execute(sel).all():  # every row locked, not just the first fetched
            return 0
        rows = t.conn.execute(
            sa.update(tasks)
            .where(tk.job_id == job_id, tk.state.in_(sources))
            .values(state=_PREEMPTED, agent_id=None, updated_at=t.now)
            .returning(tk.id)
        ).all()
        ids = [int(r.id) for r in rows]
        attempt_of: dict[int, tuple[int, str | None]] = {}
        for attempt_id, task_id, agent_id in t.conn.execute(
            sa.update(attempts)
            .where(sa.text(_ACTIVE_ATTEMPT_SQL), attempts.c.task_id.in_(ids))
            .values(state="cancelled", finished_at=t.now, error="job paused")
            .returning(attempts.c.id, attempts.c.task_id, attempts.c.agent_id)
        ):
            attempt_of[int(task_id)] = (int(attempt_id), agent_id)
        for tid in sorted(ids):
            attempt_id, agent_id = attempt_of.get(tid, (None, None))
            t.event(
                f"task.{TaskEvent.PREEMPT.value}",
                job_id=job_id,
                task_id=tid,
                attempt_id=attempt_id,
                agent_id=agent_id,
                to_state=_PREEMPTED,
                reason="job paused: stopped and queued again, no failure counted",
            )
        if attempt_of:
            self._notify_after_commit(t, job_id, attempt_of, "job paused")
        return len(ids)

    def resume_job(self, job_id: int) -> JobView:
        def tx(t: _Tx) -> None:
            self._controlled(t, job_id, JobEvent.RESUME, "resume")
            self._job_transition(t, job_id, JobEvent.RESUME, "resumed by user")

        self._write(tx)
        return self.get_job(job_id)

    def retry_job(self, job_id: int) -> JobView:
        """Failed and cancelled tasks back to queued (or blocked) with fresh budgets; job running."""

        def tx(t: _Tx) -> None:
            self._controlled(t, job_id, JobEvent.RETRY, "retry")
            # The first stage not done yet runs; later ones wait for it (blocked).
            current = t.conn.execute(
                sa.select(sa.func.min(stages.c.position)).where(
                    stages.c.job_id == job_id, stages.c.remaining > 0
                )
            ).scalar()
            if current is None:
                raise Conflict(f"job {job_id}: every task succeeded, nothing to retry")
            self._job_transition(t, job_id, JobEvent.RETRY, "retried by user")
            tk = tasks.c
            for event, stage_cond in (
                (TaskEvent.RETRY, tk.stage <= current),
                (TaskEvent.RETRY_BLOCKED, tk.stage > current),
            ):
                target = task_target(event).value
                rows = t.conn.execute(
                    sa.update(tasks)
                    .where(tk.job_id == job_id, stage_cond, tk.state.in_(_states(event)))
                    .values(
                        state=target,
                        failures=0,
                        infra_failures=0,
                        # ram_mb keeps what memory-aware retry raised it to (it was
                        # needed); the count restarts so the task gets its raises again.
                        memory_failures=0,
                        exit_code=None,
                        error=None,
                        agent_id=None,
                        last_failed_agent_id=None,
                        finished_at=None,
                        updated_at=t.now,
                    )
                    .returning(tk.id)
                ).all()
                for r in sorted(rows, key=lambda r: int(r.id)):
                    t.event(
                        f"task.{event.value}",
                        job_id=job_id,
                        task_id=int(r.id),
                        to_state=target,
                        reason="retried by user: fresh attempt and RAM-raise budgets",
                    )

        self._write(tx)
        return self.get_job(job_id)

    def update_job(self, job_id: int, changes: JobChanges) -> JobView:
        """Change a live job: its tasks not started yet, and max_attempts of every live task."""
        fields = changes.fields()
        if changes.tags is not None:
            fields["tags"] = sorted(set(changes.tags))

        def tx(t: _Tx) -> None:
            self._controlled(t, job_id, JobEvent.UPDATE, "change")
            tk = tasks.c
            not_started = sa.and_(tk.job_id == job_id, tk.state.in_(_NOT_STARTED))
            if changes.priority is not None:
                t.conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(priority=changes.priority, updated_at=t.now)
                )
            values: dict[str, Any] = {
                k: fields[k] for k in ("priority", "cpus", "ram_mb", "gpus") if k in fields
            }
            if "tags" in fields:
                values["tags"] = fields["tags"]
            changed = 0
            if values:
                ids = [
                    int(r.id)
                    for r in t.conn.execute(
                        sa.update(tasks)
                        .where(not_started)
                        .values(**values, updated_at=t.now)
                        .returning(tk.id)
                    )
                ]
                changed = len(ids)
                if changes.tags is not None and ids:
                    t.conn.execute(sa.delete(task_tags).where(task_tags.c.task_id.in_(ids)))
                    rows = [{"task_id": i, "tag": tag} for i in ids for tag in values["tags"]]
                    if rows:
                        t.conn.execute(sa.insert(task_tags), rows)
            if changes.max_attempts is not None:
                t.conn.execute(
                    sa.update(tasks)
                    .where(tk.job_id == job_id, tk.state.in_(LIVE_TASK_STATES))
                    .values(max_attempts=changes.max_attempts, updated_at=t.now)
                )
            shown = " ".join(f"{k}={_shown(v)}" for k, v in sorted(fields.items()))
            t.event(
                "job.update",
                job_id=job_id,
                reason=f"{shown} ({changed} tasks not started)"[:2000],
            )

        self._write(tx)
        return self.get_job(job_id)


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)
