"""Issue 13 loose ends end to end, on SQLite and PostgreSQL: a waiting job changed,
refused a pause and cancelled through the real HTTP API; a task rejected by its
pool's ACL shown with its reason by ``herder status``, the follow stream and the
exit status of ``herder submit --wait`` (real master and agent processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.localfarm import LocalFarm
from waiting import wait_for

HERDER = str(Path(sys.executable).parent / "herder")
REASON = "pool render: owner bob not allowed"


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm")
    f.start_master()
    yield f
    f.close()


def herder_argv(farm: LocalFarm, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "COLUMNS": "400"}
    env.pop("HERDER_MASTER", None)
    return [HERDER, *args, "--master", farm.url], env


def herder(farm: LocalFarm, *args: str) -> subprocess.CompletedProcess[str]:
    argv, env = herder_argv(farm, *args)
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL
    )


def body(name: str, n: int, command: str = "true", **kw: object) -> dict[str, object]:
    return {
        "name": name,
        "stages": [{"name": "s", "tasks": [{"command": command} for _ in range(n)]}],
        **kw,
    }


@pytest.mark.timeout(120)
def test_a_waiting_job_is_changed_refused_a_pause_and_cancelled_over_http(
    farm: LocalFarm,
) -> None:
    api = f"{farm.url}/api/v1"
    with httpx.Client(timeout=10) as c:
        parent = c.post(f"{api}/jobs", json=body("parent", 1, "sleep 1")).json()
        child = c.post(f"{api}/jobs", json=body("child", 3, depends_on=[parent["id"]])).json()
        gone = c.post(f"{api}/jobs", json=body("gone", 1, depends_on=[parent["id"]])).json()
        assert child["state"] == "waiting" and gone["state"] == "waiting"

        r = c.patch(
            f"{api}/jobs/{child['id']}",
            json={"priority": 9, "tags": ["linux"], "ram_mb": 64, "max_attempts": 5},
        )
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["state"] == "waiting" and view["priority"] == 9
        ts = view["stages"][0]["tasks"]
        assert [(t["state"], t["tags"], t["ram_mb"], t["max_attempts"]) for t in ts] == [
            ("blocked", ["linux"], 64, 5)
        ] * 3

        r = c.post(f"{api}/jobs/{child['id']}/pause")
        assert r.status_code == 409, r.text
        err = r.json()
        assert err["error"] == "conflict" and "waiting for the jobs it depends on" in err["message"]
        assert err["detail"] == {"job_id": child["id"], "state": "waiting"}
        assert c.get(f"{api}/jobs/{child['id']}").json()["state"] == "waiting"

        r = c.post(f"{api}/jobs/{gone['id']}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text

        # Released when the parent succeeds, with the change: it needs "linux".
        farm.start_agent(slots=2, name="a1", tags=["linux"])
        for jid in (parent["id"], child["id"]):
            wait_for(
                lambda jid=jid: c.get(f"{api}/jobs/{jid}").json()["state"] == "succeeded",
                60,
                f"job {jid} succeeded",
            )
        assert c.get(f"{api}/jobs/{gone['id']}").json()["state"] == "cancelled"
        kinds = [e["kind"] for e in c.get(f"{api}/jobs/{child['id']}/events").json()["events"]]
        assert kinds.index("job.update") < kinds.index("job.release")
        assert "job.pause" not in kinds


@pytest.mark.timeout(120)
def test_a_rejected_task_has_its_reason_in_status_follow_and_the_exit_status(
    farm: LocalFarm, tmp_path: Path
) -> None:
    api = f"{farm.url}/api/v1"
    jobfile = tmp_path / "bob.toml"
    jobfile.write_text(
        'name = "bob"\nowner = "bob"\npool = "render"\n\n[[stage]]\nname = "s"\n\n'
        '[[stage.task]]\ncommand = "true"\n\n[[stage.task]]\ncommand = "true"\n'
    )
    argv, env = herder_argv(farm, "submit", "--wait", str(jobfile))
    with httpx.Client(timeout=10) as c:
        # No agent yet: bob's job is queued when the ACL changes under it.
        waiter = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            jobs = wait_for(lambda: c.get(f"{api}/jobs").json()["jobs"], 30, "bob submitted")
            job_id = int(jobs[0]["id"])
            r = c.put(f"{api}/pools/render/acl", json={"allow": ["alice"]})
            assert r.status_code == 200, r.text
            farm.start_agent(slots=1, name="a1")  # its first claim rejects bob's tasks
            out, err = waiter.communicate(timeout=60)
        finally:
            if waiter.poll() is None:
                waiter.kill()
        assert waiter.returncode == 1, (out, err)
        assert f"job {job_id} failed" in out

        r = herder(farm, "status", str(job_id))
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("task ")]
        assert len(lines) == 2 and all(f"rejected error={REASON}" in ln for ln in lines), r.stdout
        assert "stage 0 s: failed (rejected=2)" in r.stdout
        assert f"job {job_id} bob: failed" in r.stdout

        page = c.get(f"{api}/jobs/{job_id}/follow", params={"after": 0, "wait_s": 0}).json()
        assert page["state"] == "failed"
        assert [(x["state"], x["error"], x["attempt_id"]) for x in page["results"]] == [
            ("rejected", REASON, None)
        ] * 2
