"""Job dependencies (issue 13, DESIGN §2; seeds/001 "job relationship information").

A job may name parent jobs at submission (``depends_on``). Until every parent
succeeded it is ``waiting``: its first stage's tasks are inserted ``blocked``
(so the claim's index never sees them) and ``waiting`` is not a state the
claim offers tasks of. Parents exist before their children, so the graph has
no cycle; a job naming itself is refused.

Every change happens in the transaction of the parent's own transition
(``JobsMixin._job_transition`` calls :meth:`DepsMixin._after_job_transition`):

- a parent succeeded: each waiting child whose parents all succeeded now is
  released (``waiting → queued``, ``job.release``) and its first stage's
  tasks are unblocked;
- a parent failed or was cancelled: each waiting child with
  ``on_parent_failure = "fail"`` fails (its tasks cancelled, as a job stop
  does, and its own children are judged in turn); one with ``"hold"`` stays
  waiting with a ``job.hold`` event: a retry of the parent that succeeds
  releases it;
- a retried job (``retry``) whose parents have not all succeeded is refused
  (409): it would run before them.

At the door: an unknown parent is a 422 naming it; a parent already failed or
cancelled is a 422 as well when the child would fail at once
(``on_parent_failure = "fail"``): nothing is written, and the client learns
it now rather than from a job that never ran. With ``"hold"`` the child is
created waiting and held. Parents that all succeeded already: the child
starts queued.

Concurrency (PostgreSQL, read committed): a submission locks its parents
``FOR SHARE`` and a finishing parent holds its row ``FOR UPDATE``, so a child
is either seen by its parent's transition or sees the parent's new state. A
parent's transition locks the waiting children before it reads their other
parents: two parents finishing at once are serialized on the child, and the
second sees the first one's commit. Locks go parent before child, as the
graph does. SQLite has one writer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import JobLink, JobSubmit
from herder.core.states import (
    JOB_SOURCES,
    TASK_SOURCES,
    JobEvent,
    JobState,
    TaskEvent,
    TaskState,
    next_job_state,
    task_target,
)
from herder.errors import Conflict, InvalidRequest
from herder.frames import dispatch_ids
from herder.store.schema import job_deps, jobs, tasks
from herder.store.stops import StopsMixin
from herder.store.tx import _Tx
from herder.store.views import job_href

_WAITING = JobState.WAITING.value
_SUCCEEDED = JobState.SUCCEEDED.value
_FAILED_PARENT = (JobState.FAILED.value, JobState.CANCELLED.value)
# The transition table says where a waiting job goes (checked at import).
assert JobState.WAITING in JOB_SOURCES[JobEvent.RELEASE]
assert JobState.WAITING in JOB_SOURCES[JobEvent.FAIL]
_RELEASED = next_job_state(JobState.WAITING, JobEvent.RELEASE).value
_FAILED = next_job_state(JobState.WAITING, JobEvent.FAIL).value
_UNBLOCKED = task_target(TaskEvent.UNBLOCK).value
_UNBLOCK_SOURCES = [s.value for s in TASK_SOURCES[TaskEvent.UNBLOCK]]


def _ids(values: Iterable[int]) -> str:
    return ", ".join(str(v) for v in values)


class DepsMixin(StopsMixin):
    """Part of :class:`herder.store.Store`: ``depends_on``, held and released jobs."""

    if TYPE_CHECKING:

        def _job_transition(
            self, t: _Tx, job_id: int, event: JobEvent, reason: str | None
        ) -> bool: ...

        # herder.store.inputs: jobs still missing an uploaded input.
        def _held_for_inputs(self, conn: Connection, job_ids: Sequence[int]) -> set[int]: ...
        def _refuse_retry_without_inputs(self, t: _Tx, job_id: int) -> None: ...

    # ------------------------------------------------------------ submission

    def _initial_state(self, t: _Tx, spec: JobSubmit) -> JobState:
        """Check ``spec.depends_on`` (parents locked, PostgreSQL); the new job's state.

        InvalidRequest (422, nothing written) for an unknown parent, or a
        failed or cancelled one when the child would fail at once.
        """
        parents = spec.depends_on
        if not parents:
            return JobState.QUEUED
        found = self._parent_states(t, parents)
        unknown = [p for p in parents if p not in found]
        if unknown:
            raise InvalidRequest(
                f"depends_on: no job {_ids(unknown)}",
                detail={"field": "depends_on", "unknown": unknown},
            )
        bad = [p for p in parents if found[p] in _FAILED_PARENT]
        if bad and spec.on_parent_failure == "fail":
            shown = ", ".join(f"{p} ({found[p]})" for p in bad)
            raise InvalidRequest(
                f"depends_on: job {shown} did not succeed, so this job would fail at once; "
                'retry the parent first, or submit with on_parent_failure = "hold"',
                detail={
                    "field": "depends_on",
                    "failed": [{"id": p, "state": found[p]} for p in bad],
                },
            )
        if all(found[p] == _SUCCEEDED for p in parents):
            return JobState.QUEUED
        return JobState.WAITING

    def _parent_states(self, t: _Tx, parents: Sequence[int]) -> dict[int, str]:
        stmt = sa.select(jobs.c.id, jobs.c.state).where(jobs.c.id.in_(parents)).order_by(jobs.c.id)
        if self._is_pg:
            stmt = stmt.with_for_update(read=True)  # FOR SHARE: see the docstring
        return {int(r.id): str(r.state) for r in t.conn.execute(stmt)}

    def _insert_deps(self, t: _Tx, job_id: int, spec: JobSubmit) -> None:
        """The new job's edges to its parents (checked by ``_initial_state``); held at once
        when a parent already failed."""
        if not spec.depends_on:
            return
        if job_id in spec.depends_on:  # a parent id that did not exist yet: never, but cheap
            raise InvalidRequest(f"job {job_id} cannot depend on itself")
        t.conn.execute(
            sa.insert(job_deps), [{"job_id": job_id, "parent_id": p} for p in spec.depends_on]
        )
        found = self._parent_states(t, spec.depends_on)
        for p in spec.depends_on:
            if found.get(p) in _FAILED_PARENT:
                self._hold_event(t, job_id, p, found[p])

    def _refuse_self_dependency(self, spec: JobSubmit, job_id: int) -> None:
        """A resubmission (same idempotency key) that names its own job as a parent."""
        if job_id in spec.depends_on:
            raise InvalidRequest(
                f"depends_on: job {job_id} is this job (idempotency key "
                f"{spec.idempotency_key!r}): a job cannot depend on itself",
                detail={"field": "depends_on", "self": job_id},
            )

    def _in_submission_order(self, cur: Any, job_id: int, ids: list[int]) -> list[int]:
        """A job's task ids (ascending) back in submission order (its frame order)."""
        p = "%s" if self._is_pg else "?"
        row = cur.execute(f"SELECT frame_order FROM jobs WHERE id = {p}", (job_id,)).fetchone()
        if row is None or row[0] == "sequential":
            return ids
        sizes = [
            int(r[0])
            for r in cur.execute(
                f"SELECT task_count FROM stages WHERE job_id = {p} ORDER BY position", (job_id,)
            ).fetchall()
        ]
        return dispatch_ids(ids, sizes, str(row[0]))

    # ------------------------------------------------------------ transitions

    def _after_job_transition(self, t: _Tx, job_id: int, event: JobEvent, target: str) -> None:
        """Called by every job transition, in its transaction (see the module's docstring)."""
        if target == _SUCCEEDED:
            self._release_children(t, job_id)
        elif target in _FAILED_PARENT:
            self._parent_failed(t, job_id, target)
        elif event is JobEvent.RETRY:
            self._refuse_early_retry(t, job_id)
            self._refuse_retry_without_inputs(t, job_id)  # herder.store.inputs

    def _waiting_children(self, t: _Tx, parent_id: int) -> list[Any]:
        stmt = (
            sa.select(jobs.c.id, jobs.c.on_parent_failure)
            .join(job_deps, job_deps.c.job_id == jobs.c.id)
            .where(job_deps.c.parent_id == parent_id, jobs.c.state == _WAITING)
            .order_by(jobs.c.id)
        )
        if self._is_pg:
            stmt = stmt.with_for_update(of=jobs)
        return list(t.conn.execute(stmt))

    def _unsucceeded_parents(
        self, conn: Connection, job_ids: Sequence[int]
    ) -> dict[int, list[int]]:
        parent = jobs.alias("parent")
        rows = conn.execute(
            sa.select(job_deps.c.job_id, job_deps.c.parent_id)
            .join(parent, parent.c.id == job_deps.c.parent_id)
            .where(job_deps.c.job_id.in_(job_ids), parent.c.state != _SUCCEEDED)
            .order_by(job_deps.c.job_id, job_deps.c.parent_id)
        )
        out: dict[int, list[int]] = {}
        for r in rows:
            out.setdefault(int(r.job_id), []).append(int(r.parent_id))
        return out

    def _release_children(self, t: _Tx, parent_id: int) -> None:
        children = [int(r.id) for r in self._waiting_children(t, parent_id)]
        if not children:
            return
        pending = self._unsucceeded_parents(t.conn, children)
        held = self._held_for_inputs(t.conn, children)  # inputs not uploaded yet
        ready = [c for c in children if c not in pending and c not in held]
        if not ready:
            return
        self._release_jobs(
            t, ready, f"every job it depends on succeeded (the last: job {parent_id})"
        )

    def _release_jobs(self, t: _Tx, ready: Sequence[int], reason: str) -> list[int]:
        """``waiting → queued`` (guarded), one ``job.release`` each; stage 0 unblocked.

        Both holds end here: the last parent succeeded (this module), the last
        input arrived (``herder.store.inputs``).
        """
        if not ready:
            return []
        released = sorted(
            int(r.id)
            for r in t.conn.execute(
                sa.update(jobs)
                .where(jobs.c.id.in_(ready), jobs.c.state == _WAITING)
                .values(state=_RELEASED, updated_at=t.now)
                .returning(jobs.c.id)
            )
        )
        for job_id in released:
            t.event(
                f"job.{JobEvent.RELEASE.value}",
                job_id=job_id,
                from_state=_WAITING,
                to_state=_RELEASED,
                reason=reason,
            )
        if not released:
            return []
        rows = t.conn.execute(
            sa.update(tasks)
            .where(
                tasks.c.job_id.in_(released),
                tasks.c.stage == 0,
                tasks.c.state.in_(_UNBLOCK_SOURCES),
            )
            .values(state=_UNBLOCKED, updated_at=t.now)
            .returning(tasks.c.id, tasks.c.job_id)
        ).all()
        for r in sorted(rows, key=lambda r: int(r.id)):
            t.event(
                f"task.{TaskEvent.UNBLOCK.value}",
                job_id=int(r.job_id),
                task_id=int(r.id),
                from_state=TaskState.BLOCKED.value,
                to_state=_UNBLOCKED,
                reason=f"its job was released: {reason}",
            )
        if rows:
            t.woke = True
        return released

    def _parent_failed(self, t: _Tx, parent_id: int, state: str) -> None:
        """Fail or hold the waiting children of a failed or cancelled job, breadth first
        (a failed child's own children are judged in turn; no recursion)."""
        todo: deque[tuple[int, str]] = deque([(parent_id, state)])
        while todo:
            pid, pstate = todo.popleft()
            children = self._waiting_children(t, pid)
            fail = [int(r.id) for r in children if r.on_parent_failure == "fail"]
            for r in children:
                if r.on_parent_failure != "fail":
                    self._hold_event(t, int(r.id), pid, pstate)
            if not fail:
                continue
            reason = f"job {pid} it depends on {pstate}"
            failed = sorted(
                int(r.id)
                for r in t.conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id.in_(fail), jobs.c.state == _WAITING)
                    .values(state=_FAILED, updated_at=t.now, finished_at=t.now)
                    .returning(jobs.c.id)
                )
            )
            for child in failed:
                t.event(
                    f"job.{JobEvent.FAIL.value}",
                    job_id=child,
                    from_state=_WAITING,
                    to_state=_FAILED,
                    reason=reason,
                )
                self._stop_tasks(t, child, f"job failed: {reason}")
                todo.append((child, _FAILED))

    def _hold_event(self, t: _Tx, job_id: int, parent_id: int, parent_state: str) -> None:
        t.event(
            "job.hold",
            job_id=job_id,
            from_state=_WAITING,
            to_state=_WAITING,
            reason=f"job {parent_id} it depends on {parent_state}: held until that job is "
            "retried and succeeds (on_parent_failure = hold)",
        )

    def _refuse_early_retry(self, t: _Tx, job_id: int) -> None:
        pending = self._unsucceeded_parents(t.conn, [job_id]).get(job_id)
        if pending:
            raise Conflict(
                f"job {job_id} depends on job {_ids(pending)}, not succeeded yet: retry "
                "that job first, and this one once it succeeded",
                detail={"job_id": job_id, "depends_on": pending},
            )

    # ------------------------------------------------------------ reads

    def _job_links(self, conn: Connection, job_id: int) -> tuple[list[JobLink], list[JobLink]]:
        """The job's parents and children, each with its href and state, by id."""

        def links(join_on: Any, where: Any) -> list[JobLink]:
            rows = conn.execute(
                sa.select(jobs.c.id, jobs.c.name, jobs.c.state)
                .join(job_deps, join_on)
                .where(where)
                .order_by(jobs.c.id)
            )
            return [JobLink(id=r.id, href=job_href(r.id), name=r.name, state=r.state) for r in rows]

        parents = links(jobs.c.id == job_deps.c.parent_id, job_deps.c.job_id == job_id)
        children = links(jobs.c.id == job_deps.c.job_id, job_deps.c.parent_id == job_id)
        return parents, children
