"""The task and job transition tables (no database)."""

from __future__ import annotations

import itertools

import pytest

from herder.core.states import (
    JOB_SOURCES,
    JOB_TERMINAL,
    JOB_TRANSITIONS,
    TASK_ACTIVE,
    TASK_SOURCES,
    TASK_TERMINAL,
    TASK_TRANSITIONS,
    IllegalTransition,
    JobEvent,
    JobState,
    TaskEvent,
    TaskState,
    completion_event,
    lease_event,
    next_job_state,
    next_task_state,
    task_target,
)

T, E = TaskState, TaskEvent

LEGAL_TASK = [
    (T.BLOCKED, E.UNBLOCK, T.QUEUED),
    (T.QUEUED, E.OFFER, T.OFFERED),
    (T.OFFERED, E.ACK, T.RUNNING),
    (T.OFFERED, E.OFFER_EXPIRED, T.QUEUED),
    (T.RUNNING, E.LEASE_EXPIRED, T.QUEUED),
    (T.RUNNING, E.LEASE_EXHAUSTED, T.FAILED),
    (T.OFFERED, E.SUCCEED, T.SUCCEEDED),
    (T.RUNNING, E.SUCCEED, T.SUCCEEDED),
    (T.RUNNING, E.FAIL_RETRY, T.QUEUED),
    (T.RUNNING, E.FAIL, T.FAILED),
    (T.RUNNING, E.RELEASE, T.QUEUED),
    (T.QUEUED, E.CANCEL, T.CANCELLED),
    (T.BLOCKED, E.CANCEL, T.CANCELLED),
    (T.RUNNING, E.CANCEL, T.CANCELLED),
    (T.RUNNING, E.PREEMPT, T.QUEUED),
    (T.OFFERED, E.PREEMPT, T.QUEUED),
    (T.FAILED, E.RETRY, T.QUEUED),
    (T.CANCELLED, E.RETRY, T.QUEUED),
    (T.CANCELLED, E.RETRY_BLOCKED, T.BLOCKED),
]


@pytest.mark.parametrize(("src", "event", "dst"), LEGAL_TASK)
def test_legal_task_transitions(src: TaskState, event: TaskEvent, dst: TaskState) -> None:
    assert next_task_state(src, event) is dst


ILLEGAL_TASK = [
    (T.BLOCKED, E.OFFER),
    (T.QUEUED, E.ACK),
    (T.QUEUED, E.SUCCEED),
    (T.BLOCKED, E.SUCCEED),
    (T.OFFERED, E.UNBLOCK),
    (T.OFFERED, E.LEASE_EXPIRED),  # an unacknowledged offer expires by OFFER_EXPIRED
    (T.RUNNING, E.OFFER_EXPIRED),
    (T.SUCCEEDED, E.CANCEL),
    (T.FAILED, E.FAIL_RETRY),
    (T.CANCELLED, E.UNBLOCK),
    (T.SUCCEEDED, E.RETRY),  # only what failed or was cancelled is retried
    (T.QUEUED, E.RETRY),
    (T.QUEUED, E.PREEMPT),
]


@pytest.mark.parametrize(("src", "event"), ILLEGAL_TASK)
def test_illegal_task_transitions_raise(src: TaskState, event: TaskEvent) -> None:
    with pytest.raises(IllegalTransition) as info:
        next_task_state(src, event)
    assert info.value.kind == "task"
    assert info.value.state == src
    assert info.value.event == event
    assert str(event.value) in str(info.value)


def test_terminal_task_states_have_no_way_out_but_a_user_retry() -> None:
    retry = {E.RETRY, E.RETRY_BLOCKED}
    for state, event in itertools.product(TASK_TERMINAL, set(TaskEvent) - retry):
        with pytest.raises(IllegalTransition):
            next_task_state(state, event)
    for event in retry:
        assert set(TASK_SOURCES[event]) == {T.FAILED, T.CANCELLED, T.REJECTED}


def test_every_task_state_is_reachable_and_has_a_source_table() -> None:
    reachable = {T.BLOCKED, T.QUEUED} | set(TASK_TRANSITIONS.values())
    assert reachable == set(TaskState)
    assert set(TASK_SOURCES) == set(TaskEvent)


