"""All masters down, no self-assignment: the agent backs off, then resumes (DESIGN §6).

A real master (PostgreSQL) and agent. The master is killed (SIGKILL); the
agent logs one ``event=all_masters_down wait_s=… ceiling_s=… round=…`` line
per backoff round (a round is shared by all the agent's threads: one probe
per round reaches the network). With full jitter the waits are random, so the
test checks the ceilings: 0.25 s doubling each round up to the cap
(``--backoff-max 2``), every wait within its ceiling, and rounds spaced at
least by their wait. A master started again is found, and a job submitted
then completes.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import pg
from herder.api_models import JobSubmit, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.localfarm import LocalFarm
from herder.store import Store
from waiting import wait_for, wait_registered

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]

ROUND = re.compile(r"event=all_masters_down wait_s=([\d.]+) ceiling_s=([\d.]+) round=(\d+)")


def rounds(text: str) -> list[tuple[float, float, int, float]]:
    """(wait_s, ceiling_s, round, logged at epoch s) of each backoff round in a JSON log."""
    out = []
    for line in text.splitlines():
        m = ROUND.search(line)
        if not m:
            continue
        try:
            ts = json.loads(line).get("ts")
        except ValueError:
            ts = None
        when = _epoch(ts) if isinstance(ts, str) else float("nan")
        out.append((float(m.group(1)), float(m.group(2)), int(m.group(3)), when))
    return out


def _epoch(ts: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("nan")


@pytest.fixture
def farm(pg_dsn: str, tmp_path: Path) -> Iterator[LocalFarm]:
    db_url = pg.create_database(pg_dsn)
    f = LocalFarm(db_url=db_url, workdir=tmp_path, lease_s=3.0, log_level="info")
    try:
        yield f
    finally:
        f.close()
        try:
            pg.drop_database(pg_dsn, db_url)
        except Exception:
            pass


def test_backoff_grows_to_cap_then_resumes(farm: LocalFarm) -> None:
    assert farm.db_url is not None
    farm.start_master()
    agent = farm.start_agent(2, name="b", extra=["--backoff-max", "2"])
    wait_registered(farm, agent)
    assert farm.master is not None
    farm.master.kill9()
    # Rounds: ceilings 0.25, 0.5, 1, 2, 2, ... (≈ 1 s per round at the cap).
    wait_for(lambda: len(rounds(agent.log_text())) >= 7, 40, "7 backoff rounds", agent.log_text)
    got = rounds(agent.log_text())
    ceilings = [c for _, c, _, _ in got]
    assert ceilings[:6] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0], got
    assert [r for _, _, r, _ in got] == list(range(1, len(got) + 1)), got
    for wait, ceiling, _, _ in got:
        assert 0.0 <= wait <= ceiling + 1e-9, got
    # The next round starts only once the previous wait is over (one shared round).
    # Log timestamps are taken a little after each round's clock reading: 0.2 s
    # of slack for a thread descheduled between the two on a loaded machine.
    for (w0, _, _, t0), (_, _, _, t1) in itertools.pairwise(got):
        if t0 == t0 and t1 == t1:  # timestamps parsed
            assert t1 - t0 >= w0 - 0.2, got
    assert "mode=autonomous" not in agent.log_text()
    assert agent.alive()

    # A master comes back: the agent finds it, and new work completes.
    farm.start_master()
    with HerderClient(farm.url, timeout=5) as c:
        job = c.submit_job(
            JobSubmit(
                name="after",
                stages=[StageSpec(name="s", tasks=[TaskSpec(command="echo hi") for _ in range(4)])],
            )
        )
        done = wait_for(
            lambda: (j := c.get_job(job.id)).state in ("succeeded", "failed") and j,
            30,
            "job after the master returned",
            agent.log_text,
        )
    assert done.state == "succeeded"
    assert "event=masters_back" in agent.log_text()
    store = Store.open(farm.db_url, migrate=False)
    try:
        listed = store.list_agents()
        assert listed and all(a.mode == "master" for a in listed), listed
    finally:
        store.close()
