"""Job dependencies (issue 13) through a real master process's HTTP API, SQLite and PostgreSQL.

A master (``herder.localfarm``) on loopback; the test plays the agent with
the real client (register, claim, complete), so it decides which task ends
how. ``depends_on`` round-trips with hrefs both ways, a waiting child is
never offered, fail and hold behave per ``on_parent_failure``, a retried
parent releases a held child, and bad ``depends_on`` is a 422 JSON error
that writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from herder import Client
from herder.api_models import (
    AgentRegister,
    ClaimRequest,
    Completion,
    JobSubmit,
    JobView,
    Offer,
)
from herder.client import ConflictError, HerderClient
from herder.localfarm import LocalFarm


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm")
    f.start_master()
    yield f
    f.close()


@pytest.fixture
def client(farm: LocalFarm) -> Iterator[HerderClient]:
    with HerderClient(farm.url) as c:
        yield c


@pytest.fixture
def http(farm: LocalFarm) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{farm.url}/api/v1", timeout=30.0, trust_env=False) as h:
        yield h


def spec(name: str, n: int = 1, **kw: Any) -> JobSubmit:
    tasks = [{"command": f"echo {name} {i}"} for i in range(n)]
    return JobSubmit.model_validate({"name": name, "stages": [{"name": "s", "tasks": tasks}], **kw})


class Agent:
    """The test's hands on the claim protocol."""

    def __init__(self, client: HerderClient) -> None:
        self.client = client
        view = client.register_agent(
            AgentRegister(name="fake", hostname="host", slots=16, tags=[], cpus=16)
        )
        self.id = view.id

    def claim(self, n: int = 16) -> list[Offer]:
        return self.client.claim(self.id, ClaimRequest(max_tasks=n)).offers

    def finish(self, offer: Offer, code: int = 0) -> None:
        self.client.complete(
            Completion(
                attempt_id=offer.attempt_id, token=offer.token, outcome="exited", exit_code=code
            )
        )

    def run(self, job_id: int) -> None:
        offers = self.claim()
        assert offers and {o.job_id for o in offers} == {job_id}
        for o in offers:
            self.finish(o)


def kinds(client: HerderClient, job_id: int) -> list[str]:
    return [e.kind for e in client.job_events(job_id)]


def rows(http: httpx.Client) -> int:
    return len(http.get("/jobs", params={"limit": 10_000}).json()["jobs"])


def test_child_waits_links_both_ways_and_runs_after_its_parent(
    client: HerderClient, http: httpx.Client
) -> None:
    agent = Agent(client)
    parent = client.submit_job(spec("parent", 2))
    child = client.submit_job(spec("child", 2, depends_on=[parent.id]))
    assert child.state == "waiting"

    body = http.get(f"/jobs/{child.id}").json()
    assert body["depends_on"] == [
        {"id": parent.id, "href": f"/api/v1/jobs/{parent.id}", "name": "parent", "state": "queued"}
    ]
    assert body["dependents"] == [] and body["on_parent_failure"] == "fail"
    parent_body = http.get(f"/jobs/{parent.id}").json()
    assert [(j["id"], j["href"]) for j in parent_body["dependents"]] == [
        (child.id, f"/api/v1/jobs/{child.id}")
    ]
    # follow the href: it is the child
    href = parent_body["dependents"][0]["href"]
    assert http.get(href.removeprefix("/api/v1")).json()["name"] == "child"
    waiting = http.get("/jobs", params={"state": "waiting"}).json()["jobs"]
    assert [j["id"] for j in waiting] == [child.id]

    offers = agent.claim()
    assert sorted(o.job_id for o in offers) == [parent.id, parent.id]
    agent.finish(offers[0])
    assert agent.claim() == []
    agent.finish(offers[1])
    assert client.get_job(child.id).state == "queued"
    agent.run(child.id)
    assert client.get_job(child.id).state == "succeeded"

    ev = {e.kind: e for e in client.job_events(parent.id)}
    child_ev = client.job_events(child.id)
    release = next(e for e in child_ev if e.kind == "job.release")
    first_offer = min((e for e in child_ev if e.kind == "task.offer"), key=lambda e: e.id)
    assert ev["job.succeed"].at <= release.at <= first_offer.at
    assert ev["job.succeed"].id < release.id < first_offer.id


