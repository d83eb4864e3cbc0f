"""Issue 13's acceptance: a render farm with fair share, agent limits and a dependent job,
on SQLite and PostgreSQL.

A real master and two real agents (subprocesses on loopback), as a user runs them:

- ``render`` (``--tags linux,blender --max-ram-mb 3000 --slots 2``) and ``small``
  (``--tags linux --max-ram-mb 1500 --slots 2``): with ``ram_mb = 1000`` per task,
  ``small`` may only ever run one task at a time although it has two slots;
- owners alice and bob with weights 2:1 (``PUT /api/v1/owners/{owner}/share``),
  each submitting a 240-frame job in chunks of 10 (TOML job files, ``herder
  submit``): 24 tasks each, tagged ``linux`` only, so both owners' tasks can run
  on both agents and the split is the scheduler's to make, not the tags';
- carol's job ``depends_on`` alice's, and needs ``blender`` (only ``render``).

Each task's process prints its own start and end (``time.time()``, one clock: one
machine), which the agents ship back as its log: what really ran when. The
server's attempts (``offered_at``, ``started_at``, ``finished_at``, its ``agent_id``)
say what the claim reserved when. Checked:

- the slot-seconds of the attempts started while both owners had queued work split
  within ±10 % of 2:1;
- RAM is never over-committed on an agent: neither the reservations (from offer to
  completion, the server's clock) nor the running processes (the tasks' clock) of
  one agent ever add up past its ``--max-ram-mb``; tags are never violated;
- carol's first task was offered after alice's job finished (the server's clock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from herder.localfarm import LocalFarm
from waiting import wait_for

HERDER = str(Path(sys.executable).parent / "herder")
TASK_S = 0.4
RAM_MB = 1000
AGENTS = {
    # name: (tags, max_ram_mb, slots)
    "render": (["linux", "blender"], 3000, 2),
    "small": (["linux"], 1500, 2),
}
WEIGHTS = {"alice": 2.0, "bob": 1.0}


@dataclass(frozen=True)
class Run:
    """One attempt: where, what it reserved (server clock), when it ran (task's clock)."""

    owner: str
    job_id: int
    agent: str
    tags: tuple[str, ...]
    ram_mb: int
    offered: datetime
    finished: datetime
    began: float
    ended: float


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm")
    f.start_master()
    yield f
    f.close()


def herder(farm: LocalFarm, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    return subprocess.run(
        [HERDER, *args, "--master", farm.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def job_file(path: Path, owner: str, frames: str, tags: list[str]) -> Path:
    # The process reports its own start and end: the agent's log of what ran when.
    script = f"import time; a = time.time(); time.sleep({TASK_S}); print(a, time.time())"
    tag_list = ", ".join(f'"{t}"' for t in tags)
    path.write_text(
        f'name = "{owner}-shot"\n'
        f'owner = "{owner}"\n'
        'pool = "render"\n\n'
        "[[stage]]\n"
        'name = "render"\n\n'
        "[[stage.frames]]\n"
        f'command = [{_toml(sys.executable)}, "-c", {_toml(script)}]\n'
        f'frames = "{frames}"\n'
        "chunk = 10\n"
        f"ram_mb = {RAM_MB}\n"
        f"tags = [{tag_list}]\n"
    )
    return path


def _toml(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string


def submit(farm: LocalFarm, path: Path, *extra: str) -> int:
    r = herder(farm, "submit", str(path), *extra)
    assert r.returncode == 0, r.stderr
    # "job 7 queued http://…/api/v1/jobs/7"
    words = r.stdout.split()
    assert words[0] == "job", r.stdout
    return int(words[1])


def runs_of(c: httpx.Client, api: str, job_id: int, names: dict[str, str]) -> list[Run]:
    job = c.get(f"{api}/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["state"]
    page = c.get(f"{api}/jobs/{job_id}/follow", params={"after": 0, "wait_s": 0}).json()
    printed = {r["attempt_id"]: r["stdout"] for r in page["results"]}
    out: list[Run] = []
    for stage in job["stages"]:
        for task in stage["tasks"]:
            for a in task["attempts"]:
                assert a["state"] == "succeeded", a
                began, ended = (float(x) for x in printed[a["id"]].split())
                out.append(
                    Run(
                        owner=job["owner"],
                        job_id=job_id,
                        agent=names[a["agent_id"]],
                        tags=tuple(task["tags"]),
                        ram_mb=int(task["ram_mb"]),
                        offered=datetime.fromisoformat(a["offered_at"]),
                        finished=datetime.fromisoformat(a["finished_at"]),
                        began=began,
                        ended=ended,
                    )
                )
    return out


def peak_ram(intervals: list[tuple[Any, Any, int]]) -> int:
    """The most RAM held at once by half-open intervals ``[start, end)``."""
    points = sorted(
        [(s, 1, mb) for s, _, mb in intervals] + [(e, 0, mb) for _, e, mb in intervals],
        key=lambda p: (p[0], p[1]),  # an end before a start at the same instant
    )
    held = peak = 0
    for _, is_start, mb in points:
        held += mb if is_start else -mb
        peak = max(peak, held)
    return peak


@pytest.mark.timeout(120)
def test_fair_share_agent_limits_and_a_dependent_job(farm: LocalFarm, tmp_path: Path) -> None:
    api = f"{farm.url}/api/v1"
    with httpx.Client(timeout=10) as c:
        for owner, weight in WEIGHTS.items():
            r = c.put(f"{api}/owners/{owner}/share", json={"weight": weight})
            assert r.status_code == 200 and r.json()["weight"] == weight, r.text
        # Both owners' work is queued before any agent claims: they compete from the start.
        alice = submit(farm, job_file(tmp_path / "alice.toml", "alice", "1-240", ["linux"]))
        bob = submit(farm, job_file(tmp_path / "bob.toml", "bob", "1-240", ["linux"]))
        carol = submit(
            farm,
            job_file(tmp_path / "carol.toml", "carol", "1-40", ["blender"]),
            "--depends-on",
            str(alice),
        )
        assert c.get(f"{api}/jobs/{carol}").json()["state"] == "waiting"
        for name, (tags, max_ram, slots) in AGENTS.items():
            farm.start_agent(
                slots=slots, name=name, tags=tags, extra=["--max-ram-mb", str(max_ram)]
            )
        farm.wait_agents(2)
        agents = c.get(f"{api}/agents").json()["agents"]
        names = {a["id"]: a["name"] for a in agents}
        assert {a["name"]: a["max_ram_mb"] for a in agents} == {n: v[1] for n, v in AGENTS.items()}

        def done() -> bool:
            states = [c.get(f"{api}/jobs/{j}").json()["state"] for j in (alice, bob, carol)]
            assert "failed" not in states and "cancelled" not in states, states
            return states == ["succeeded"] * 3

        wait_for(done, 90, "every job succeeded")
        runs = {j: runs_of(c, api, j, names) for j in (alice, bob, carol)}

    assert [len(runs[j]) for j in (alice, bob, carol)] == [24, 24, 4]  # one attempt each
    everything = [r for rs in runs.values() for r in rs]

    # Tags: a task only ever ran on an agent with all its tags.
    for r in everything:
        assert set(r.tags) <= set(AGENTS[r.agent][0]), r
    assert {r.agent for r in runs[carol]} == {"render"}

    # RAM, per agent: reservations (offer to completion) and processes never over-commit.
    for name, (_, max_ram, _) in AGENTS.items():
        mine = [r for r in everything if r.agent == name]
        assert mine, f"agent {name} ran nothing"
        reserved = peak_ram([(r.offered, r.finished, r.ram_mb) for r in mine])
        running = peak_ram([(r.began, r.ended, r.ram_mb) for r in mine])
        assert reserved <= max_ram, (name, reserved)
        assert running <= max_ram, (name, running)
    # The limit was what held "small" back: two slots, one task at a time.
    assert (
        peak_ram([(r.began, r.ended, r.ram_mb) for r in everything if r.agent == "small"]) == 1000
    )

    # Fair share: every attempt that started while both owners had queued work (up to
    # the start of the first owner's last task: after it, that owner had nothing left
    # to ask for), with the slot-seconds it ran. Each free slot was the scheduler's
    # choice between the two owners; clipping the runs at the window's end instead
    # would count how a few tasks happened to straddle it, not what was chosen.
    end = min(max(r.began for r in runs[j]) for j in (alice, bob))
    used = {
        owner: sum(r.ended - r.began for r in runs[j] if r.began <= end)
        for owner, j in (("alice", alice), ("bob", bob))
    }
    ratio = used["alice"] / used["bob"]
    start = min(r.began for r in everything)
    timeline = "\n".join(
        f"{r.began - start:7.3f} {r.ended - start:7.3f} {r.owner:6} {r.agent}"
        for r in sorted(everything, key=lambda r: r.began)
    )
    assert 1.8 <= ratio <= 2.2, f"alice:bob {ratio:.3f} {used}\n{timeline}"

    # The dependent job: its first task was offered after its parent finished.
    alice_view = httpx.get(f"{api}/jobs/{alice}", timeout=10).json()
    parent_done = datetime.fromisoformat(alice_view["finished_at"])
    first_offer = min(r.offered for r in runs[carol])
    assert first_offer >= parent_done, (first_offer, parent_done)
    assert min(r.began for r in runs[carol]) >= max(r.ended for r in runs[alice])