def test_task_sources_match_the_table() -> None:
    for event, sources in TASK_SOURCES.items():
        assert sources, event
        for src in TaskState:
            legal = (src, event) in TASK_TRANSITIONS
            assert (src in sources) == legal


def test_each_event_has_one_target() -> None:
    for event in TaskEvent:
        target = task_target(event)
        for src in TASK_SOURCES[event]:
            assert next_task_state(src, event) is target


def test_completion_accepted_from_offered_and_running_only() -> None:
    for event in (E.SUCCEED, E.FAIL, E.FAIL_RETRY, E.RELEASE):
        assert set(TASK_SOURCES[event]) == set(TASK_ACTIVE)


def test_cancel_from_every_non_terminal_state() -> None:
    assert set(TASK_SOURCES[E.CANCEL]) == set(TaskState) - TASK_TERMINAL


@pytest.mark.parametrize(
    ("ok", "failures_after", "max_attempts", "expected"),
    [
        (True, 0, 1, E.SUCCEED),
        (True, 5, 1, E.SUCCEED),
        (False, 1, 1, E.FAIL),
        (False, 1, 3, E.FAIL_RETRY),
        (False, 2, 3, E.FAIL_RETRY),
        (False, 3, 3, E.FAIL),
        (False, 4, 3, E.FAIL),
    ],
)
def test_completion_event(
    ok: bool, failures_after: int, max_attempts: int, expected: TaskEvent
) -> None:
    assert completion_event(ok, failures_after, max_attempts) is expected


@pytest.mark.parametrize(
    ("infra_after", "budget", "expected"),
    [
        (1, 5, E.LEASE_EXPIRED),
        (4, 5, E.LEASE_EXPIRED),
        (5, 5, E.LEASE_EXHAUSTED),
        (6, 5, E.LEASE_EXHAUSTED),
        (1, 1, E.LEASE_EXHAUSTED),
    ],
)
def test_lease_event(infra_after: int, budget: int, expected: TaskEvent) -> None:
    assert lease_event(infra_after, budget) is expected


J, JE = JobState, JobEvent


@pytest.mark.parametrize(
    ("src", "event", "dst"),
    [
        (J.QUEUED, JE.START, J.RUNNING),
        (J.RUNNING, JE.PAUSE, J.PAUSED),
        (J.PAUSED, JE.RESUME, J.RUNNING),
        (J.RUNNING, JE.SUCCEED, J.SUCCEEDED),
        (J.QUEUED, JE.FAIL, J.FAILED),
        (J.RUNNING, JE.FAIL, J.FAILED),
        (J.PAUSED, JE.CANCEL, J.CANCELLED),
        (J.PAUSED, JE.SUCCEED, J.SUCCEEDED),  # its last running task finished
        (J.PAUSED, JE.FAIL, J.FAILED),
        (J.FAILED, JE.RETRY, J.RUNNING),
        (J.CANCELLED, JE.RETRY, J.RUNNING),
    ],
)
def test_legal_job_transitions(src: JobState, event: JobEvent, dst: JobState) -> None:
    assert next_job_state(src, event) is dst


@pytest.mark.parametrize(
    ("src", "event"),
    [
        (J.RUNNING, JE.START),
        (J.PAUSED, JE.PAUSE),
        (J.RUNNING, JE.RESUME),
        (J.SUCCEEDED, JE.RETRY),
        (J.RUNNING, JE.RETRY),
        (J.SUCCEEDED, JE.CANCEL),
        (J.FAILED, JE.RESUME),
        (J.CANCELLED, JE.START),
    ],
)
def test_illegal_job_transitions_raise(src: JobState, event: JobEvent) -> None:
    with pytest.raises(IllegalTransition) as info:
        next_job_state(src, event)
    assert info.value.kind == "job"


def test_terminal_job_states_have_no_way_out_but_a_user_retry() -> None:
    for state, event in itertools.product(JOB_TERMINAL, JobEvent):
        if event is JE.RETRY and state is not J.SUCCEEDED:
            continue
        with pytest.raises(IllegalTransition):
            next_job_state(state, event)


def test_job_sources_match_the_table() -> None:
    for event, sources in JOB_SOURCES.items():
        for src in JobState:
            assert (src in sources) == ((src, event) in JOB_TRANSITIONS)
