"""Master HTTP API of issue 4 against a real master process: idempotent
submission under concurrency, drain/undrain, the events feed, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.api_models import (
    AgentRegister,
    ClaimRequest,
    Completion,
    Heartbeat,
    JobSubmit,
    RunningAttempt,
    StageSpec,
    TaskSpec,
)
from herder.client import HerderClient
from herder.localfarm import LocalFarm


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFarm]:
    f = LocalFarm(workdir=tmp_path_factory.mktemp("farm"), lease_s=30, ack_timeout_s=30)
    f.start_master()
    try:
        yield f
    finally:
        f.close()


def job_body(key: str | None, n: int = 2, name: str = "j") -> dict[str, object]:
    spec = JobSubmit(
        name=name,
        idempotency_key=key,
        stages=[StageSpec(name="s", tasks=[TaskSpec(command=f"echo {i}") for i in range(n)])],
    )
    return spec.model_dump(mode="json", exclude_none=True)


def test_concurrent_submits_with_one_key_make_one_job(farm: LocalFarm) -> None:
    body = job_body("same-key-http", n=3)
    n = 12
    barrier = threading.Barrier(n)
    answers: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            with httpx.Client(base_url=farm.url, timeout=30) as c:
                barrier.wait()
                r = c.post("/api/v1/jobs", json=body)
                answers.append((r.status_code, r.json()["id"]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len({job_id for _, job_id in answers}) == 1
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * (n - 1) + [201]
    jobs = httpx.get(f"{farm.url}/api/v1/jobs", params={"limit": 1000}).json()["jobs"]
    (job_id,) = {job_id for _, job_id in answers}
    job = httpx.get(f"{farm.url}/api/v1/jobs/{job_id}").json()
    assert job["idempotency_key"] == "same-key-http"
    assert sum(1 for j in jobs if j["id"] == job_id) == 1
    assert sum(job["counts"].values()) == 3
    submits = httpx.get(f"{farm.url}/api/v1/jobs/{job_id}/events").json()["events"]
    assert [e["kind"] for e in submits].count("job.submit") == 1
    after = submits[-1]["id"]
    assert httpx.get(f"{farm.url}/api/v1/jobs/{job_id}/events?after={after}").json() == {
        "events": []
    }
    r = httpx.get(f"{farm.url}/api/v1/jobs/987654/events")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_drain_and_undrain_over_http(farm: LocalFarm) -> None:
    with HerderClient(farm.url, timeout=10) as client:
        client.register_agent(AgentRegister(agent_id="drainee", name="d", hostname="h", slots=2))
        client.submit_job(JobSubmit.model_validate(job_body(None, n=2, name="for-drain")))
        r = httpx.post(f"{farm.url}/api/v1/agents/drainee/drain")
        assert r.status_code == 200 and r.json()["state"] == "draining"
        claim = client.claim("drainee", ClaimRequest(max_tasks=2))
        assert claim.offers == [] and claim.drain is True
        hb = client.heartbeat("drainee", Heartbeat())
        assert hb.drain is True
        r = httpx.post(f"{farm.url}/api/v1/agents/drainee/undrain")
        assert r.status_code == 200 and r.json()["state"] == "online"
        assert client.heartbeat("drainee", Heartbeat()).drain is False
        claim = client.claim("drainee", ClaimRequest(max_tasks=2))
        assert len(claim.offers) >= 1 and claim.drain is False
        for o in claim.offers:
            client.complete(
                Completion(attempt_id=o.attempt_id, token=o.token, outcome="exited", exit_code=0)
            )
    r = httpx.post(f"{farm.url}/api/v1/agents/nobody/drain")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_events_feed(farm: LocalFarm) -> None:
    with HerderClient(farm.url, timeout=10) as client:
        client.register_agent(AgentRegister(agent_id="ev", name="ev", hostname="h", slots=1))
        # top priority: the module's farm has other jobs' tasks queued too
        job = client.submit_job(
            JobSubmit.model_validate({**job_body(None, n=1, name="events"), "priority": 1000})
        )
        (o,) = client.claim("ev", ClaimRequest(max_tasks=1)).offers
        client.heartbeat(
            "ev", Heartbeat(running=[RunningAttempt(attempt_id=o.attempt_id, token=o.token)])
        )
        client.complete(
            Completion(attempt_id=o.attempt_id, token=o.token, outcome="exited", exit_code=0)
        )
    r = httpx.get(f"{farm.url}/api/v1/events", params={"task_id": o.task_id})
    assert r.status_code == 200
    evs = r.json()["events"]
    assert [(e["kind"], e["from_state"], e["to_state"]) for e in evs] == [
        ("task.offer", "queued", "offered"),
        ("task.ack", "offered", "running"),
        ("task.succeed", "running", "succeeded"),
    ]
    for e in evs:
        assert e["task_id"] == o.task_id and e["attempt_id"] == o.attempt_id
        assert e["agent_id"] == "ev" and e["at"].endswith("Z")
    after = httpx.get(
        f"{farm.url}/api/v1/events", params={"after": evs[0]["id"], "task_id": o.task_id}
    )
    assert [e["id"] for e in after.json()["events"]] == [e["id"] for e in evs[1:]]
    by_job = httpx.get(f"{farm.url}/api/v1/events", params={"job_id": job.id}).json()["events"]
    assert by_job[0]["kind"] == "job.submit" and by_job[-1]["kind"] == "job.succeed"
    assert httpx.get(f"{farm.url}/api/v1/events", params={"after": -1}).status_code == 422


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "herder", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_drain_and_submit_idempotency_key(farm: LocalFarm, tmp_path: Path) -> None:
    with HerderClient(farm.url, timeout=10) as client:
        client.register_agent(AgentRegister(agent_id="cli-a", name="c", hostname="h", slots=1))
    out = _cli("drain", "cli-a", "--master", farm.url)
    assert out.returncode == 0, out.stderr
    assert "cli-a draining" in out.stdout
    out = _cli("drain", "cli-a", "--undo", "--master", farm.url)
    assert out.returncode == 0 and "cli-a online" in out.stdout
    out = _cli("drain", "ghost", "--master", farm.url)
    assert out.returncode == 1 and "not_found" in out.stderr

    jobfile = tmp_path / "job.json"
    jobfile.write_text(json.dumps(job_body(None, n=1, name="cli-submit")))
    out = _cli("submit", str(jobfile), "--master", farm.url)
    assert out.returncode == 0, out.stderr
    job_id = int(out.stdout.split()[1])
    job = httpx.get(f"{farm.url}/api/v1/jobs/{job_id}").json()
    assert job["idempotency_key"].startswith("cli-")
    # a second invocation is a new submission (a new key), not a retry
    out = _cli("submit", str(jobfile), "--master", farm.url)
    assert int(out.stdout.split()[1]) != job_id
    # a key in the job file is kept
    jobfile.write_text(json.dumps(job_body("mine", n=1, name="cli-keyed")))
    first = int(_cli("submit", str(jobfile), "--master", farm.url).stdout.split()[1])
    second = int(_cli("submit", str(jobfile), "--master", farm.url).stdout.split()[1])
    assert first == second


def test_hot_routes_answer_as_their_fastapi_twins(farm: LocalFarm) -> None:
    # claim and heartbeat are plain Starlette routes ahead of the FastAPI ones
    # (master.context.fast_route): the same checks, answers and documentation.
    with httpx.Client(base_url=farm.url, timeout=30) as c:
        bad = "a%01b"  # a control character: NamePath refuses it
        twin = c.post(f"/api/v1/agents/{bad}/drain")
        assert twin.status_code == 422
        for hot, valid in (("claim", {"max_tasks": 1}), ("heartbeat", {})):
            r = c.post(f"/api/v1/agents/{bad}/{hot}", json={"max_tasks": 0})
            assert r.status_code == 422, r.text
            assert r.json() == twin.json()
            wrong = c.get(f"/api/v1/agents/x/{hot}")
            assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
            assert wrong.json()["error"] == "method_not_allowed"
            assert c.post(f"/api/v1/agents/nobody-{hot}/{hot}", json=[]).status_code == 422
            unknown = c.post(f"/api/v1/agents/nobody-{hot}/{hot}", json=valid)
            assert unknown.status_code == 404, unknown.text
        paths = c.get("/openapi.json").json()["paths"]
        assert "post" in paths["/api/v1/agents/{agent_id}/claim"]
        assert "post" in paths["/api/v1/agents/{agent_id}/heartbeat"]