def test_fail_and_hold_children_and_retry_releasing_the_held_one(
    client: HerderClient, http: httpx.Client
) -> None:
    agent = Agent(client)
    parent = client.submit_job(spec("parent"))
    failing = client.submit_job(spec("failing", depends_on=[parent.id]))
    held = client.submit_job(spec("held", depends_on=[parent.id], on_parent_failure="hold"))
    (o,) = agent.claim()
    agent.finish(o, code=3)

    view = client.get_job(failing.id)
    assert view.state == "failed"
    assert {t.state for s in view.stages for t in s.tasks} == {"cancelled"}
    assert "job.fail" in kinds(client, failing.id)
    view = client.get_job(held.id)
    assert view.state == "waiting" and view.on_parent_failure == "hold"
    assert "job.hold" in kinds(client, held.id)
    assert [j.state for j in client.get_job(parent.id).dependents] == ["failed", "waiting"]

    # a failed child cannot be retried before its parent succeeded: 409, nothing changes
    with pytest.raises(ConflictError, match="not succeeded"):
        client.retry_job(failing.id)
    assert client.get_job(failing.id).state == "failed"

    r = http.post(f"/jobs/{parent.id}/retry")
    assert r.status_code == 200, r.text
    agent.run(parent.id)
    assert client.get_job(parent.id).state == "succeeded"
    assert client.get_job(held.id).state == "queued"
    agent.run(held.id)
    assert client.get_job(held.id).state == "succeeded"
    assert client.get_job(failing.id).state == "failed"  # failed stays failed until retried
    client.retry_job(failing.id)
    agent.run(failing.id)
    assert client.get_job(failing.id).state == "succeeded"


def test_bad_depends_on_is_a_422_that_writes_nothing(
    client: HerderClient, http: httpx.Client
) -> None:
    agent = Agent(client)
    parent = client.submit_job(spec("parent"))
    before = rows(http)

    def post(**kw: Any) -> httpx.Response:
        return http.post("/jobs", json=spec("child", **kw).model_dump(mode="json"))

    r = post(depends_on=[parent.id, 987654])
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request" and "987654" in body["message"]
    assert body["detail"]["unknown"] == [987654]

    r = http.post(
        "/jobs",
        json={"name": "x", "stages": [{"name": "s", "tasks": [{"command": "true"}]}],
              "depends_on": ["first"]},
    )  # fmt: skip
    assert r.status_code == 422 and "depends_on" in r.text

    r = http.post(
        "/jobs",
        json={"name": "x", "stages": [{"name": "s", "tasks": [{"command": "true"}]}],
              "on_parent_failure": "ignore"},
    )  # fmt: skip
    assert r.status_code == 422 and "on_parent_failure" in r.text

    # a self-reference: the job of this idempotency key, named as its own parent
    keyed = client.submit_job(spec("keyed", idempotency_key="dep-key-1"))
    r = post(depends_on=[keyed.id], idempotency_key="dep-key-1")
    assert r.status_code == 422 and "cannot depend on itself" in r.json()["message"]
    # the same submission again is the same job, still (idempotent)
    again = http.post("/jobs", json=spec("keyed", idempotency_key="dep-key-1").model_dump())
    assert again.status_code == 200 and again.json()["id"] == keyed.id

    (o,) = [o for o in agent.claim() if o.job_id == parent.id]
    agent.finish(o, code=1)
    r = post(depends_on=[parent.id])
    assert r.status_code == 422 and "did not succeed" in r.json()["message"]
    assert r.json()["detail"]["failed"] == [{"id": parent.id, "state": "failed"}]
    assert rows(http) == before + 1  # only the keyed job
    for j in http.get("/jobs").json()["jobs"]:
        assert JobView.model_validate(http.get(f"/jobs/{j['id']}").json()).dependents == []


def test_openapi_documents_depends_on(farm: LocalFarm) -> None:
    doc = httpx.get(f"{farm.url}/openapi.json", timeout=30.0, trust_env=False).json()
    schemas = doc["components"]["schemas"]
    assert "depends_on" in schemas["JobSubmit"]["properties"]
    assert {"depends_on", "dependents"} <= set(schemas["JobView"]["properties"])
    assert "waiting" in str(schemas["JobView"]["properties"]["state"])


def test_python_api_submits_with_depends_on(farm: LocalFarm, client: HerderClient) -> None:
    agent = Agent(client)
    with Client(farm.url) as py:
        parent = py.submit({"name": "p", "stages": [{"name": "s", "tasks": [{"command": "x"}]}]})
        child = py.submit(
            spec("c", depends_on=[parent.id]), depends_on=[parent.id], on_parent_failure="hold"
        )
        assert child.state == "waiting" and child.on_parent_failure == "hold"
        assert [(j.id, j.href) for j in child.depends_on] == [(parent.id, parent.href)]
        agent.run(parent.id)
        assert py.get_job(child.id).state == "queued"
        agent.run(child.id)
        assert py.wait(child.id, timeout_s=30).state == "succeeded"
