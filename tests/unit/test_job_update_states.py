"""``JobEvent.UPDATE`` (a PATCH of a job) in the one transition table: it keeps a live
job's state, waiting included, and no finished job takes it."""

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

LIVE = [s for s in JobState if s not in JOB_TERMINAL]


@pytest.mark.parametrize("state", LIVE)
def test_an_update_keeps_a_live_jobs_state(state: JobState) -> None:
    assert next_job_state(state, JobEvent.UPDATE) is state


@pytest.mark.parametrize("state", sorted(JOB_TERMINAL))
def test_a_finished_job_takes_no_update(state: JobState) -> None:
    with pytest.raises(IllegalTransition):
        next_job_state(state, JobEvent.UPDATE)


def test_update_sources_are_exactly_the_live_states() -> None:
    assert set(JOB_SOURCES[JobEvent.UPDATE]) == set(LIVE)
    assert JobState.WAITING in JOB_SOURCES[JobEvent.UPDATE]
    assert JobState.WAITING not in JOB_SOURCES[JobEvent.PAUSE]  # refused: nothing started
