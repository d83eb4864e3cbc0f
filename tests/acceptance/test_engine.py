"""Issue 2 acceptance: a real master and two real agents on loopback run jobs.

Runs against SQLite and PostgreSQL (the ``db_url`` fixture).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.api_models import JobSubmit, JobView
from herder.client import HerderClient
from herder.localfarm import LocalFarm


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm", lease_s=10, ack_timeout_s=10)
    f.start_master()
    f.start_agent(slots=2, name="a1")
    f.start_agent(slots=2, name="a2")
    f.wait_agents(2)
    try:
        yield f
    finally:
        f.stop()
        for p in [f.master, *f.agents]:
            assert p is not None
            assert "Traceback" not in p.log_text(), p.log_text()[-3000:]


@pytest.fixture
def client(farm: LocalFarm) -> Iterator[HerderClient]:
    with HerderClient(farm.url) as c:
        yield c


def wait_job(client: HerderClient, job_id: int, timeout: float = 90.0) -> JobView:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.state} after {timeout}s: {job.counts}")


def test_three_stage_job_with_fifty_parallel_tasks(client: HerderClient, farm: LocalFarm) -> None:
    inputs = {i: f"input number {i}\n".encode() * (i + 1) for i in range(50)}
    for data in inputs.values():
        client.put_blob(sha(data), data)
    spec = JobSubmit.model_validate(
        {
            "name": "three-stages",
            "stages": [
                {
                    "name": "prepare",
                    "tasks": [{"command": "echo preparing; mkdir -p gen && echo x > gen/flag"}],
                },
                {
                    "name": "transform",
                    "tasks": [
                        {
                            "name": f"t{i}",
                            "command": f"tr a-z A-Z < in/{i}.txt > out{i}.txt && echo done {i} && echo warn {i} >&2",
                            "requires": [{"path": f"in/{i}.txt", "digest": sha(inputs[i])}],
                        }
                        for i in range(50)
                    ],
                },
                {"name": "finish", "tasks": [{"command": ["sh", "-c", "echo finished"]}]},
            ],
        }
    )
    job = client.submit_job(spec)
    assert job.state in ("queued", "running")
    assert job.href == f"/api/v1/jobs/{job.id}"
    job = wait_job(client, job.id)
    assert job.state == "succeeded", job.model_dump_json(indent=1)[:3000]
    assert [s.name for s in job.stages] == ["prepare", "transform", "finish"]
    assert [len(s.tasks) for s in job.stages] == [1, 50, 1]

    prepare = job.stages[0].tasks[0]
    (attempt,) = prepare.attempts
    assert {o.path for o in attempt.outputs} == {"gen/flag"}

    agents_used = set()
    for task in job.stages[1].tasks:
        i = int(task.name[1:])
        assert task.state == "succeeded" and task.exit_code == 0
        ok = [a for a in task.attempts if a.state == "succeeded"]
        assert len(ok) == 1
        attempt = ok[0]
        agents_used.add(attempt.agent_id)
        expected = inputs[i].upper()
        # Only the created file comes back: the staged input did not change.
        assert [(o.path, o.digest, o.size) for o in attempt.outputs] == [
            (f"out{i}.txt", sha(expected), len(expected))
        ]
        assert client.get_blob(sha(expected)) == expected
        assert client.read_full_log(attempt.id, "stdout") == f"done {i}\n"
        assert client.read_full_log(attempt.id, "stderr") == f"warn {i}\n"
    assert len(agents_used) == 2, "both agents should have taken part"

    # The last stage started only after every transform task succeeded.
    events = client.job_events(job.id)
    finish_id = job.stages[2].tasks[0].id
    # Event ids follow commit order; times are each transaction's start by the
    # database clock, so on PostgreSQL the transaction that unblocks the stage
    # may have started (and be stamped) a moment before the last success it
    # waited for committed.
    queued = next(e.id for e in events if e.task_id == finish_id and e.to_state == "queued")
    transform_ids = {t.id for t in job.stages[1].tasks}
    last_success = max(
        e.id for e in events if e.task_id in transform_ids and e.to_state == "succeeded"
    )
    assert queued > last_success
    (attempt,) = job.stages[2].tasks[0].attempts
    assert client.read_full_log(attempt.id, "stdout") == "finished\n"


def test_failing_task_fails_job_and_stops_later_stages(client: HerderClient) -> None:
    spec = JobSubmit.model_validate(
        {
            "name": "fails",
            "stages": [
                {"name": "one", "tasks": [{"command": "echo out; echo boom >&2; exit 3"}]},
                {"name": "two", "tasks": [{"command": "echo never"}]},
            ],
        }
    )
    job = wait_job(client, client.submit_job(spec).id)
    assert job.state == "failed"
    task = job.stages[0].tasks[0]
    assert task.state == "failed" and task.exit_code == 3
    assert "exit" in (task.error or "")
    (attempt,) = task.attempts
    assert client.read_full_log(attempt.id, "stderr") == "boom\n"
    assert client.read_full_log(attempt.id, "stdout") == "out\n"
    later = job.stages[1].tasks[0]
    assert later.state == "cancelled" and later.attempts == []


def test_timeout_kills_the_whole_process_group(client: HerderClient) -> None:
    spec = JobSubmit.model_validate(
        {
            "name": "slow",
            "stages": [
                {
                    "name": "s",
                    "tasks": [
                        {
                            "command": "sleep 300 & echo bg $! ; echo me $$ ; sleep 300",
                            "timeout_s": 1.5,
                        }
                    ],
                }
            ],
        }
    )
    started = time.monotonic()
    job = wait_job(client, client.submit_job(spec).id, timeout=60)
    assert time.monotonic() - started < 30
    task = job.stages[0].tasks[0]
    assert job.state == "failed" and task.state == "failed"
    assert "timed out" in (task.error or "")
    (attempt,) = task.attempts
    out = client.read_full_log(attempt.id, "stdout")
    pids = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}
    assert set(pids) == {"bg", "me"}
    deadline = time.monotonic() + 10
    for pid in pids.values():
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # A zombie reaped late still answers kill(0); check its state.
            try:
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"process {pid} of the timed-out task still runs")


def _job_count(url: str) -> int:
    return len(httpx.get(f"{url}/api/v1/jobs", params={"limit": 10000}).json()["jobs"])


GOOD = {"name": "ok", "stages": [{"name": "s", "tasks": [{"command": "true"}]}]}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        (b'{"name": "x", "stages": [], "bogus": 1}', 422, "invalid_request"),
        (
            b'{"name": "x", "stages": [{"name": "s", "tasks": [{"command": "true", "colour": "red"}]}]}',
            422,
            "invalid_request",
        ),
        (
            b'{"name": "x", "stages": [{"name": "s", "tasks": [{"command": "true", "timeout_s": "soon"}]}]}',
            422,
            "invalid_request",
        ),
        (b'{"name": 5, "stages": "no"}', 422, "invalid_request"),
        (
            b'{"name": "x", "stages": [{"name": "s", "tasks": [{"command": "true", "requires": [{"path": "../etc/passwd", "digest": "'
            + b"0" * 64
            + b'"}]}]}]}',
            422,
            "invalid_request",
        ),
        (
            b'{"name": "x", "stages": [{"name": "s", "tasks": [{"command": "true", "requires": [{"path": "/etc/passwd", "digest": "'
            + b"0" * 64
            + b'"}]}]}]}',
            422,
            "invalid_request",
        ),
    ],
)
def test_bad_job_input_is_refused_and_changes_nothing(
    farm: LocalFarm, body: bytes, status: int, code: str
) -> None:
    before = _job_count(farm.url)
    r = httpx.post(
        f"{farm.url}/api/v1/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] == code and err["message"]
    assert "Traceback" not in r.text
    assert _job_count(farm.url) == before


def test_unknown_ids_and_bad_blobs(farm: LocalFarm) -> None:
    url = farm.url
    r = httpx.get(f"{url}/api/v1/jobs/999999")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = httpx.post(f"{url}/api/v1/jobs/999999/cancel")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = httpx.get(f"{url}/api/v1/tasks/424242")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = httpx.get(f"{url}/api/v1/jobs/not-a-number")
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"

    data = b"the real bytes"
    wrong = sha(b"other bytes")
    r = httpx.put(f"{url}/api/v1/blobs/{wrong}", content=data)
    assert r.status_code == 422 and r.json()["error"] == "digest_mismatch"
    r = httpx.post(f"{url}/api/v1/blobs/missing", json={"digests": [wrong]})
    assert r.json()["missing"] == [wrong], "a refused blob must not be stored"
    r = httpx.put(f"{url}/api/v1/blobs/NOT-HEX", content=data)
    assert r.status_code == 422
    r = httpx.put(f"{url}/api/v1/blobs/{sha(data)}", content=data)
    assert r.status_code == 201
    r = httpx.put(f"{url}/api/v1/blobs/{sha(data)}", content=data)
    assert r.status_code == 200 and r.json()["created"] is False

    # A completion for an attempt that does not exist is stale, never accepted.
    r = httpx.post(
        f"{url}/api/v1/attempts/777/complete",
        json={"attempt_id": 777, "token": "x", "outcome": "exited", "exit_code": 0},
    )
    assert r.status_code == 409 and r.json()["error"] == "stale_attempt"

    # Inline output blobs: bad base64 and bytes that do not match their digest
    # are refused before anything is stored.
    done = {"attempt_id": 777, "token": "x", "outcome": "exited", "exit_code": 0}
    r = httpx.post(
        f"{url}/api/v1/attempts/777/complete", json={**done, "blobs": {wrong: "not base64!"}}
    )
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert "base64" in r.json()["message"]
    lie = base64.b64encode(b"something else").decode()
    r = httpx.post(f"{url}/api/v1/attempts/777/complete", json={**done, "blobs": {wrong: lie}})
    assert r.status_code == 422 and r.json()["error"] == "digest_mismatch"
    r = httpx.post(f"{url}/api/v1/blobs/missing", json={"digests": [wrong]})
    assert r.json()["missing"] == [wrong], "a refused inline blob must not be stored"


def test_openapi_and_metrics_served(farm: LocalFarm) -> None:
    doc = httpx.get(f"{farm.url}/openapi.json").json()
    assert "/api/v1/agents/{agent_id}/claim" in doc["paths"]
    assert "/api/v1/jobs" in doc["paths"]
    text = httpx.get(f"{farm.url}/metrics").text
    assert "herder_requests_total" in text
