"""Progress and stuck tasks end to end (issue 13): a real master and agent, real output.

- A task with a ``progress_pattern`` shows its progress in ``GET /tasks/{id}``
  while it runs (reported by heartbeat) and its last value when done; ``herder
  status`` prints it.
- A task with a ``stuck_timeout_s`` that prints nothing for that long is
  killed and fails as a command failure, "stuck: no output for N s"; one that
  keeps printing runs to its end.
- A bad pattern is refused at the door (422, nothing stored).
On SQLite and PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.api_models import JobSubmit, JobView, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.localfarm import LocalFarm
from waiting import wait_for

PROGRESS = (
    "import time\n"
    "for p in (10, 50):\n"
    "    print(f'Fra:{p} rendering {p}/100', flush=True); time.sleep(0.3)\n"
    "time.sleep(4)\n"
    "print('Fra:100 rendering 100/100', flush=True)\n"
)
STUCK = "import time; print('warming up', flush=True); time.sleep(60)"
CHATTY = "import time\nfor i in range(12):\n    print('tick', i, flush=True); time.sleep(0.25)\n"


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    # lease 10 s: heartbeats every 3.3 s, outlasting a stalled machine; a progress
    # change sends one early, and stuck timeouts are the agent's own clock.
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm", lease_s=10.0, log_level="info")
    try:
        f.start_master()
        f.start_agent(slots=3, name="watch")
        f.wait_agents(1)
        yield f
    finally:
        f.close(at_once=True)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _wait_done(client: HerderClient, job_id: int, timeout: float = 60.0) -> JobView:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still running after {timeout}s")


def test_progress_shows_while_running_and_when_done(farm: LocalFarm) -> None:
    with HerderClient(farm.url, timeout=10) as client:
        job = client.submit_job(
            JobSubmit(
                name="render",
                stages=[
                    StageSpec(
                        name="frames",
                        tasks=[
                            TaskSpec(
                                name="f",
                                command=_py(PROGRESS),
                                progress_pattern=r"rendering (\d+)/100",
                            )
                        ],
                    )
                ],
            )
        )
        task_id = job.stages[0].tasks[0].id
        # While it sleeps at 50 %: the master knows it (the task view and its attempt).
        agent_log = farm.agents[0].log_text
        wait_for(lambda: client.get_task(task_id).progress == 50.0, 15, "progress 50", agent_log)
        running = client.get_task(task_id)
        assert running.state in ("offered", "running")
        assert running.attempts[-1].progress == 50.0
        assert running.progress_pattern == r"rendering (\d+)/100"

        done = _wait_done(client, job.id)
        task = done.stages[0].tasks[0]
        assert done.state == "succeeded" and task.progress == 100.0
        out = subprocess.run(
            [sys.executable, "-m", "herder", "status", str(job.id), "--master", farm.url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert f"task {task_id} f succeeded exit=0 progress=100%" in out


def _one(name: str, code: str, **kw: object) -> JobSubmit:
    task = TaskSpec(name=name, command=_py(code), **kw)  # type: ignore[arg-type]
    return JobSubmit(name=name, stages=[StageSpec(name="s", tasks=[task])])


def test_stuck_task_is_killed_and_a_busy_one_is_not(farm: LocalFarm) -> None:
    with HerderClient(farm.url, timeout=10) as client:
        t0 = time.monotonic()
        # Separate jobs: the stuck task's failure fails its own job only.
        stuck_job = client.submit_job(_one("stuck", STUCK, stuck_timeout_s=1.5))
        chatty_job = client.submit_job(_one("chatty", CHATTY, stuck_timeout_s=1.5))
        stuck_id = stuck_job.stages[0].tasks[0].id
        agent_log = farm.agents[0].log_text
        wait_for(lambda: client.get_task(stuck_id).state == "failed", 30, "stuck killed", agent_log)
        assert time.monotonic() - t0 < 30  # not its 60 s sleep
        stuck = client.get_task(stuck_id)
        assert stuck.error == "stuck: no output for 1.5 s"
        assert stuck.failures == 1  # a command failure: it counts against max_attempts
        assert stuck.attempts[-1].error == "stuck: no output for 1.5 s"
        fails = [e for e in client.job_events(stuck_job.id) if e.kind == "task.fail"]
        assert [e.reason for e in fails] == ["stuck: no output for 1.5 s"]
        # The chatty task printed every 0.25 s for 3 s: never stuck.
        done = _wait_done(client, chatty_job.id)
        chatty = done.stages[0].tasks[0]
        assert chatty.state == "succeeded", chatty.error
        assert [a.state for a in chatty.attempts] == ["succeeded"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("progress_pattern", r"\d+%", "exactly one capturing group"),
        ("progress_pattern", r"(\d+%", "not a valid regular expression"),
        ("stuck_timeout_s", 0, "greater than 0"),
    ],
)
def test_bad_watch_fields_are_refused_at_the_door(
    farm: LocalFarm, field: str, value: object, message: str
) -> None:
    body = {"name": "bad", "stages": [{"name": "s", "tasks": [{"command": "true", field: value}]}]}
    with httpx.Client(base_url=farm.url, timeout=10, trust_env=False) as http:
        r = http.post("/api/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        err = r.json()
        assert err["error"] and message in err["message"] + str(err.get("detail"))
        assert http.get("/api/v1/jobs").json()["jobs"] == []  # nothing stored
