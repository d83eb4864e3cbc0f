"""Task and job state machines (DESIGN §2), each as one transition table.

The store enforces the same transitions in SQL (``UPDATE … WHERE state IN``);
``TASK_SOURCES`` gives it the allowed source states for each event, so the
Python table and the SQL guards cannot drift apart.
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    BLOCKED = "blocked"
    QUEUED = "queued"
    OFFERED = "offered"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"  # its pool's ACL forbids its job's owner (seeds/002): never run


class TaskEvent(StrEnum):
    UNBLOCK = "unblock"  # the previous stage succeeded
    OFFER = "offer"  # a claim handed the task to an agent
    ACK = "ack"  # the agent acknowledged the offer and started it
    OFFER_EXPIRED = "offer_expired"  # no ack in time
    LEASE_EXPIRED = "lease_expired"  # no heartbeat in time, attempts left
    LEASE_EXHAUSTED = "lease_exhausted"  # no heartbeat in time, infra budget spent
    SUCCEED = "succeed"  # command exited 0
    FAIL_RETRY = "fail_retry"  # command failed, attempts left
    FAIL = "fail"  # command failed, no attempts left
    RAM_RAISED = "ram_raised"  # killed for exceeding its RAM: queued again with more (rules)
    RELEASE = "release"  # the agent handed the task back (shutdown, launch failure)
    CANCEL = "cancel"  # the user or a failed stage cancelled it
    REJECT = "reject"  # the claim found its pool's ACL forbids its owner (herder.store.acl)
    PREEMPT = "preempt"  # a pause --kill stopped it: queued again, no failure counted
    RETRY = "retry"  # the user retried its job: queued again with a fresh budget
    RETRY_BLOCKED = "retry_blocked"  # the same, in a stage still waiting for its previous one


class JobState(StrEnum):
    WAITING = "waiting"  # held until every job it depends on succeeded (herder.store.deps)
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobEvent(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "cancel"
    RETRY = "retry"  # the user retried a failed or cancelled job's tasks
    RELEASE = "release"  # the last job it depends on succeeded: it may start
    UPDATE = "update"  # the user changed a live job (PATCH): its state stays


class IllegalTransition(Exception):
    """An event that the state machine does not allow from the current state."""

    def __init__(self, kind: str, state: str, event: str) -> None:
        super().__init__(f"illegal {kind} transition: {event!r} from state {state!r}")
        self.kind = kind
        self.state = state
        self.event = event


_T = TaskState
_E = TaskEvent

TASK_TRANSITIONS: dict[tuple[TaskState, TaskEvent], TaskState] = {
    (_T.BLOCKED, _E.UNBLOCK): _T.QUEUED,
    (_T.QUEUED, _E.OFFER): _T.OFFERED,
    (_T.OFFERED, _E.ACK): _T.RUNNING,
    (_T.OFFERED, _E.OFFER_EXPIRED): _T.QUEUED,
    (_T.RUNNING, _E.LEASE_EXPIRED): _T.QUEUED,
    (_T.OFFERED, _E.LEASE_EXHAUSTED): _T.FAILED,
    (_T.RUNNING, _E.LEASE_EXHAUSTED): _T.FAILED,
    # A short command can finish before its ack arrives: completion is
    # accepted from ``offered`` as well.
    (_T.OFFERED, _E.SUCCEED): _T.SUCCEEDED,
    (_T.RUNNING, _E.SUCCEED): _T.SUCCEEDED,
    (_T.OFFERED, _E.FAIL_RETRY): _T.QUEUED,
    (_T.RUNNING, _E.FAIL_RETRY): _T.QUEUED,
    (_T.OFFERED, _E.FAIL): _T.FAILED,
    (_T.RUNNING, _E.FAIL): _T.FAILED,
    (_T.OFFERED, _E.RAM_RAISED): _T.QUEUED,
    (_T.RUNNING, _E.RAM_RAISED): _T.QUEUED,
    (_T.OFFERED, _E.RELEASE): _T.QUEUED,
    (_T.RUNNING, _E.RELEASE): _T.QUEUED,
    (_T.BLOCKED, _E.CANCEL): _T.CANCELLED,
    (_T.QUEUED, _E.CANCEL): _T.CANCELLED,
    (_T.QUEUED, _E.REJECT): _T.REJECTED,  # checked before offering: never offered
    (_T.OFFERED, _E.CANCEL): _T.CANCELLED,
    (_T.RUNNING, _E.CANCEL): _T.CANCELLED,
    (_T.OFFERED, _E.PREEMPT): _T.QUEUED,
    (_T.RUNNING, _E.PREEMPT): _T.QUEUED,
    (_T.FAILED, _E.RETRY): _T.QUEUED,
    (_T.CANCELLED, _E.RETRY): _T.QUEUED,
    (_T.REJECTED, _E.RETRY): _T.QUEUED,  # the ACL was changed back; the retry is checked too
    (_T.FAILED, _E.RETRY_BLOCKED): _T.BLOCKED,
    (_T.CANCELLED, _E.RETRY_BLOCKED): _T.BLOCKED,
    (_T.REJECTED, _E.RETRY_BLOCKED): _T.BLOCKED,
}

TASK_TERMINAL: frozenset[TaskState] = frozenset(
    {_T.SUCCEEDED, _T.FAILED, _T.CANCELLED, _T.REJECTED}
)
TASK_ACTIVE: frozenset[TaskState] = frozenset({_T.OFFERED, _T.RUNNING})


def _sources() -> dict[TaskEvent, tuple[TaskState, ...]]:
    out: dict[TaskEvent, list[TaskState]] = {}
    for src, event in TASK_TRANSITIONS:
        out.setdefault(event, []).append(src)
    return {event: tuple(states) for event, states in out.items()}


TASK_SOURCES: dict[TaskEvent, tuple[TaskState, ...]] = _sources()


def task_target(event: TaskEvent) -> TaskState:
    """The single target state of an event (every event has exactly one)."""
    targets = {dst for (_, ev), dst in TASK_TRANSITIONS.items() if ev == event}
    (target,) = targets
    return target


def next_task_state(state: TaskState, event: TaskEvent) -> TaskState:
    try:
        return TASK_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition("task", state, event) from None


_J = JobState
_JE = JobEvent

JOB_TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    # A job with parents (depends_on) waits for them: released when the last
    # one succeeds, failed (per its on_parent_failure) when one fails.
    (_J.WAITING, _JE.RELEASE): _J.QUEUED,
    (_J.WAITING, _JE.FAIL): _J.FAILED,
    (_J.WAITING, _JE.CANCEL): _J.CANCELLED,
    (_J.QUEUED, _JE.START): _J.RUNNING,
    (_J.QUEUED, _JE.PAUSE): _J.PAUSED,
    (_J.RUNNING, _JE.PAUSE): _J.PAUSED,
    (_J.PAUSED, _JE.RESUME): _J.RUNNING,
    (_J.QUEUED, _JE.SUCCEED): _J.SUCCEEDED,  # a job whose every task was already done
    (_J.RUNNING, _JE.SUCCEED): _J.SUCCEEDED,
    # A paused job's running tasks finish (a pause without --kill): the last
    # success ends the job, a failure for good fails it.
    (_J.PAUSED, _JE.SUCCEED): _J.SUCCEEDED,
    (_J.QUEUED, _JE.FAIL): _J.FAILED,
    (_J.RUNNING, _JE.FAIL): _J.FAILED,
    (_J.PAUSED, _JE.FAIL): _J.FAILED,
    (_J.QUEUED, _JE.CANCEL): _J.CANCELLED,
    (_J.RUNNING, _JE.CANCEL): _J.CANCELLED,
    (_J.PAUSED, _JE.CANCEL): _J.CANCELLED,
    (_J.FAILED, _JE.RETRY): _J.RUNNING,
    (_J.CANCELLED, _JE.RETRY): _J.RUNNING,
    # A change (PATCH: priority, tags, resources, max attempts) keeps the state;
    # a waiting job's tasks are all blocked, so it changes like a queued one.
    (_J.WAITING, _JE.UPDATE): _J.WAITING,
    (_J.QUEUED, _JE.UPDATE): _J.QUEUED,
    (_J.RUNNING, _JE.UPDATE): _J.RUNNING,
    (_J.PAUSED, _JE.UPDATE): _J.PAUSED,
}

JOB_TERMINAL: frozenset[JobState] = frozenset({_J.SUCCEEDED, _J.FAILED, _J.CANCELLED})


def _job_sources() -> dict[JobEvent, tuple[JobState, ...]]:
    out: dict[JobEvent, list[JobState]] = {}
    for src, event in JOB_TRANSITIONS:
        out.setdefault(event, []).append(src)
    return {event: tuple(states) for event, states in out.items()}


JOB_SOURCES: dict[JobEvent, tuple[JobState, ...]] = _job_sources()


def next_job_state(state: JobState, event: JobEvent) -> JobState:
    try:
        return JOB_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition("job", state, event) from None


def completion_event(exit_ok: bool, failures_after: int, max_attempts: int) -> TaskEvent:
    """What a completed attempt does to its task.

    ``failures_after`` counts command failures including this attempt's.
    """
    if exit_ok:
        return TaskEvent.SUCCEED
    if failures_after < max_attempts:
        return TaskEvent.FAIL_RETRY
    return TaskEvent.FAIL


def lease_event(infra_failures_after: int, infra_budget: int) -> TaskEvent:
    """What an expired lease does: requeue until the infrastructure budget is spent."""
    if infra_failures_after < infra_budget:
        return TaskEvent.LEASE_EXPIRED
    return TaskEvent.LEASE_EXHAUSTED
