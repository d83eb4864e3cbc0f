"""Completions: fencing (DESIGN §5), retry decisions, blocklist strikes."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import (
    Completion,
    CompletionResult,
)
from herder.core.rules import (
    BlocklistEntry,
    FailureKind,
    RamRetryPolicy,
    RetryDecision,
    blocklist_strike,
    retry_decision,
)
from herder.core.states import (
    TASK_SOURCES,
    TaskEvent,
    TaskState,
)
from herder.store.blobs import BlobsMixin
from herder.store.common import (
    _ACTIVE,
    _LOOKUP,
    _merge_chunks,
    _outcome_error,
    _verified_inline,
)
from herder.store.jobs import JobsMixin
from herder.store.logs import LogsMixin
from herder.store.schema import (
    agent_job_failures,
    tasks,
)
from herder.store.sql import AttemptRow
from herder.store.stops import job_not_over
from herder.store.tx import _Tx
from herder.store.watch import (
    completion_watch,
    memory_outcome,
    ram_retry_policy_from_env,
    record_watch,
)

_SUCCEED_SOURCES = frozenset(s.value for s in TASK_SOURCES[TaskEvent.SUCCEED])

T = TypeVar("T")


class CompletionsMixin(JobsMixin, LogsMixin, BlobsMixin):
    """Part of :class:`herder.store.Store`: applying completions."""

    _ram_policy: RamRetryPolicy | None = None

    @property
    def ram_retry_policy(self) -> RamRetryPolicy:
        """Memory-aware retry (herder.store.watch): from the environment unless set."""
        if self._ram_policy is None:
            self._ram_policy = ram_retry_policy_from_env()
        return self._ram_policy

    @ram_retry_policy.setter
    def ram_retry_policy(self, policy: RamRetryPolicy) -> None:
        self._ram_policy = policy

    def _current_attempt(self, t: _Tx, attempt_id: int) -> AttemptRow | None:
        row = t.cur.execute(self._sql.current_attempt, (attempt_id,)).fetchone()
        return None if row is None else AttemptRow(*row)

    def _current_attempts(self, t: _Tx, ids: Sequence[int]) -> dict[int, AttemptRow]:
        """Every attempt of ``ids`` with its task: one lookup for a batch (no N+1)."""
        wanted = list(dict.fromkeys(ids))
        t.cur.execute(self._sql.current_attempts(len(wanted)), wanted)
        return self._current_attempts_fetched(t.cur)

    @staticmethod
    def _current_attempts_fetched(cur: Any) -> dict[int, AttemptRow]:
        return {r[0]: AttemptRow(*r) for r in cur.fetchall()}

    def _complete_many(
        self,
        t: _Tx,
        completions: Sequence[Completion],
        agent_id: str | None,
        found: dict[int, AttemptRow] | None = None,
    ) -> list[CompletionResult]:
        """Apply completions in order; runs of successes share their statements.

        A run ends at a completion that is not a success (applied on its own,
        ``_complete``) and at the success that finishes its stage (the stage
        counter is updated there, so that the next stage is queued before what
        follows, as one completion at a time would). Other stage counters are
        updated at the end of the transaction.
        """
        if found is None:
            found = self._current_attempts(t, [c.attempt_id for c in completions])
        results: list[CompletionResult | None] = [None] * len(completions)
        run: list[tuple[int, Completion, AttemptRow]] = []
        seen: dict[tuple[int, int], int] = {}
        for i, c in enumerate(completions):
            row = found.get(c.attempt_id)
            if c.outcome == "exited" and c.exit_code == 0:
                if (
                    row is None
                    or not self._fenced(row, c.token, agent_id, _ACTIVE)
                    or row.state not in _ACTIVE
                ):
                    results[i] = CompletionResult(attempt_id=c.attempt_id, result="stale")
                    continue
                run.append((i, c, row))
                key = (row.job_id, row.stage)
                seen[key] = seen.get(key, 0) + 1
                if row.remaining is not None and seen[key] >= row.remaining:
                    self._succeed_run(t, run, results)
                    run = []
                    self._flush_stage(t, key)  # it finishes its stage (by the lookup's count)
                continue
            if run:
                self._succeed_run(t, run, results)
                run = []
            results[i] = self._complete(t, c, agent_id, row)
        if run:
            self._succeed_run(t, run, results)
        return [r for r in results if r is not None]

    def _succeed_run(
        self,
        t: _Tx,
        run: Sequence[tuple[int, Completion, AttemptRow]],
        results: list[CompletionResult | None],
    ) -> None:
        """Successes (exited 0) of current attempts: guarded task UPDATEs, then attempt rows."""
        sql, at, cur = self._sql, t.at, t.cur
        done = sql.succeed_tasks(
            cur, at, [(row.task_id, row.number, row.task_state) for _, _, row in run]
        )
        quiet: list[tuple[Any, ...]] = []
        logged: list[tuple[int, dict[str, str], tuple[Any, ...]]] = []
        succeeded = TaskState.SUCCEEDED.value
        sources = _SUCCEED_SOURCES
        for (i, c, row), d in zip(run, done, strict=True):
            if d is None:
                results[i] = CompletionResult(attempt_id=c.attempt_id, result="stale")
                continue
            new_state = d[0]
            assert row.task_state in sources
            error = c.error or None
            t.event(
                "task.succeed",
                job_id=row.job_id,
                task_id=row.task_id,
                attempt_id=row.id,
                agent_id=row.agent_id,
                from_state=row.task_state,
                to_state=new_state,
                reason=error,
            )
            merged = _merge_chunks(c.log) if c.log else {}
            outputs = sql.js([o.model_dump(mode="json") for o in c.outputs]) if c.outputs else "[]"
            n_out, n_err = len(merged.get("stdout", "")), len(merged.get("stderr", ""))
            if merged:
                params = ("succeeded", c.exit_code, error, at, outputs, n_out, n_err, row.id)
                logged.append((row.id, merged, params))
            else:
                quiet.append((row.id, "succeeded", c.exit_code, error, outputs, n_out, n_err))
            if new_state == succeeded:
                key = (row.job_id, row.stage)
                t.stage_done[key] = t.stage_done.get(key, 0) + 1
            results[i] = CompletionResult.model_construct(
                attempt_id=c.attempt_id, result="accepted", task_state=new_state
            )
        if quiet:
            sql.finish_attempts(cur, at, quiet)
        for attempt_id, merged, params in logged:
            lens = cur.execute(sql.attempt_finish, params).fetchone()
            self._insert_log(t, attempt_id, merged, lens)
        record_watch(
            t,
            (
                completion_watch(c, row.id)
                for i, c, row in run
                if (r := results[i]) is not None and r.result == "accepted"
            ),
        )

    @staticmethod
    def _fenced(
        row: Any, token: str | None, agent_id: str | None, task_states: Iterable[str]
    ) -> bool:
        if row is None:
            return False
        if token is not None and not hmac.compare_digest(row.token, token):
            return False
        if agent_id is not None and row.agent_id != agent_id:
            return False
        return bool(row.attempt_count == row.number and row.task_state in task_states)

    def complete(self, c: Completion, agent_id: str | None = None) -> tuple[CompletionResult, bool]:
        """Apply one completion. ``(result, woke)``; a stale completion changes nothing."""
        inline = _verified_inline([c])

        def tx(t: _Tx) -> tuple[CompletionResult, bool]:
            if inline:
                self._insert_blobs(t, inline)
            (res,) = self._complete_many(t, [c], agent_id)
            self._finish(t)  # the stage counter may queue the next stage: t.woke
            return res, t.woke

        return self._write(tx)

    def _complete(
        self, t: _Tx, c: Completion, agent_id: str | None, row: Any = _LOOKUP
    ) -> CompletionResult:
        stale = CompletionResult(attempt_id=c.attempt_id, result="stale")
        if row is _LOOKUP:
            row = self._current_attempt(t, c.attempt_id)
        task_states: tuple[str, ...] = _ACTIVE
        attempt_states: tuple[str, ...] = _ACTIVE
        if c.outcome == "cancelled":
            # A cancelled attempt reports back: record it, even if the task was cancelled.
            task_states = (*_ACTIVE, TaskState.CANCELLED.value)
            attempt_states = (*_ACTIVE, "cancelled")
        if not self._fenced(row, c.token, agent_id, task_states) or row.state not in attempt_states:
            return stale

        error = _outcome_error(c, row.timeout_s)
        fail_reason = error or c.outcome
        tk = tasks.c
        guard = [
            tk.id == row.task_id,
            tk.attempt_count == row.number,
            tk.state == row.task_state,
        ]
        values: dict[str, Any] = {"updated_at": t.now}
        attempt_state: str
        decision: RetryDecision | None = None
        memory_event: TaskEvent | None = None
        if c.outcome == "exited" and c.exit_code == 0:
            attempt_state = "succeeded"
            values.update(
                state=TaskState.SUCCEEDED.value,
                exit_code=0,
                error=None,
                finished_at=t.now,
            )
        elif c.outcome in ("exited", "timeout", "launch_failed"):
            attempt_state = "failed"
            kind = FailureKind.LAUNCH if c.outcome == "launch_failed" else FailureKind.COMMAND
            decision = self._decide(kind, row)
            values.update(self._failure_values(decision, row.agent_id, error, t.now))
            if kind is FailureKind.COMMAND:
                values["exit_code"] = c.exit_code
            # CAS on the budgets the decision was computed from.
            guard += [tk.failures == row.failures, tk.infra_failures == row.infra_failures]
        elif c.outcome == "memory":  # more RAM, or fail past the ceiling (herder.store.watch)
            attempt_state = "failed"
            mem = memory_outcome(t, row, c, self.ram_retry_policy)
            values.update(mem.values)
            guard += mem.guard
            memory_event, fail_reason = mem.event, mem.decision.reason
        elif c.outcome == "released" or row.task_state in _ACTIVE:
            # released, or cancelled by the agent on its own: hand the task back.
            attempt_state = "released" if c.outcome == "released" else "cancelled"
            values.update(state=TaskState.QUEUED.value, agent_id=None)
        else:
            attempt_state = "cancelled"  # the task was cancelled: just record the attempt

        new_state: str = row.task_state
        if "state" in values:
            if attempt_state == "succeeded":  # the hot path: a prebuilt statement
                done = t.cur.execute(
                    self._sql.task_succeed, (t.at, t.at, row.task_id, row.number, row.task_state)
                ).fetchone()
            else:
                if values["state"] == TaskState.QUEUED.value:
                    guard.append(job_not_over())  # a terminal job's task is never requeued
                done = t.conn.execute(
                    sa.update(tasks).where(*guard).values(**values).returning(tk.state)
                ).first()
            if done is None:
                if values["state"] == TaskState.QUEUED.value:
                    self._stop_if_over(t, row.job_id)
                return stale
            new_state = done[0]
            event = decision.event if decision else self._event_for(c, row.task_state, new_state)
            event = memory_event or event
            if event is not None:
                assert row.task_state in {s.value for s in TASK_SOURCES[event]}
            t.event(
                f"task.{event.value if event else c.outcome}",
                job_id=row.job_id,
                task_id=row.task_id,
                attempt_id=row.id,
                agent_id=row.agent_id,
                from_state=row.task_state,
                to_state=new_state,
                reason=fail_reason if memory_event else error,
            )

        merged = _merge_chunks(c.log)
        outputs = [o.model_dump(mode="json") for o in c.outputs]
        lens = t.cur.execute(
            self._sql.attempt_finish,
            (
                attempt_state,
                c.exit_code,
                error,
                t.at,
                self._sql.js(outputs),
                len(merged.get("stdout", "")),
                len(merged.get("stderr", "")),
                row.id,
            ),
        ).fetchone()
        self._insert_log(t, row.id, merged, lens)
        record_watch(t, [completion_watch(c, row.id)])
        if decision is not None and decision.blocklist_strike and row.agent_id is not None:
            self._blocklist_strike(t, row.agent_id, row.job_id, row.task_id, row.id)

        if new_state == TaskState.SUCCEEDED.value:
            key = (row.job_id, row.stage)
            t.stage_done[key] = t.stage_done.get(key, 0) + 1
        elif new_state == TaskState.FAILED.value and row.task_state != new_state:
            self._fail_job(t, row.job_id, f"task {row.task_id} failed: {fail_reason}")
        elif new_state == TaskState.QUEUED.value:
            t.woke = True
        return CompletionResult(attempt_id=c.attempt_id, result="accepted", task_state=new_state)  # type: ignore[arg-type]

    def _decide(self, kind: FailureKind, row: Any) -> RetryDecision:
        """herder.core.rules.retry_decision on a task row (failures, infra_failures, max_attempts)."""
        return retry_decision(
            kind,
            failures=row.failures,
            infra_failures=row.infra_failures,
            max_attempts=row.max_attempts,
            policy=self.retry_policy,
        )

    @staticmethod
    def _failure_values(
        d: RetryDecision, agent_id: str | None, error: str | None, now: datetime
    ) -> dict[str, Any]:
        """The task columns a failed attempt sets, from its retry decision."""
        values: dict[str, Any] = {
            "state": TaskState.QUEUED.value if d.retry else TaskState.FAILED.value,
            "failures": d.failures,
            "infra_failures": d.infra_failures,
            "error": error,
            "finished_at": None if d.retry else now,
            "agent_id": None if d.retry else agent_id,
        }
        if d.avoid_agent and agent_id is not None:
            values["last_failed_agent_id"] = agent_id
        return values

    def _blocklist_strike(
        self, t: _Tx, agent_id: str, job_id: int, task_id: int, attempt_id: int
    ) -> None:
        """Count a failure of the job's task on the agent (herder.core.rules.blocklist_strike)."""
        b = agent_job_failures.c
        t.conn.execute(
            self._insert_ignore(agent_job_failures).values(
                agent_id=agent_id, job_id=job_id, failures=0
            )
        )
        sel = sa.select(b.failures, b.last_failure_at, b.blocked_until).where(
            b.agent_id == agent_id, b.job_id == job_id
        )
        if self._is_pg:
            sel = sel.with_for_update()
        cur = t.conn.execute(sel).one()
        strike = blocklist_strike(
            BlocklistEntry(cur.failures, cur.last_failure_at, cur.blocked_until),
            t.now,
            self.blocklist_policy,
        )
        e = strike.entry
        t.conn.execute(
            sa.update(agent_job_failures)
            .where(b.agent_id == agent_id, b.job_id == job_id)
            .values(
                failures=e.failures,
                last_failure_at=e.last_failure_at,
                blocked_until=e.blocked_until,
            )
        )
        if strike.newly_blocked:
            assert e.blocked_until is not None
            t.event(
                "agent.blocklisted",
                job_id=job_id,
                task_id=task_id,
                attempt_id=attempt_id,
                agent_id=agent_id,
                reason=(
                    f"{e.failures} failures of the job's tasks on this agent; "
                    f"blocklisted for the job until {e.blocked_until.isoformat()}"
                ),
            )

    def blocklist(self, job_id: int | None = None) -> list[dict[str, Any]]:
        """Current (agent, job) strike rows; ``blocked`` says whether the block holds now."""

        def q(conn: Connection) -> list[dict[str, Any]]:
            now = self._now_fn(conn)
            stmt = sa.select(agent_job_failures).order_by(
                agent_job_failures.c.job_id, agent_job_failures.c.agent_id
            )
            if job_id is not None:
                stmt = stmt.where(agent_job_failures.c.job_id == job_id)
            return [
                {
                    "agent_id": r.agent_id,
                    "job_id": r.job_id,
                    "failures": r.failures,
                    "blocked_until": r.blocked_until,
                    "blocked": r.blocked_until is not None and now < r.blocked_until,
                }
                for r in conn.execute(stmt)
            ]

        return self._read(q)

    @staticmethod
    def _event_for(c: Completion, old: str, new: str) -> TaskEvent | None:
        if new == TaskState.SUCCEEDED.value:
            return TaskEvent.SUCCEED
        if c.outcome in ("exited", "timeout"):
            return TaskEvent.FAIL if new == TaskState.FAILED.value else TaskEvent.FAIL_RETRY
        if c.outcome == "launch_failed":
            return TaskEvent.FAIL if new == TaskState.FAILED.value else TaskEvent.RELEASE
        if new == TaskState.QUEUED.value:
            return TaskEvent.RELEASE
        return None
