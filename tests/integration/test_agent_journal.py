"""The agent's journal against a real master and real agent processes (issue 4).

A completion the agent cannot deliver (master down) stays on its disk; an
agent killed with ``kill -9`` and restarted on the same state directory
delivers it exactly once; one whose task was given to another agent in the
meantime is refused (stale) and dropped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from herder.api_models import JobSubmit, JobView, TaskView
from herder.client import HerderClient
from herder.localfarm import LocalFarm
from waiting import until_file

# The task runs until the test opens its gate, after the master is killed: its
# completion always meets a dead master (a fixed sleep could end before the kill).
COMMAND = "{hold}; echo attempt-$HERDER_ATTEMPT_ID > out.txt"


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _journal(state: Path) -> list[str]:
    d = state / "journal"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _job(c: HerderClient, gate: Path) -> JobView:
    command = COMMAND.format(hold=until_file(gate))
    spec = JobSubmit.model_validate(
        {"name": "j", "stages": [{"name": "s", "tasks": [{"command": command}]}]}
    )
    return c.submit_job(spec)


def _task(c: HerderClient, job_id: int) -> TaskView:
    return c.get_job(job_id).stages[0].tasks[0]


@pytest.fixture
def make_farm(tmp_path: Path) -> Iterator[Callable[[float], LocalFarm]]:
    farms: list[LocalFarm] = []

    def make(lease_s: float) -> LocalFarm:
        f = LocalFarm(workdir=tmp_path / "farm", lease_s=lease_s, ack_timeout_s=lease_s)
        farms.append(f)
        return f

    yield make
    for f in farms:
        f.close()


def _run_until_journaled(
    farm: LocalFarm, c: HerderClient, state: Path, extra: list[str] | None = None
) -> tuple[int, int]:
    """Start agent a1, let it run the task, kill the master mid-task; returns (job, attempt)."""
    farm.start_agent(slots=1, name="a1", state_dir=state, extra=extra)
    farm.wait_agents(1)
    gate = state.parent / f"{state.name}.gate"
    job = _job(c, gate)
    # running = acknowledged: from here only an expired lease takes it away
    _wait(lambda: _task(c, job.id).state == "running", 20, "the task to run")
    (attempt,) = c.get_job(job.id).stages[0].tasks[0].attempts
    assert farm.master is not None
    farm.master.kill9()
    gate.touch()
    _wait(lambda: _journal(state) == [f"a{attempt.id}.json"], 20, "the journal entry")
    return job.id, attempt.id


def test_journaled_completion_survives_kill9_and_is_delivered_once(
    make_farm: Callable[[float], LocalFarm], tmp_path: Path
) -> None:
    farm = make_farm(30.0)  # the lease outlives the outage
    state = tmp_path / "state-a1"
    farm.start_master()
    with HerderClient(farm.url, timeout=5) as c:
        job_id, attempt_id = _run_until_journaled(farm, c, state)
        agent = farm.agents[0]
        agent.kill9()  # the result now lives only in the journal
        assert _journal(state) == [f"a{attempt_id}.json"]
        assert (state / "work" / f"a{attempt_id}" / "work" / "out.txt").exists()

        farm.start_master()
        farm.start_agent(slots=1, name="a1", state_dir=state)
        _wait(lambda: c.get_job(job_id).state == "succeeded", 30, "the job to succeed")
        _wait(lambda: _journal(state) == [], 10, "the journal to empty")
        job = c.get_job(job_id)
        (task,) = job.stages[0].tasks
        assert [(a.id, a.state) for a in task.attempts] == [(attempt_id, "succeeded")]
        (out,) = task.attempts[0].outputs
        assert c.get_blob(out.digest) == f"attempt-{attempt_id}\n".encode()
        events = c.job_events(job_id)
        done = [e for e in events if e.task_id == task.id and e.to_state == "succeeded"]
        assert len(done) == 1
        # the kept sandbox goes once the master acknowledged the result
        _wait(lambda: not (state / "work" / f"a{attempt_id}").exists(), 10, "sandbox cleanup")


def test_running_agent_delivers_its_journal_when_the_master_returns(
    make_farm: Callable[[float], LocalFarm], tmp_path: Path
) -> None:
    farm = make_farm(30.0)
    state = tmp_path / "state-a1"
    farm.start_master()
    with HerderClient(farm.url, timeout=5) as c:
        # A short backoff cap: the agent finds the restarted master well within the lease.
        job_id, attempt_id = _run_until_journaled(farm, c, state, ["--backoff-max", "2"])
        time.sleep(1.0)  # a few failed deliveries
        farm.start_master()
        _wait(lambda: c.get_job(job_id).state == "succeeded", 40, "the job to succeed")
        _wait(lambda: _journal(state) == [], 10, "the journal to empty")
        (task,) = c.get_job(job_id).stages[0].tasks
        assert [(a.id, a.state) for a in task.attempts] == [(attempt_id, "succeeded")]
        assert farm.agents[0].alive()


def test_journaled_completion_for_reassigned_task_is_dropped(
    make_farm: Callable[[float], LocalFarm], tmp_path: Path
) -> None:
    # The lease expires while a1 is dead (6 s: a loaded machine's stall in a1
    # before the kill must not cost it the task).
    farm = make_farm(6.0)
    state = tmp_path / "state-a1"
    farm.start_master()
    with HerderClient(farm.url, timeout=5) as c:
        job_id, attempt_id = _run_until_journaled(farm, c, state)
        farm.agents[0].kill9()
        # The master comes back; a1 stays dead past its lease: the task goes to a2.
        farm.start_master()
        farm.start_agent(slots=1, name="a2")
        _wait(lambda: c.get_job(job_id).state == "succeeded", 40, "a2 to finish the task")
        (task,) = c.get_job(job_id).stages[0].tasks
        winner = next(a for a in task.attempts if a.state == "succeeded")
        assert winner.id != attempt_id

        # a1 restarts and replays its journal: stale (409), so it is dropped.
        proc = farm.start_agent(slots=1, name="a1", state_dir=state)
        _wait(lambda: _journal(state) == [], 20, "a1 to drop its stale journal entry")
        assert proc.alive()
        (task,) = c.get_job(job_id).stages[0].tasks
        assert [a.id for a in task.attempts if a.state == "succeeded"] == [winner.id]
        (out,) = winner.outputs
        assert c.get_blob(out.digest) == f"attempt-{winner.id}\n".encode()
        events = c.job_events(job_id)
        assert len([e for e in events if e.to_state == "succeeded" and e.task_id == task.id]) == 1


if os.name != "posix":  # pragma: no cover
    pytestmark = pytest.mark.skip("POSIX only")
