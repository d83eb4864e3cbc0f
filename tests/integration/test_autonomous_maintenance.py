"""Maintenance while every master is down (issue 9; DESIGN §5, §6), real processes.

A master and two agents: ``victim`` (master mode only) runs a task, ``auto``
(``--self-assign --db``) is idle. The master is killed (SIGKILL), then the
victim. No master is left to reap the victim's lease: ``auto``, in
autonomous mode, takes the maintenance lock as ``agent:<id>``, reaps it, and
the requeued task runs on ``auto``. When a master is back the agent lets the
lock go and the master takes maintenance over.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from herder.api_models import JobSubmit, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.localfarm import LocalFarm, Proc
from herder.store import Store
from waiting import wait_for, wait_registered

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def farm(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalFarm]:
    # Masters and agents read these (the same cadence on both): a dead master's
    # lock lapses after 3 s, and it leaves the directory 3 s after its last beat.
    # The lease (6 s, heartbeats every 2 s) must outlast a loaded machine's
    # hiccups: a lease lost before the kills would rerun the task on the victim.
    monkeypatch.setenv("HERDER_MAINTENANCE_TTL_S", "3")
    monkeypatch.setenv("HERDER_MASTER_HEARTBEAT_S", "1")
    f = LocalFarm(
        db_url=db_url, workdir=tmp_path / "farm", lease_s=6.0, ack_timeout_s=6.0, log_level="info"
    )
    try:
        yield f
    finally:
        f.close()


def agent_id(store: Store, name: str) -> str:
    (found,) = [a.id for a in store.list_agents() if a.name == name]
    return found


def test_autonomous_agent_reaps_a_dead_agents_lease(farm: LocalFarm, tmp_path: Path) -> None:
    assert farm.db_url is not None
    farm.start_master()
    victim = farm.start_agent(1, name="victim")
    wait_registered(farm, victim)
    store = Store.open(farm.db_url, migrate=False)
    try:
        mark = tmp_path / "first-attempt-ran"
        # The first attempt (on the victim) never finishes; the second does at once.
        cmd = f"if [ -e {mark} ]; then echo second; else touch {mark}; sleep 30; fi"
        with HerderClient(farm.url, timeout=5) as c:
            job_id = c.submit_job(
                JobSubmit(
                    name="reaped", stages=[StageSpec(name="s", tasks=[TaskSpec(command=cmd)])]
                )
            ).id
        victim_id = agent_id(store, "victim")
        wait_for(
            lambda: (
                (t := store.get_job(job_id).stages[0].tasks[0]).state == "running"
                and t.attempts[-1].agent_id == victim_id
            ),
            20,
            "the task running on the victim",
            victim.log_text,
        )
        auto: Proc = farm.start_agent(
            1,
            name="auto",
            extra=["--self-assign", "--db", farm.db_url, "--backoff-max", "1"],
        )
        wait_registered(farm, auto, 2)
        auto_id = agent_id(store, "auto")
        assert farm.master is not None
        farm.master.kill9()
        victim.kill9()
        # The premise: the victim's first attempt was still its only one when both died.
        (before,) = store.get_job(job_id).stages[0].tasks
        assert [a.agent_id for a in before.attempts] == [victim_id], before.attempts

        done = wait_for(
            lambda: (j := store.get_job(job_id)).state in ("succeeded", "failed") and j,
            60,
            "the victim's task reaped and run again by the autonomous agent",
            auto.log_text,
        )
        assert done.state == "succeeded"
        (task,) = done.stages[0].tasks
        assert [(a.state, a.agent_id) for a in task.attempts] == [
            ("lost", victim_id),
            ("succeeded", auto_id),
        ]
        text = auto.log_text()
        assert "event=mode_changed mode=autonomous" in text
        assert f"event=maintenance_lock acquired holder=agent:{auto_id}" in text, text[-4000:]
        assert f"event=reaped tasks=1 holder=agent:{auto_id}" in text
        holder = store.lock_holder()
        assert holder is not None and holder[0] == f"agent:{auto_id}"

        # A master is back: the agent lets the lock go and the master maintains again.
        farm.start_master()
        wait_for(
            lambda: (h := store.lock_holder()) is not None and not h[0].startswith("agent:"),
            30,
            "a master holds the maintenance lock again",
            auto.log_text,
        )
        assert f"event=maintenance_lock released holder=agent:{auto_id}" in auto.log_text()
    finally:
        store.close()
