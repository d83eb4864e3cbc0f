"""Autonomous mode with real processes and a real PostgreSQL (DESIGN §6; seeds/000).

A master and an agent started with ``--self-assign --db URL``; a job with
queued tasks is submitted while the master is up, then the master is killed
(SIGKILL). The agent finds every master down, claims the queued work straight
from the database through the store code the master runs, and finishes the
job (each task exactly one succeeded attempt, outputs stored as blobs). Its
heartbeats mark it ``autonomous`` in the agents table. Then a master is
started again and, by return policy:

- ``per-task`` and ``interval:1``: the agent goes back to master mode by
  itself (``GET /api/v1/agents`` shows ``mode: master`` again);
- ``never``: it stays autonomous (and keeps working) until told: the
  talkback ``mode`` call (``POST /talkback/mode``), or SIGUSR1 when the
  agent has no talkback endpoint.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import pg
from herder.api_models import JobSubmit, JobView, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.localfarm import LocalFarm, Proc
from herder.store import Store
from waiting import wait_for, wait_registered

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]

TOKEN = "talkback-token-for-tests-0123456789"


def job_spec(name: str, n: int, sleep: float = 0.3) -> JobSubmit:
    return JobSubmit(
        name=name,
        stages=[
            StageSpec(
                name="s",
                tasks=[
                    TaskSpec(command=f"sleep {sleep}; echo out-{i} > out{i}.txt; echo line-{i}")
                    for i in range(n)
                ],
            )
        ],
    )


def all_tasks(job: JobView) -> list[Any]:
    return [t for st in job.stages for t in st.tasks]


def check_exactly_once(job: JobView) -> None:
    assert job.state == "succeeded", job.state
    for t in all_tasks(job):
        ok = [a for a in t.attempts if a.state == "succeeded"]
        assert len(ok) == 1, (t.id, [(a.id, a.state) for a in t.attempts])
        assert ok[0].outputs, t.id  # the output file went into the blob store


def agent_mode(url: str) -> str | None:
    try:
        r = httpx.get(f"{url}/api/v1/agents", timeout=3)
    except httpx.HTTPError:
        return None
    agents = r.json()["agents"]
    return str(agents[0]["mode"]) if agents else None


@pytest.fixture
def farm(pg_dsn: str, tmp_path: Path) -> Iterator[LocalFarm]:
    db_url = pg.create_database(pg_dsn)
    f = LocalFarm(db_url=db_url, workdir=tmp_path, lease_s=3.0, ack_timeout_s=5.0, log_level="info")
    try:
        yield f
    finally:
        f.close()
        try:
            pg.drop_database(pg_dsn, db_url)
        except Exception:
            pass


def start_agent(farm: LocalFarm, policy: str) -> Proc:
    assert farm.db_url is not None
    return farm.start_agent(
        2,
        name="auto",
        extra=[
            "--self-assign",
            "--db",
            farm.db_url,
            "--return-policy",
            policy,
            "--backoff-max",
            "2",
            "--talkback-token",
            TOKEN,
        ],
    )


def run_autonomous_phase(farm: LocalFarm, agent: Proc, store: Store) -> int:
    """Submit while the master is up, kill -9 it, let the agent finish from the database."""
    with HerderClient(farm.url, timeout=5) as c:
        job = c.submit_job(job_spec("queued", 12))
    assert farm.master is not None
    farm.master.kill9()
    done = wait_for(
        lambda: (j := store.get_job(job.id)).state in ("succeeded", "failed") and j,
        45,
        "job finished from the database",
        agent.log_text,
    )
    check_exactly_once(done)
    text = agent.log_text()
    assert "event=mode_changed mode=autonomous" in text, text[-4000:]
    # Its heartbeats (through the store) mark it autonomous in the agents table.
    wait_for(
        lambda: [a.mode for a in store.list_agents()] == ["autonomous"],
        10,
        "agent row shows autonomous",
        agent.log_text,
    )
    return job.id


@pytest.mark.parametrize("policy", ["per-task", "interval:1"])
def test_autonomous_then_back_by_policy(farm: LocalFarm, policy: str) -> None:
    assert farm.db_url is not None
    farm.start_master()
    agent = start_agent(farm, policy)
    wait_registered(farm, agent)
    store = Store.open(farm.db_url, migrate=False)
    try:
        run_autonomous_phase(farm, agent, store)
        farm.start_master()  # a master is back (same address)
        # Visible in the directory as autonomous until it switches back.
        wait_for(
            lambda: agent_mode(farm.url) == "master", 20, "back in master mode", agent.log_text
        )
        assert f"event=mode_changed mode=master reason=policy:{policy}" in agent.log_text()
        # New work now flows through the master.
        with HerderClient(farm.url, timeout=5) as c:
            job2 = c.submit_job(job_spec("after", 4, 0.1))
        done = wait_for(
            lambda: (j := store.get_job(job2.id)).state in ("succeeded", "failed") and j,
            30,
            "second job",
            agent.log_text,
        )
        check_exactly_once(done)
        assert agent_mode(farm.url) == "master"
        assert agent.alive()
    finally:
        store.close()


def test_autonomous_never_until_told(farm: LocalFarm) -> None:
    assert farm.db_url is not None
    farm.start_master()
    agent = start_agent(farm, "never")
    wait_registered(farm, agent)
    store = Store.open(farm.db_url, migrate=False)
    try:
        run_autonomous_phase(farm, agent, store)
        farm.start_master()
        # The master is back, but the policy is never: it stays autonomous (and
        # the directory shows it so) and keeps taking work from the database.
        with HerderClient(farm.url, timeout=5) as c:
            job2 = c.submit_job(job_spec("still-autonomous", 4, 0.1))
        done = wait_for(
            lambda: (j := store.get_job(job2.id)).state in ("succeeded", "failed") and j,
            30,
            "job while autonomous",
            agent.log_text,
        )
        check_exactly_once(done)
        time.sleep(2.0)  # a few heartbeats (lease 3 s: every second)
        assert agent_mode(farm.url) == "autonomous"
        assert "mode=master" not in agent.log_text()
        # Talkback `mode` (the agent registered its endpoint with the master).
        view = httpx.get(f"{farm.url}/api/v1/agents", timeout=3).json()["agents"][0]
        if view.get("talkback_url"):
            r = httpx.post(
                f"{view['talkback_url'].rstrip('/')}/talkback/mode",
                json={"mode": "master"},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=5,
            )
            assert r.status_code == 200, r.text
        else:  # no talkback endpoint: the agent's local API
            agent.signal(signal.SIGUSR1)
        wait_for(
            lambda: agent_mode(farm.url) == "master", 15, "back in master mode", agent.log_text
        )
        assert "event=mode_changed mode=master reason=requested" in agent.log_text()
        with HerderClient(farm.url, timeout=5) as c:
            job3 = c.submit_job(job_spec("master-again", 3, 0.1))
        check_exactly_once(
            wait_for(
                lambda: (j := store.get_job(job3.id)).state in ("succeeded", "failed") and j,
                30,
                "job after return",
                agent.log_text,
            )
        )
    finally:
        store.close()


def test_sigusr1_requests_master_mode(farm: LocalFarm) -> None:
    """SIGUSR1 is the agent's local way back (also without talkback)."""
    assert farm.db_url is not None
    farm.start_master()
    agent = start_agent(farm, "never")
    wait_registered(farm, agent)
    assert farm.master is not None
    farm.master.kill9()
    wait_for(
        lambda: "event=mode_changed mode=autonomous" in agent.log_text(),
        20,
        "autonomous",
        agent.log_text,
    )
    farm.start_master()
    # Its row says autonomous once a heartbeat from autonomous mode landed (a
    # loaded machine may take a moment); with policy "never" it stays so.
    wait_for(lambda: agent_mode(farm.url) == "autonomous", 15, "autonomous row", agent.log_text)
    time.sleep(1.5)
    assert agent_mode(farm.url) == "autonomous"
    agent.signal(signal.SIGUSR1)
    wait_for(lambda: agent_mode(farm.url) == "master", 15, "master mode", agent.log_text)
