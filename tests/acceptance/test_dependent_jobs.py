"""Issue 13: a dependent job runs after its parent, end to end, on SQLite and PostgreSQL.

The real console script (``herder submit --depends-on``, ``herder status``)
against a real master and a real agent with slots to spare: without the
dependency the child would start at once, beside its parent. The event log
shows the parent succeeded before the child's first task was offered. A
child declared in its TOML job file (``depends_on``, ``frame_order``)
renders its frames first, last, then middle-out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from herder import Client
from herder.localfarm import LocalFarm
from waiting import until_file, wait_for

HERDER = str(Path(sys.executable).parent / "herder")


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm")
    f.start_master()
    f.start_agent(slots=4, name="a1")
    f.wait_agents(1)
    yield f
    f.close()


def herder(farm: LocalFarm, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    return subprocess.run(
        [HERDER, *args, "--master", farm.url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def still_for(pred: Callable[[], bool], seconds: float) -> None:
    """``pred()`` holds at every look during ``seconds`` (a window, not a wait)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert pred()
        time.sleep(0.05)


def submitted_id(r: subprocess.CompletedProcess[str]) -> int:
    assert r.returncode == 0, r.stderr
    m = re.search(r"^job (\d+) ", r.stdout, re.M)
    assert m is not None, r.stdout
    return int(m.group(1))


@pytest.mark.timeout(240)
def test_dependent_job_runs_after_its_parent_through_the_cli(
    farm: LocalFarm, tmp_path: Path
) -> None:
    work = tmp_path / "jobs"
    work.mkdir()
    go = tmp_path / "go"  # the parent runs until the test lets it finish
    (work / "parent.toml").write_text(
        f'name = "parent"\n[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "{until_file(go)}"\n'
    )
    (work / "child.toml").write_text(
        'name = "child"\n[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "echo child"\n'
    )
    parent = submitted_id(herder(farm, "submit", "parent.toml", cwd=work))
    r = herder(farm, "submit", "child.toml", "--depends-on", str(parent), cwd=work)
    child = submitted_id(r)
    assert f"job {child} waiting" in r.stdout
    (work / "frames.toml").write_text(
        f'name = "frames"\ndepends_on = [{child}]\nframe_order = "first-last-middle"\n'
        '[[stage]]\nname = "render"\n[[stage.frames]]\ncommand = "echo {start}"\n'
        'frames = "1-9"\n'
    )
    frames = submitted_id(herder(farm, "submit", "frames.toml", cwd=work))

    r = herder(farm, "status", str(child), cwd=work)
    assert r.returncode == 0, r.stderr
    assert f"depends on: {parent} parent" in r.stdout and f"/api/v1/jobs/{parent}" in r.stdout
    assert f"dependents: {frames} frames (waiting)" in r.stdout

    # --depends-on: a job that does not exist is refused, nothing submitted
    r = herder(farm, "submit", "child.toml", "--depends-on", "999999", cwd=work)
    assert r.returncode == 1 and "999999" in r.stderr and "Traceback" not in r.stderr

    with Client(farm.url) as client:
        wait_for(lambda: client.get_job(parent).state == "running", 30, "the parent runs")
        # The agent has 3 free slots, yet nothing of the children starts.
        still_for(lambda: client.get_job(child).counts == {"blocked": 1}, 1.5)
        assert client.get_job(frames).state == "waiting"
        go.touch()
        assert client.wait(frames, timeout_s=120).state == "succeeded"
        assert client.get_job(child).state == "succeeded"
        assert client.get_job(parent).dependents[0].id == child
        parent_done = next(e for e in client.job_events(parent) if e.kind == "job.succeed")
        for later, before in ((child, parent_done), (frames, None)):
            offers = [e for e in client.job_events(later) if e.kind == "task.offer"]
            release = next(e for e in client.job_events(later) if e.kind == "job.release")
            if before is not None:
                assert before.at <= release.at and before.id < release.id
            assert release.at <= min(e.at for e in offers)
            assert release.id < min(e.id for e in offers)
        child_done = next(e for e in client.job_events(child) if e.kind == "job.succeed")
        first_frame = min(
            (e for e in client.job_events(frames) if e.kind == "task.offer"), key=lambda e: e.id
        )
        assert child_done.at <= first_frame.at

        offered = [
            e.task_id for e in client.job_events(frames) if e.kind == "task.offer" and e.task_id
        ]
        # First offers only: a frame slow enough on a loaded machine closes the
        # claim-ahead window, and the frames claimed ahead are released and offered again.
        names = [client.get_task(t).name for t in dict.fromkeys(offered)]
        assert names == [f"render[{f}]" for f in (1, 9, 5, 3, 7, 2, 4, 6, 8)]
