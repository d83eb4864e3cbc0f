"""The store's side of issue 13: memory-aware retry, progress, peak RSS.

- A ``memory`` completion (the agent killed the task past its ``ram_mb``, or
  the kernel's OOM killer did) is decided by
  ``herder.core.rules.ram_retry_decision`` and applied by ``CompletionsMixin``
  in the completion's transaction: the task is requeued with more RAM (event
  ``task.ram_raised``) or fails for good (``task.fail``), guarded by a
  compare-and-set on the ``ram_mb`` and ``memory_failures`` it read.
- Progress and peak RSS ride on heartbeats (``RunningAttempt.progress``) and
  on completions; they are written onto the attempt row.

The policy (factor, ceiling) comes from ``HERDER_RAM_RETRY_FACTOR`` and
``HERDER_RAM_RETRY_CEILING_MB`` (``herder master --ram-retry-factor
--ram-retry-ceiling-mb`` sets them), or is set on the store
(``store.ram_retry_policy = RamRetryPolicy(...)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from herder.api_models import Completion, RunningAttempt
from herder.core.rules import RamRetry, RamRetryPolicy, ram_retry_decision
from herder.core.states import TaskEvent, TaskState
from herder.store.schema import agents, attempts, tasks
from herder.store.tx import _Tx

RAM_RETRY_FACTOR_ENV = "HERDER_RAM_RETRY_FACTOR"
RAM_RETRY_CEILING_ENV = "HERDER_RAM_RETRY_CEILING_MB"


def ram_retry_policy_from_env(env: Mapping[str, str] | None = None) -> RamRetryPolicy:
    """The policy the environment asks for; ValueError names a bad variable."""
    source = os.environ if env is None else env
    kwargs: dict[str, Any] = {}
    for name, key, kind in (
        (RAM_RETRY_FACTOR_ENV, "factor", float),
        (RAM_RETRY_CEILING_ENV, "ceiling_mb", int),
    ):
        text = source.get(name, "").strip()
        if not text:
            continue
        try:
            kwargs[key] = kind(text)
            RamRetryPolicy(**{key: kwargs[key]})
        except ValueError as exc:
            what = "a number" if kind is float else "a whole number of MB"
            raise ValueError(f"{name}={text!r}: expected {what} ({exc})") from None
    return RamRetryPolicy(**kwargs)


@dataclass(frozen=True)
class MemoryOutcome:
    """A memory failure applied to a task: its new columns, CAS guard, event."""

    values: dict[str, Any]
    guard: list[Any]
    event: TaskEvent
    decision: RamRetry


def memory_outcome(t: _Tx, row: Any, c: Completion, policy: RamRetryPolicy) -> MemoryOutcome:
    """Decide a memory failure of ``row``'s task (``ram_retry_decision``), within ``t``.

    Reads the task's ``ram_mb`` and ``memory_failures`` and the largest RAM a
    registered agent reports; the caller's UPDATE carries ``guard`` so that a
    concurrent change of either makes the completion stale instead of lost.
    """
    tk = tasks.c
    cur = t.conn.execute(sa.select(tk.ram_mb, tk.memory_failures).where(tk.id == row.task_id)).one()
    largest = t.conn.execute(sa.select(sa.func.max(agents.c.ram_mb))).scalar()
    d = ram_retry_decision(
        cur.ram_mb,
        c.peak_rss_mb,
        memory_failures=cur.memory_failures,
        largest_agent_mb=largest,
        policy=policy,
    )
    values: dict[str, Any] = {
        "memory_failures": d.memory_failures,
        "error": d.reason,
        "exit_code": c.exit_code,
    }
    if d.retry:
        values.update(state=TaskState.QUEUED.value, ram_mb=d.ram_mb, agent_id=None)
        values["finished_at"] = None
        event = TaskEvent.RAM_RAISED
    else:
        values.update(state=TaskState.FAILED.value, finished_at=t.now, agent_id=row.agent_id)
        event = TaskEvent.FAIL
    guard = [tk.ram_mb == cur.ram_mb, tk.memory_failures == cur.memory_failures]
    return MemoryOutcome(values, guard, event, d)


def record_watch(t: _Tx, items: Iterable[tuple[int, int | None, float | None]]) -> None:
    """Write ``(attempt_id, peak_rss_mb, progress)`` onto attempts (None keeps the old value)."""
    rows = [(aid, peak, prog) for aid, peak, prog in items if peak is not None or prog is not None]
    if not rows:
        return
    a = attempts.c
    stmt = (
        sa.update(attempts)
        .where(a.id == sa.bindparam("aid"))
        .values(
            peak_rss_mb=sa.func.coalesce(sa.bindparam("peak", type_=sa.Integer), a.peak_rss_mb),
            progress=sa.func.coalesce(sa.bindparam("prog", type_=sa.Float), a.progress),
        )
    )
    t.conn.execute(stmt, [{"aid": aid, "peak": peak, "prog": prog} for aid, peak, prog in rows])


def completion_watch(c: Completion, attempt_id: int) -> tuple[int, int | None, float | None]:
    return attempt_id, c.peak_rss_mb, c.progress


def heartbeat_progress(t: _Tx, running: Sequence[RunningAttempt], renewed: Iterable[int]) -> None:
    """Progress the heartbeat reports for attempts it renewed (current and this agent's)."""
    ok = set(renewed)
    record_watch(t, ((r.attempt_id, None, r.progress) for r in running if r.attempt_id in ok))


__all__ = [
    "RAM_RETRY_CEILING_ENV",
    "RAM_RETRY_FACTOR_ENV",
    "MemoryOutcome",
    "completion_watch",
    "heartbeat_progress",
    "memory_outcome",
    "ram_retry_policy_from_env",
    "record_watch",
]
