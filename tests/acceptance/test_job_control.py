"""Issue 13: control of running jobs, end to end, on SQLite and PostgreSQL.

``herder job pause|resume|retry|set`` (the real console script, a
subprocess) and the Python API (``herder.Client``) against a real master
and agent on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from herder import Client
from herder.api_models import JobView
from herder.client import ConflictError, NotFoundError
from herder.localfarm import LocalFarm
from waiting import wait_for

HERDER = str(Path(sys.executable).parent / "herder")


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm")
    f.start_master()
    f.start_agent(slots=1, name="a1")
    f.wait_agents(1)
    yield f
    f.close()


def herder(farm: LocalFarm, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    return subprocess.run(
        [HERDER, "job", *args, "--master", farm.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def submit(client: Client, n: int, command: str, **task: object) -> JobView:
    tasks = [{"command": command, **task} for _ in range(n)]
    return client.submit({"name": "ctl", "stages": [{"name": "s", "tasks": tasks}]})


def tasks_in(client: Client, job_id: int, *states: str) -> list[int]:
    job = client.get_job(job_id)
    return [t.id for s in job.stages for t in s.tasks if t.state in states]


def attempts_of(client: Client, job_id: int) -> int:
    return sum(len(t.attempts) for s in client.get_job(job_id).stages for t in s.tasks)


def still_for(pred: object, seconds: float) -> None:
    """``pred()`` holds at every look during ``seconds`` (a window, not a wait)."""
    assert callable(pred)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert pred()
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_pause_resume_set_and_conflicts_through_the_cli(farm: LocalFarm) -> None:
    with Client(farm.url) as client:
        job = submit(client, 20, "sleep 0.5")
        wait_for(lambda: tasks_in(client, job.id, "offered", "running"), 30, "a task runs")

        r = herder(farm, "pause", str(job.id))
        assert r.returncode == 0, r.stderr
        assert f"job {job.id} paused" in r.stdout
        # the running task finishes; nothing new starts for 2 s
        wait_for(lambda: not tasks_in(client, job.id, "offered", "running"), 5, "running one done")
        started = attempts_of(client, job.id)
        still_for(lambda: attempts_of(client, job.id) == started, 2.0)
        assert client.get_job(job.id).state == "paused"

        r = herder(farm, "resume", str(job.id))
        assert r.returncode == 0 and "running" in r.stdout, r.stderr
        wait_for(lambda: attempts_of(client, job.id) > started, 10, "the rest run")

        # 409: resume a running job; nothing changes
        r = herder(farm, "resume", str(job.id))
        assert r.returncode == 1 and "conflict" in r.stderr and "running" in r.stderr
        assert "Traceback" not in r.stderr

        # PATCH every field; a tag no agent offers leaves the tasks queued
        r = herder(farm, "pause", str(job.id))
        assert r.returncode == 0, r.stderr
        r = herder(
            farm, "set", str(job.id), "--priority", "5", "--tags", "gpu", "--ram-mb", "64",
            "--max-attempts", "3",
        )  # fmt: skip
        assert r.returncode == 0 and "priority 5" in r.stdout, r.stderr
        view = client.get_job(job.id)
        queued = [t for s in view.stages for t in s.tasks if t.state == "queued"]
        assert queued and all(
            (t.tags, t.ram_mb, t.max_attempts) == (["gpu"], 64, 3) for t in queued
        )
        assert view.priority == 5
        ev = [e for e in client.job_events(job.id) if e.kind == "job.update"]
        assert ev and ev[-1].reason and "tags=gpu" in ev[-1].reason
        assert herder(farm, "resume", str(job.id)).returncode == 0
        wait_for(lambda: not tasks_in(client, job.id, "offered", "running"), 5, "drained")
        n = attempts_of(client, job.id)
        still_for(lambda: attempts_of(client, job.id) == n, 1.0)

        # 422 naming the field, nothing changed
        r = herder(farm, "set", str(job.id), "--max-attempts", "0")
        assert r.returncode == 1 and "max_attempts" in r.stderr, r.stderr
        assert client.get_job(job.id).stages[0].tasks[-1].max_attempts == 3

        r = herder(farm, "set", str(job.id), "--tags", "")
        assert r.returncode == 0, r.stderr
        done = client.wait(job.id, timeout_s=60)
        assert done.state == "succeeded"
        r = herder(farm, "set", str(job.id), "--priority", "1")
        assert r.returncode == 1 and "succeeded" in r.stderr
        r = herder(farm, "pause", "999999")
        assert r.returncode == 1 and "not_found" in r.stderr


def _sleepers(agent_pid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(agent_pid).children(recursive=True):
        try:
            if "sleep" in " ".join(p.cmdline()) and "30" in p.cmdline():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.timeout(120)
def test_pause_kill_stops_the_process_and_requeues_without_a_failure(farm: LocalFarm) -> None:
    agent_pid = farm.agents[0].pid
    with Client(farm.url) as client:
        job = submit(client, 2, "sleep 30", max_attempts=1)
        (proc,) = wait_for(lambda: _sleepers(agent_pid), 30, "the task's process runs")
        born = proc.create_time()
        r = herder(farm, "pause", str(job.id), "--kill")
        assert r.returncode == 0, r.stderr
        # Killed, not run out: talkback pushes the kill at once, but only once;
        # if that push is lost the next heartbeat (every 10 s) carries it.
        proc.wait(timeout=20)
        assert time.time() - born < 25, "the sleep ran out its 30 s"
        view = client.get_job(job.id)
        assert view.state == "paused" and view.counts == {"queued": 2}
        assert all(t.failures == 0 for s in view.stages for t in s.tasks)
        assert [e for e in client.job_events(job.id) if e.kind == "task.preempt"]
        client.cancel_job(job.id)


@pytest.mark.timeout(120)
def test_retry_and_errors_through_the_python_api(farm: LocalFarm, tmp_path: Path) -> None:
    marker = tmp_path / "ran-once"
    cmd = f"test -f {marker} || {{ touch {marker}; exit 3; }}"
    with Client(farm.url) as client:
        job = submit(client, 1, cmd)
        assert client.wait(job.id, timeout_s=30).state == "failed"
        with pytest.raises(ConflictError, match="failed: cannot resume"):
            client.resume_job(job.id)
        again = client.retry_job(job.id)
        assert again.state == "running"
        done = client.wait(job.id, timeout_s=30)
        assert done.state == "succeeded"
        assert [e.kind for e in client.job_events(job.id)].count("job.retry") == 1
        with pytest.raises(ConflictError):
            client.retry_job(job.id)
        with pytest.raises(NotFoundError):
            client.pause_job(987654)
        # a bad PATCH body: 422 naming the field, nothing changed
        live = submit(client, 1, "sleep 5")
        for body, field in (
            ({"priority": 5000}, "priority"),
            ({"cpus": "many"}, "cpus"),
            ({"colour": "red"}, "colour"),
            ({}, "nothing to change"),
        ):
            r = httpx.patch(f"{farm.url}/api/v1/jobs/{live.id}", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"] == "invalid_request" and field in r.text
        assert client.get_job(live.id).priority == 0
        assert not [e for e in client.job_events(live.id) if e.kind == "job.update"]
        client.cancel_job(live.id)


def test_job_commands_without_master_act_on_the_embedded_state(tmp_path: Path) -> None:
    """``herder job`` with no --master uses the state ``herder run`` left in ./.herder."""
    from herder.store import Store
    from storekit import job as job_spec
    from storekit import tasks

    state = tmp_path / ".herder"
    state.mkdir()
    store = Store.open(f"sqlite:///{state / 'herder.db'}", migrate=True)
    try:
        job_id = store.submit(job_spec(tasks(2))).id
    finally:
        store.close()
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [HERDER, "job", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

    r = run("pause", str(job_id))
    assert r.returncode == 0 and "paused" in r.stdout, r.stderr
    r = run("set", str(job_id), "--priority", "9")
    assert r.returncode == 0 and "priority 9" in r.stdout, r.stderr
    r = run("retry", str(job_id))
    assert r.returncode == 1 and "cannot retry" in r.stderr
    r = run("resume", str(job_id))
    assert r.returncode == 0 and "running" in r.stdout, r.stderr
