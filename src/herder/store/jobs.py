"""Jobs: submission, reads, cancellation, job transitions and stage bookkeeping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from herder.api_models import (
    JobSubmit,
    JobSummary,
    JobView,
    TaskView,
)
from herder.core.states import (
    JOB_SOURCES,
    JOB_TERMINAL,
    TASK_SOURCES,
    JobEvent,
    JobState,
    TaskEvent,
    TaskState,
    next_job_state,
    task_target,
)
from herder.errors import NotFound
from herder.frames import dispatch_ids
from herder.store import views
from herder.store.acl import AclMixin
from herder.store.common import (
    _CLAIMABLE_JOB_STATES,
    SubmittedJob,
)
from herder.store.inputs import InputsMixin
from herder.store.schema import (
    attempts,
    jobs,
    stages,
    tasks,
)
from herder.store.shares import SharesMixin
from herder.store.sql import _TASK_COLUMNS
from herder.store.tx import _Tx

T = TypeVar("T")


# Every idle poll asks this (``has_claimable_work``): built once, not per call.
_HAS_CLAIMABLE = (
    sa.select(tasks.c.id)
    .where(
        tasks.c.state == TaskState.QUEUED.value,
        tasks.c.placement == "remote",
        sa.exists().where(jobs.c.id == tasks.c.job_id, jobs.c.state.in_(_CLAIMABLE_JOB_STATES)),
    )
    .limit(1)
)


class JobsMixin(InputsMixin, SharesMixin, AclMixin):
    """Part of :class:`herder.store.Store`: jobs and their stages."""

    def submit(self, spec: JobSubmit, *, hold_inputs: bool = False) -> SubmittedJob:
        """Insert a job with its stages and tasks; the same idempotency key yields the same job.

        Builds no views: ``SubmittedJob(id, created, task_ids)``, task ids in
        submission order (a job of 100,000 tasks costs its rows, not its models).
        ``hold_inputs``: a job whose required blobs are not all stored waits for
        them (herder.store.inputs; ``missing_inputs`` lists them).
        """
        key = spec.idempotency_key

        def existing(conn: Connection) -> int | None:
            found = conn.execute(sa.select(jobs.c.id).where(jobs.c.idempotency_key == key)).scalar()
            return None if found is None else int(found)

        def tx(t: _Tx) -> SubmittedJob:
            if key is not None:
                job_id = existing(t.conn)
                if job_id is not None:
                    self._refuse_self_dependency(spec, job_id)
                    if hold_inputs:
                        self._recheck_inputs(t, job_id)  # resumed: what is still missing
                    return SubmittedJob(job_id, False, self._task_ids(t.cur, job_id))
            job_id, ids = self._insert_job(t, spec, hold_inputs)
            return SubmittedJob(job_id, True, ids)

        try:
            return self._write(tx)
        except IntegrityError:
            if key is None:
                raise
            # A concurrent submission with the same key won the race: return its job.
            found = self._read(existing)
            if found is None:
                raise
            ids = self._read(
                lambda c: self._task_ids(c.connection.driver_connection.cursor(), found)  # type: ignore[union-attr]
            )
            return SubmittedJob(found, False, ids)

    def submit_job(self, spec: JobSubmit) -> tuple[JobView, bool]:
        """``submit``, answered with the job's view: ``(job, created)``."""
        sub = self.submit(spec)
        return self.get_job(sub.id), sub.created

    def _task_ids(self, cur: Any, job_id: int) -> list[int]:
        ids = [int(r[0]) for r in cur.execute(self._sql.task_ids, (job_id,)).fetchall()]
        return self._in_submission_order(cur, job_id, ids)

    def _alloc_task_ids(self, t: _Tx, n: int) -> list[int]:
        """``n`` new task ids, ascending (submission order is id order)."""
        if self._is_pg:
            return sorted(int(r[0]) for r in t.cur.execute(self._sql.alloc_task_ids, (n,)))
        # SQLite: the writer holds the database's write lock (BEGIN IMMEDIATE), and a
        # rowid table without AUTOINCREMENT numbers new rows max(id) + 1, … as well.
        top = int(t.cur.execute(self._sql.alloc_task_ids).fetchone()[0])
        return list(range(top + 1, top + 1 + n))

    def _insert_job(
        self, t: _Tx, spec: JobSubmit, hold_inputs: bool = False
    ) -> tuple[int, list[int]]:
        conn, now = t.conn, t.now
        # First: its locks come before any other (herder.store.inputs).
        missing = self._missing_at_submit(t, spec) if hold_inputs else []
        self._require_may_submit(t, spec.pool, spec.owner)  # the pool's ACL: 403, nothing written
        for_parents = self._initial_state(t, spec)  # depends_on (herder.store.deps)
        # Held until its inputs are uploaded, too.
        job_state = JobState.WAITING if missing else for_parents
        job_id = conn.execute(
            sa.insert(jobs)
            .values(
                name=spec.name,
                owner=spec.owner,
                pool=spec.pool,
                priority=spec.priority,
                state=job_state.value,
                idempotency_key=spec.idempotency_key,
                stage_count=len(spec.stages),
                on_parent_failure=spec.on_parent_failure,
                frame_order=spec.frame_order,
                created_at=now,
                updated_at=now,
            )
            .returning(jobs.c.id)
        ).scalar_one()
        conn.execute(
            sa.insert(stages),
            [
                {
                    "job_id": job_id,
                    "position": i,
                    "name": s.name,
                    "task_count": len(s.tasks),
                    "remaining": len(s.tasks),
                }
                for i, s in enumerate(spec.stages)
            ],
        )
        n = sum(len(s.tasks) for s in spec.stages)
        # Ids in claim order (frame_order), listed in submission order.
        ids = dispatch_ids(
            self._alloc_task_ids(t, n), [len(s.tasks) for s in spec.stages], spec.frame_order
        )
        js = self._sql.js
        at = t.at
        prio = spec.priority
        # Places in the owner's weighted queue, in the same order as the ids (fair share).
        key_of = dict(zip(sorted(ids), self._assign_share_keys(t, spec.owner, n), strict=True))
        rows: list[tuple[Any, ...]] = []
        tag_rows: list[tuple[int, str]] = []
        it = iter(ids)
        for i, s in enumerate(spec.stages):
            state = (
                TaskState.QUEUED.value
                if i == 0 and job_state is JobState.QUEUED
                else TaskState.BLOCKED.value
            )
            for ts in s.tasks:
                tid = next(it)
                tags = sorted(set(ts.tags)) if ts.tags else []
                for tag in tags:
                    tag_rows.append((tid, tag))
                rows.append(
                    (
                        tid,
                        job_id,
                        i,
                        prio,
                        ts.name,
                        state,
                        js(ts.command),
                        ts.placement,
                        js([r.model_dump(mode="json") for r in ts.requires])
                        if ts.requires
                        else "[]",
                        "null" if ts.outputs is None else js(ts.outputs),
                        js(ts.env) if ts.env else "{}",
                        js(tags) if tags else "[]",
                        ts.timeout_s,
                        ts.max_attempts,
                        ts.cpus,
                        ts.ram_mb,
                        0,
                        0,
                        0,
                        at,
                        at,
                        ts.progress_pattern,
                        ts.stuck_timeout_s,
                        ts.gpus,
                        key_of[tid],
                    )
                )
        if self._is_pg:  # COPY: the cheapest bulk insert (no per-row statement)
            with t.cur.copy(f"COPY tasks ({_TASK_COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            if tag_rows:
                with t.cur.copy("COPY task_tags (task_id, tag) FROM STDIN") as copy:
                    for tag_row in tag_rows:
                        copy.write_row(tag_row)
        else:
            t.cur.executemany(self._sql.insert_tasks, rows)
            if tag_rows:
                t.cur.executemany(self._sql.insert_task_tags, tag_rows)
        waits = ", ".join(map(str, spec.depends_on)) if for_parents is JobState.WAITING else ""
        t.event(
            "job.submit",
            job_id=job_id,
            to_state=job_state.value,
            reason=f"{len(ids)} tasks in {len(spec.stages)} stages"
            + (f", waiting for job {waits}" if waits else "")
            + (f", waiting for {len(missing)} inputs to be uploaded" if missing else ""),
        )
        self._insert_deps(t, int(job_id), spec)
        self._hold_for_inputs(t, int(job_id), missing)
        return int(job_id), ids

    def get_job(self, job_id: int, *, include_tasks: bool = True) -> JobView:
        def q(conn: Connection) -> JobView:
            job = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            if job is None:
                raise NotFound(f"job {job_id} not found")
            stage_rows = conn.execute(
                sa.select(stages).where(stages.c.job_id == job_id).order_by(stages.c.position)
            ).all()
            counts: dict[int, dict[str, int]] = {}
            for stage, state, n in conn.execute(
                sa.select(tasks.c.stage, tasks.c.state, sa.func.count())
                .where(tasks.c.job_id == job_id)
                .group_by(tasks.c.stage, tasks.c.state)
            ):
                counts.setdefault(stage, {})[state] = n
            task_rows: Sequence[Any] = ()
            by_task: dict[int, list[Any]] = {}
            if include_tasks:
                task_rows = conn.execute(
                    sa.select(tasks).where(tasks.c.job_id == job_id).order_by(tasks.c.id)
                ).all()
                for a in conn.execute(
                    sa.select(attempts)
                    .join(tasks, tasks.c.id == attempts.c.task_id)
                    .where(tasks.c.job_id == job_id)
                    .order_by(attempts.c.task_id, attempts.c.number)
                ):
                    by_task.setdefault(a.task_id, []).append(a)
            view = views.job_view(job, stage_rows, task_rows, by_task, counts, include_tasks)
            view.depends_on, view.dependents = self._job_links(conn, job_id)
            return view

        return self._read(q)

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobSummary]:
        def q(conn: Connection) -> list[JobSummary]:
            stmt = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
            if state is not None:
                stmt = stmt.where(jobs.c.state == state)
            rows = conn.execute(stmt).all()
            counts: dict[int, dict[str, int]] = {}
            if rows:
                for jid, st, n in conn.execute(
                    sa.select(tasks.c.job_id, tasks.c.state, sa.func.count())
                    .where(tasks.c.job_id.in_([r.id for r in rows]))
                    .group_by(tasks.c.job_id, tasks.c.state)
                ):
                    counts.setdefault(jid, {})[st] = n
            return [views.job_summary(r, counts.get(r.id, {})) for r in rows]

        return self._read(q)

    def cancel_job(self, job_id: int, reason: str = "cancelled by user") -> JobView:
        """Cancel the job and every live task of it (running attempts too), in one transaction.

        A job that is already terminal keeps its state; whatever of it is still
        live (a database from before jobs stopped at once) is cancelled too.
        """

        def tx(t: _Tx) -> None:
            state = self._lock_job(t, job_id)
            if state is None:
                raise NotFound(f"job {job_id} not found")
            if state in JOB_TERMINAL:
                self._stop_tasks(t, job_id, f"job already {state}: {reason}")
                return
            self._job_transition(t, job_id, JobEvent.CANCEL, reason)
            self._stop_tasks(t, job_id, reason)

        self._write(tx)
        return self.get_job(job_id)

    def _job_transition(self, t: _Tx, job_id: int, event: JobEvent, reason: str | None) -> bool:
        """Compare-and-set of a job's state, guarded by ``JOB_SOURCES[event]``."""
        if event is JobEvent.RETRY:  # it runs again: its pool's ACL is checked as at submission
            self._require_job_may_run(t, job_id)
        stmt = sa.select(jobs.c.state).where(jobs.c.id == job_id)
        if self._is_pg:
            stmt = stmt.with_for_update()
        current = t.conn.execute(stmt).scalar()
        if current is None or current not in JOB_SOURCES[event]:
            return False
        target = next_job_state(JobState(current), event)
        values: dict[str, Any] = {"state": target.value, "updated_at": t.now}
        if target in JOB_TERMINAL:
            values["finished_at"] = t.now
        done = t.conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state == current)
            .values(**values)
            .returning(jobs.c.id)
        ).first()
        if done is None:
            return False
        t.event(
            f"job.{event.value}",
            job_id=job_id,
            from_state=current,
            to_state=target.value,
            reason=reason,
        )
        self._after_job_transition(t, job_id, event, target.value)  # depends_on
        return True

    def _fail_job(self, t: _Tx, job_id: int, reason: str) -> None:
        """A task failed for good: fail the job and stop all its work (DESIGN §2)."""
        self._job_transition(t, job_id, JobEvent.FAIL, reason)
        self._stop_tasks(t, job_id, f"job failed: {reason}")

    def _flush_stages(self, t: _Tx) -> None:
        """Count the transaction's successes against their stages (sorted: one lock order)."""
        for key in sorted(t.stage_done):
            self._flush_stage(t, key)

    def _flush_stage(self, t: _Tx, key: tuple[int, int]) -> None:
        """One UPDATE of a stage's counter for all its successes; the last one queues the next stage."""
        n = t.stage_done.pop(key, 0)
        if not n:
            return
        job_id, stage = key
        row = t.cur.execute(self._sql.stage_done, (n, job_id, stage)).fetchone()
        if row is None or row[0] > 0:
            return
        self._stage_finished(t, job_id, stage)

    def _stage_finished(self, t: _Tx, job_id: int, stage: int) -> None:
        stage_count = t.conn.execute(
            sa.select(jobs.c.stage_count).where(jobs.c.id == job_id)
        ).scalar_one()
        if stage + 1 < stage_count:
            target = task_target(TaskEvent.UNBLOCK).value
            rows = (
                t.conn.execute(
                    sa.update(tasks)
                    .where(
                        tasks.c.job_id == job_id,
                        tasks.c.stage == stage + 1,
                        tasks.c.state.in_([s.value for s in TASK_SOURCES[TaskEvent.UNBLOCK]]),
                    )
                    .values(state=target, updated_at=t.now)
                    .returning(tasks.c.id)
                )
                .scalars()
                .all()
            )
            for tid in rows:
                t.event(
                    f"task.{TaskEvent.UNBLOCK.value}",
                    job_id=job_id,
                    task_id=tid,
                    from_state=TaskState.BLOCKED.value,
                    to_state=target,
                    reason=f"stage {stage} succeeded",
                )
            if rows:
                t.woke = True
        else:
            self._job_transition(t, job_id, JobEvent.SUCCEED, "every task succeeded")

    def get_task(self, task_id: int) -> TaskView:
        def q(conn: Connection) -> TaskView:
            row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).first()
            if row is None:
                raise NotFound(f"task {task_id} not found")
            att = conn.execute(
                sa.select(attempts).where(attempts.c.task_id == task_id).order_by(attempts.c.number)
            ).all()
            return views.task_view(row, att)

        return self._read(q)

    def has_claimable_work(self) -> bool:
        """Whether a remote task of a queued or running job is queued: one probe of the claim index.

        Queued tasks of other jobs (paused, or terminal in a database from
        before jobs stopped at once) are not work: counting them would wake
        every parked claim each recheck for nothing.
        """
        return self._read(lambda c: c.execute(_HAS_CLAIMABLE).first() is not None)
