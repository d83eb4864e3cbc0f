"""Every advertised ``href`` resolves (issue 11): a real master and agent run a
job with an output and a log, then the test walks the master's answers from
the job list outwards (jobs, tasks, attempts, logs, agents, events, blobs,
masters) and GETs every ``href``-named field it finds: each answers 200.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from herder.localfarm import LocalFarm
from waiting import wait_for


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFarm]:
    f = LocalFarm(workdir=tmp_path_factory.mktemp("hrefs"))
    f.start_master()
    f.start_agent(slots=1, name="h1")
    f.wait_agents(1)
    yield f
    f.close()


def hrefs_in(value: Any) -> Iterator[tuple[str, str]]:
    """(field name, href) of every field named ``href`` or ``*_href``, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if (key == "href" or key.endswith("_href")) and isinstance(item, str):
                yield key, item
            else:
                yield from hrefs_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from hrefs_in(item)


def test_every_advertised_href_answers_200(farm: LocalFarm) -> None:
    http = httpx.Client(base_url=farm.url, timeout=30, trust_env=False)
    parent = http.post(
        "/api/v1/jobs",
        json={"name": "parent", "stages": [{"name": "s", "tasks": [{"command": "true"}]}]},
    )
    assert parent.status_code == 201, parent.text
    task = {"command": "echo out; echo err >&2; echo data > result.txt", "outputs": ["result.txt"]}
    body = {
        "name": "hrefs",
        "depends_on": [parent.json()["id"]],
        "stages": [{"name": "s", "tasks": [task]}],
    }
    r = http.post("/api/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    done = wait_for(
        lambda: http.get(f"/api/v1/jobs/{job_id}").json()["state"] == "succeeded",
        60,
        "job succeeded",
        lambda: farm.agents[0].log_text()[-3000:],
    )
    assert done

    # An uploaded blob's answer advertises its href too.
    stored = http.put("/api/v1/blobs/" + hashlib.sha256(b"blob").hexdigest(), content=b"blob")
    assert stored.status_code == 201, stored.text

    # Starting points: the collections, the job's events, the upload's answer;
    # then whatever they link to.
    start = ["/api/v1/jobs", f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/events"]
    start += [stored.json()["href"]]
    start += ["/api/v1/agents", "/api/v1/masters"]
    queue: deque[tuple[str, str]] = deque(("start", p) for p in start)
    seen: dict[str, int] = {}
    kinds: set[str] = set()
    while queue:
        field, href = queue.popleft()
        if href in seen:
            continue
        r = http.get(href)
        seen[href] = r.status_code
        assert r.status_code == 200, f"{field} {href}: {r.status_code} {r.text[:300]}"
        kinds.add(href.split("/")[3] if href.count("/") >= 3 else href)
        if r.headers.get("content-type", "").startswith("application/json"):
            queue.extend(hrefs_in(r.json()))
    # The walk reached every kind of resource the job touched.
    assert {"jobs", "tasks", "attempts", "agents", "masters", "blobs"} <= kinds, sorted(seen)
    assert any(h.endswith("/log") for h in seen), sorted(seen)
    assert f"/api/v1/jobs/{parent.json()['id']}" in seen  # through depends_on
    # An output names its blob by digest (no href): that blob is there too.
    attempt = http.get(f"/api/v1/jobs/{job_id}").json()["stages"][0]["tasks"][0]["attempts"][-1]
    [output] = attempt["outputs"]
    got = http.get(f"/api/v1/blobs/{output['digest']}")
    assert got.status_code == 200 and got.content == b"data\n"
    http.close()
