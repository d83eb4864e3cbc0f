"""The embedded farm and a networked farm run the same code (DESIGN §1, issue 8).

The same build runs both ways, `herder run` with its in-process farm and
`herder run --master` against a master and an agent that are separate
processes talking HTTP; the results (outputs, program output) and the event
history of every task (the transitions the store recorded) must be the same.
The embedded farm is also checked to be made of the very classes a
networked farm runs: the store, the master's service and the agent with its
executor, so only the transport differs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from herder.localfarm import LocalFarm
from herder.store import Store

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "examples" / "sum-of-squares" / "generate.py"
N = 6


def _herder(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    return subprocess.run(
        [sys.executable, "-m", "herder", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _outputs(workdir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workdir.iterdir())
        if p.is_file() and p.suffix == ".o"
    }


def _history(db_url: str) -> dict[tuple[str, str | None], list[tuple[str, str | None, str | None]]]:
    """Each task's transitions, keyed by (actionset, action label), and each job's.

    An ack (offered → running) is left out, and so the state a completion came
    from: whether a short task's start was acknowledged before its completion
    (which implies it) depends on timing, in both shapes of farm alike.
    """
    store = Store.open(db_url, migrate=False)
    try:
        names: dict[int, str] = {}
        tasks: dict[int, str | None] = {}
        for summary in store.list_jobs(limit=100):
            job = store.get_job(summary.id)
            names[job.id] = job.name.split(": ", 1)[1]
            for stage in job.stages:
                for t in stage.tasks:
                    tasks[t.id] = t.name
        out: dict[tuple[str, str | None], list[tuple[str, str | None, str | None]]] = {}
        for ev in store.list_events(limit=100_000):
            if ev.job_id is None:
                continue  # agent registrations differ by design (two agents, two ids)
            label = tasks.get(ev.task_id) if ev.task_id is not None else None
            if ev.kind == "task.ack":
                assert (ev.from_state, ev.to_state) == ("offered", "running")
                continue
            from_state = ev.from_state
            if ev.kind.startswith("task.") and from_state in ("offered", "running"):
                from_state = "offered|running"
            out.setdefault((names[ev.job_id], label), []).append((ev.kind, from_state, ev.to_state))
        return out
    finally:
        store.close()


def test_embedded_and_networked_farms_build_the_same_with_the_same_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No claim-ahead in either farm (the embedded agent's AgentConfig and the
    # agent process's --claim-ahead both read it): a compile that runs past the
    # window's threshold on a loaded machine would close it, and the offers
    # queued ahead would be released and offered again in one history only.
    monkeypatch.setenv("HERDER_CLAIM_AHEAD", "0")
    embedded = tmp_path / "embedded"
    networked = tmp_path / "networked"
    for d in (embedded, networked):
        subprocess.run([sys.executable, str(GENERATE), str(N), str(d)], check=True)
    expected = sum(i * i for i in range(1, N + 1))

    r = _herder("run", "--plain", "--slots", "1", cwd=embedded)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"[run[0] stdout] {expected}" in r.stdout

    with LocalFarm(workdir=tmp_path / "farm") as farm:
        farm.start_master()
        farm.start_agent(slots=1, name="one")
        farm.wait_agents(1)
        r2 = _herder("run", "--plain", "--master", farm.url, cwd=networked)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert f"[run[0] stdout] {expected}" in r2.stdout
        assert farm.db_url is not None
        farm_db = farm.db_url
        farm.stop(at_once=True)
        networked_history = _history(farm_db)

    assert _outputs(embedded) == _outputs(networked)
    assert len(_outputs(embedded)) == N + 1
    embedded_history = _history(f"sqlite:///{embedded / '.herder' / 'herder.db'}")
    assert embedded_history == networked_history
    # Every remote action went queued → offered → (running →) succeeded in both.
    for (_set, label), transitions in embedded_history.items():
        if label is not None:
            assert transitions[0] == ("task.offer", "queued", "offered")
            assert transitions[-1][2] == "succeeded"


def test_the_embedded_farm_is_made_of_the_networked_farms_parts(tmp_path: Path) -> None:
    from herder.agent.daemon import Agent
    from herder.agent.executor import Executor
    from herder.embedded import EmbeddedFarm
    from herder.inprocess import InProcessClient
    from herder.master.app import create_app
    from herder.master.service import MasterService

    with EmbeddedFarm(tmp_path / "state", 1) as farm:
        assert type(farm.store) is Store
        assert type(farm.service) is MasterService
        assert type(farm.agent) is Agent
        assert type(farm.agent.executor) is Executor
        assert type(farm.agent.client) is InProcessClient
        assert farm.agent.client.service is farm.service
        # The HTTP API wraps the same service class over the same store class.
        app = create_app(farm.store)
        assert type(app.state.service) is MasterService
        assert app.state.service.store is farm.store
