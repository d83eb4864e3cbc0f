"""The scheduler's knobs through a real master, a real agent and the CLI (issue 13).

An agent's --max-ram-mb keeps a big task off it until the limit is lifted at
run time (PATCH /agents/{id}, `herder limit`); owners' weights through
`herder share`; bad values are refused and change nothing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from aclfarm import HERDER, env, farm, wait_job
from waiting import wait_for


def _big_job(ram_mb: int) -> dict[str, object]:
    return {
        "name": "big",
        "owner": "ann",
        "stages": [{"name": "s", "tasks": [{"command": "true", "ram_mb": ram_mb}]}],
    }


def test_agent_limit_changed_at_run_time(db_url: str, tmp_path: Path) -> None:
    with farm(db_url, tmp_path) as f, httpx.Client(timeout=30) as client:
        f.agent("small", "--max-ram-mb", "1000", "--max-load", "500", "--slots", "1")
        agent_id = f.agent_id(client, "small")
        view = client.get(f"{f.api}/agents/{agent_id}").json()
        assert (view["max_ram_mb"], view["max_load"]) == (1000, 500)

        job_id = client.post(f"{f.api}/jobs", json=_big_job(2000)).json()["id"]
        # Offered nowhere while the limit stands (the agent is long-polling for work).
        wait_for(
            lambda: client.get(f"{f.api}/agents/{agent_id}").json()["last_seen_at"],
            30,
            "agent seen",
            f.logs,
        )
        assert client.get(f"{f.api}/jobs/{job_id}").json()["state"] == "queued"

        bad = client.patch(f"{f.api}/agents/{agent_id}", json={"max_load": -1})
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"
        assert client.get(f"{f.api}/agents/{agent_id}").json()["max_load"] == 500

        shown = f.herder("limit", agent_id)
        assert shown.returncode == 0, shown.stderr
        assert "max RAM 1000 MB, max load 500" in shown.stdout
        lifted = f.herder("limit", agent_id, "--max-ram-mb", "none")
        assert lifted.returncode == 0, lifted.stderr
        assert "max RAM all" in lifted.stdout
        assert wait_job(client, f, job_id)["state"] == "succeeded"
        kinds = [e["kind"] for e in client.get(f"{f.api}/events").json()["events"]]
        assert "agent.limits" in kinds

        nosuch = f.herder("limit", "no-such-agent", "--max-load", "2")
        assert nosuch.returncode == 1 and "not found" in nosuch.stderr
        badopt = f.herder("limit", agent_id, "--max-load", "lots")
        assert badopt.returncode == 2 and "--max-load" in badopt.stderr


def test_owner_weights_through_the_cli(db_url: str, tmp_path: Path) -> None:
    with farm(db_url, tmp_path) as f, httpx.Client(timeout=30) as client:
        done = f.herder("share", "ann", "2")
        assert done.returncode == 0, done.stderr
        assert "owner ann: weight 2" in done.stdout
        listed = f.herder("share", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {"owner": "ann", "weight": 2.0, "used_slot_s": 0.0} in json.loads(listed.stdout)
        for bad in (["ann", "0"], ["ann", "nan"], ["ann"]):
            r = f.herder("share", *bad)
            assert r.returncode == 2, (bad, r.stdout, r.stderr)
        job_id = client.post(f"{f.api}/jobs", json=_big_job(10)).json()["id"]
        bad = client.patch(f"{f.api}/jobs/{job_id}", json={"tags": ["gpu", "!gpu"]})
        assert bad.status_code == 422 and "both required and negated" in bad.json()["message"]
        gpus = client.patch(f"{f.api}/jobs/{job_id}", json={"gpus": 1})
        assert gpus.status_code == 200, gpus.text
        assert {t["gpus"] for t in gpus.json()["stages"][0]["tasks"]} == {1}
        refused = client.put(f"{f.api}/owners/ann/share", json={"weight": 1e9})
        assert refused.status_code == 422
        assert client.get(f"{f.api}/owners").json()["owners"] == [
            {"owner": "ann", "weight": 2.0, "used_slot_s": 0.0}
        ]


def test_bad_agent_tags_are_refused_at_start(tmp_path: Path) -> None:
    r = subprocess.run(
        [*HERDER, "agent", "--master", "http://127.0.0.1:9", "--tags", "linux,has space"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and "--tags" in r.stderr and "Traceback" not in r.stderr


def test_python_api_sets_limits_and_weights(db_url: str, tmp_path: Path) -> None:
    from herder import Client

    with farm(db_url, tmp_path) as f, httpx.Client(timeout=30) as client, Client(f.url) as api:
        f.agent("pyapi", "--slots", "1")
        agent_id = f.agent_id(client, "pyapi")
        view = api.set_agent_limits(agent_id, max_ram_mb=1500, max_load=4.0)
        assert (view.max_ram_mb, view.max_load) == (1500, 4.0)
        assert api.set_agent_limits(agent_id, max_load=None).max_load is None
        assert api.get_agent(agent_id).max_ram_mb == 1500  # untouched by the second call
        assert api.set_owner_weight("bob", 3).weight == 3.0
        assert [(s.owner, s.weight) for s in api.owner_shares()] == [("bob", 3.0)]
