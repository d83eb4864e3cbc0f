"""The ``waiting`` job state of dependent jobs (issue 13) in the one transition table."""

from __future__ import annotations

import pytest

from herder.core.states import (
    JOB_SOURCES,
    JOB_TERMINAL,
    IllegalTransition,
    JobEvent,
    JobState,
    next_job_state,
)
from herder.store.common import _CLAIMABLE_JOB_STATES

W = JobState.WAITING


def test_a_waiting_job_is_released_failed_or_cancelled() -> None:
    assert next_job_state(W, JobEvent.RELEASE) is JobState.QUEUED
    assert next_job_state(W, JobEvent.FAIL) is JobState.FAILED
    assert next_job_state(W, JobEvent.CANCEL) is JobState.CANCELLED
    assert JOB_SOURCES[JobEvent.RELEASE] == (W,)  # only a waiting job is released


@pytest.mark.parametrize(
    "event", [JobEvent.START, JobEvent.PAUSE, JobEvent.RESUME, JobEvent.SUCCEED, JobEvent.RETRY]
)
def test_nothing_else_moves_a_waiting_job(event: JobEvent) -> None:
    with pytest.raises(IllegalTransition):
        next_job_state(W, event)


def test_waiting_is_neither_claimable_nor_terminal() -> None:
    assert W.value not in _CLAIMABLE_JOB_STATES
    assert W not in JOB_TERMINAL
    for state in JobState:
        if state is not W:
            with pytest.raises(IllegalTransition):
                next_job_state(state, JobEvent.RELEASE)
