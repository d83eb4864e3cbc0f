"""Two-transaction job submission by continuation (issue 10), SQLite and PostgreSQL.

A real master process (``herder.localfarm``) on loopback, and a real agent
process where a test says so. ``POST /jobs?inputs=later`` creates the job
waiting for the blobs the store lacks and answers a continuation naming them
(202, ``Herder-Continuation: 1``); the job is never offered before the last
upload; uploading a stored blob again changes nothing; a re-submission with
the idempotency key after a crash between the two transactions answers what
is still missing; ``herder submit``, ``herder run --master`` and
``herder.Client.submit`` go through it end to end; a job whose inputs never
come is failed by maintenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from herder import Client
from herder.api_models import (
    AgentRegister,
    ClaimRequest,
    JobSubmit,
    RequiredFile,
    StageSpec,
    TaskSpec,
)
from herder.client import HerderClient
from herder.localfarm import LocalFarm
from herder.store.inputs import EXPIRE_REASON, RELEASE_REASON
from storekit import make_store
from waiting import wait_for

HERDER = str(Path(sys.executable).parent / "herder")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm")
    f.start_master()
    yield f
    f.close(at_once=True)


@pytest.fixture
def http(farm: LocalFarm) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{farm.url}/api/v1", timeout=30.0, trust_env=False) as h:
        yield h


def spec(files: dict[str, bytes], command: str, *, key: str | None = None, **kw: Any) -> dict:
    task: dict[str, Any] = {
        "command": command,
        "requires": [{"path": p, "digest": sha(d)} for p, d in files.items()],
    }
    task.update(kw)
    body: dict[str, Any] = {"name": "inputs", "stages": [{"name": "s", "tasks": [task]}]}
    if key is not None:
        body["idempotency_key"] = key
    return body


def put(http: httpx.Client, data: bytes) -> httpx.Response:
    return http.put(f"/blobs/{sha(data)}", content=data)


def events(http: httpx.Client, job_id: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = http.get(f"/jobs/{job_id}/events").json()["events"]
    return out


def attempts(http: httpx.Client, job_id: int) -> int:
    job = http.get(f"/jobs/{job_id}").json()
    return sum(len(t["attempts"]) for s in job["stages"] for t in s["tasks"])


def test_continuation_names_the_missing_digests_and_holds_the_job(
    farm: LocalFarm, http: httpx.Client
) -> None:
    a, b, c = b"present\n", b"missing one\n", b"missing two\n"
    assert put(http, a).status_code == 201
    r = http.post("/jobs", params={"inputs": "later"}, json=spec({"a": a, "b": b, "c": c}, "true"))
    assert r.status_code == 202, r.text
    assert r.headers["herder-continuation"] == "1"
    body = r.json()
    missing = sorted([sha(b), sha(c)])
    assert body["result"]["missing"] == missing
    assert body["result"]["state"] == "waiting" and body["result"]["created"] is True
    job_id = body["result"]["id"]
    assert body["result"]["href"] == f"/api/v1/jobs/{job_id}"
    assert body["continuation"] == {
        "method": "PUT",
        "path": f"/api/v1/blobs/{missing[0]}",
        "body": None,
        "params": None,
    }
    # A farm of one read-write master names itself: the upload may go nowhere else.
    assert body["alternates"] == [farm.url]
    assert "read-write master" in body["message"] and "hot standby" in body["message"]

    job = http.get(f"/jobs/{job_id}").json()
    assert job["state"] == "waiting"
    assert [t["state"] for s in job["stages"] for t in s["tasks"]] == ["blocked"]
    submit_event = events(http, job_id)[0]
    assert submit_event["kind"] == "job.submit" and "2 inputs" in submit_event["reason"]

    with HerderClient(farm.url) as client:
        agent = client.register_agent(AgentRegister(name="t", hostname="h", slots=4, cpus=4)).id
        claim = ClaimRequest(max_tasks=4, wait_s=0)
        assert client.claim(agent, claim).offers == []

        assert put(http, b).status_code == 201
        assert http.get(f"/jobs/{job_id}").json()["state"] == "waiting"
        assert client.claim(agent, claim).offers == []
        # Idempotent by digest: stored again, nothing changes.
        again = put(http, b)
        assert again.status_code == 200 and again.json()["created"] is False
        assert http.get(f"/jobs/{job_id}").json()["state"] == "waiting"
        assert client.claim(agent, claim).offers == []

        assert put(http, c).status_code == 201
        assert http.get(f"/jobs/{job_id}").json()["state"] == "queued"
        release = [e for e in events(http, job_id) if e["kind"] == "job.release"]
        assert [(e["from_state"], e["to_state"], e["reason"]) for e in release] == [
            ("waiting", "queued", RELEASE_REASON)
        ]
        offers = client.claim(agent, claim).offers
        assert [o.job_id for o in offers] == [job_id]
    assert put(http, c).json()["created"] is False  # after the release: still harmless


def test_nothing_missing_is_an_ordinary_answer(http: httpx.Client) -> None:
    data = b"already here\n"
    put(http, data)
    r = http.post("/jobs", params={"inputs": "later"}, json=spec({"x": data}, "true"))
    assert r.status_code == 201 and "herder-continuation" not in r.headers
    assert r.json()["state"] == "queued"
    ids = http.post(
        "/jobs", params={"inputs": "later", "view": "ids"}, json=spec({"x": data}, "true")
    )
    assert ids.status_code == 201 and len(ids.json()["task_ids"]) == 1
    # Old clients (no flag) keep the old meaning: queued as it is, whatever is missing.
    old = http.post("/jobs", json=spec({"y": b"never uploaded"}, "true"))
    assert old.status_code == 201 and old.json()["state"] == "queued"


def test_a_real_agent_runs_it_only_after_the_last_upload(
    farm: LocalFarm, http: httpx.Client
) -> None:
    farm.start_agent(slots=2)
    farm.wait_agents(1)
    a, b = b"first half\n", b"second half\n"
    body = spec({"a.txt": a, "b.txt": b}, "cat a.txt b.txt > out.txt", outputs=["out.txt"])
    r = http.post("/jobs", params={"inputs": "later"}, json=body)
    assert r.status_code == 202
    job_id = r.json()["result"]["id"]
    put(http, a)
    time.sleep(1.5)  # the agent long-polls the whole time: it must get nothing
    assert http.get(f"/jobs/{job_id}").json()["state"] == "waiting"
    assert attempts(http, job_id) == 0
    assert not [
        e for e in events(http, job_id) if e["kind"].startswith("task.") and e["attempt_id"]
    ]
    put(http, b)
    wait_for(
        lambda: http.get(f"/jobs/{job_id}").json()["state"] == "succeeded",
        30,
        "the job to succeed",
        lambda: "\n".join(p.log_text()[-2000:] for p in farm.agents),
    )
    job = http.get(f"/jobs/{job_id}").json()
    (out,) = job["stages"][0]["tasks"][0]["attempts"][-1]["outputs"]
    assert http.get(f"/blobs/{out['digest']}").content == a + b


def test_resubmission_after_a_crash_resumes(
    farm: LocalFarm, http: httpx.Client, tmp_path: Path
) -> None:
    farm.start_agent(slots=1)
    root = tmp_path / "src"
    root.mkdir()
    files = {"one.txt": b"1" * 100_000, "two.txt": b"2" * 70_000, "three.txt": b"3\n"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    body = spec(files, "cat one.txt two.txt three.txt | wc -c > n", key="crash-1", outputs=["n"])
    # The first transaction, then a crash after one of three uploads.
    first = http.post("/jobs", params={"inputs": "later"}, json=body)
    assert first.status_code == 202
    job_id = first.json()["result"]["id"]
    assert put(http, files["two.txt"]).status_code == 201
    # Sent again with the key: the same job, what is still missing.
    again = http.post("/jobs", params={"inputs": "later"}, json=body)
    assert again.status_code == 200 and again.headers["herder-continuation"] == "1"
    assert again.json()["result"]["id"] == job_id
    assert again.json()["result"]["missing"] == sorted(
        [sha(files["one.txt"]), sha(files["three.txt"])]
    )
    assert again.json()["result"]["created"] is False
    # The Python API resumes it: uploads what is missing, returns the job, which runs.
    with Client(farm.url) as client:
        view = client.submit(JobSubmit.model_validate(body), root=root)
        assert view.id == job_id and view.state in ("queued", "running", "succeeded")
        done = client.wait(job_id, timeout_s=30)
    assert done.state == "succeeded"
    (out,) = done.stages[0].tasks[0].attempts[-1].outputs
    assert http.get(f"/blobs/{out.digest}").content.strip() == str(170_002).encode()
    jobs = http.get("/jobs", params={"limit": 100}).json()["jobs"]
    assert [j["id"] for j in jobs] == [job_id]  # never a second job


def test_client_submit_uploads_only_what_is_missing(farm: LocalFarm, http: httpx.Client) -> None:
    have, lack = b"have\n", b"lack\n"
    put(http, have)
    job = JobSubmit(
        name="api",
        stages=[
            StageSpec(
                name="s",
                tasks=[
                    TaskSpec(
                        command="true",
                        requires=[
                            RequiredFile(path="h", digest=sha(have)),
                            RequiredFile(path="l", digest=sha(lack)),
                        ],
                    )
                ],
            )
        ],
    )
    sent: list[str] = []
    with HerderClient(farm.url) as client:
        real_put = client.put_blob

        def counting_put(digest: str, data: bytes) -> Any:
            sent.append(digest)
            return real_put(digest, data)

        client.put_blob = counting_put  # type: ignore[method-assign]
        ids = client.submit_job_ids(job, inputs={sha(have): have, sha(lack): lack})
    assert http.get(f"/jobs/{ids.id}").json()["state"] == "queued"
    # The one missing blob went as the continuation's own request, never twice.
    assert sent == []
    assert http.get(f"/blobs/{sha(lack)}").content == lack


def test_herder_submit_job_file_end_to_end(
    farm: LocalFarm, http: httpx.Client, tmp_path: Path
) -> None:
    farm.start_agent(slots=1)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "in.txt").write_bytes(b"hello from a job file\n")
    (proj / "big.bin").write_bytes(os.urandom(200_000))
    (proj / "job.toml").write_text(
        'name = "jf"\n[[stage]]\nname = "s"\n[[stage.task]]\n'
        'command = "cat in.txt > out.txt && wc -c < big.bin >> out.txt"\n'
        'requires = ["in.txt", "big.bin"]\noutputs = ["out.txt"]\n'
    )
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    r = subprocess.run(
        [HERDER, "submit", "job.toml", "--master", farm.url, "--wait"],
        cwd=proj,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (job,) = http.get("/jobs").json()["jobs"]
    assert job["state"] == "succeeded"
    kinds = [(e["kind"], e["reason"]) for e in events(http, job["id"])]
    assert ("job.release", RELEASE_REASON) in kinds  # it went through the continuation
    view = http.get(f"/jobs/{job['id']}").json()
    (out,) = view["stages"][0]["tasks"][0]["attempts"][-1]["outputs"]
    assert http.get(f"/blobs/{out['digest']}").content == b"hello from a job file\n200000\n"


def test_herder_run_master_uploads_big_inputs_through_the_continuation(
    farm: LocalFarm, http: httpx.Client, tmp_path: Path
) -> None:
    farm.start_agent(slots=1)
    proj = tmp_path / "build"
    proj.mkdir()
    data = os.urandom(300_000)  # above the inline bound: uploaded, not inline
    (proj / "big.bin").write_bytes(data)
    (proj / "Rakefile").write_text("copy:\n\tremote-cp big.bin copy.bin\n\t\trequires big.bin\n")
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    r = subprocess.run(
        [HERDER, "run", "--plain", "--master", farm.url],
        cwd=proj,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (proj / "copy.bin").read_bytes() == data
    (job,) = http.get("/jobs").json()["jobs"]
    assert ("job.release", RELEASE_REASON) in [
        (e["kind"], e["reason"]) for e in events(http, job["id"])
    ]


def test_maintenance_fails_a_job_whose_inputs_never_came(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERDER_INPUTS_TIMEOUT_S", "1")
    with LocalFarm(db_url=db_url, workdir=tmp_path / "farm") as farm:
        farm.start_master()
        with httpx.Client(base_url=f"{farm.url}/api/v1", timeout=30.0, trust_env=False) as h:
            parent = h.post("/jobs", params={"inputs": "later"}, json=spec({"x": b"gone"}, "true"))
            job_id = parent.json()["result"]["id"]
            child = h.post("/jobs", json={**spec({}, "true"), "depends_on": [job_id]}).json()
            wait_for(
                lambda: h.get(f"/jobs/{job_id}").json()["state"] == "failed",
                30,
                "maintenance to fail the job",
            )
            fail = [e for e in events(h, job_id) if e["kind"] == "job.fail"]
            assert len(fail) == 1 and fail[0]["reason"].startswith(EXPIRE_REASON)
            assert fail[0]["from_state"] == "waiting"
            tasks = h.get(f"/jobs/{job_id}").json()["stages"][0]["tasks"]
            assert [t["state"] for t in tasks] == ["cancelled"]
            # Its dependent fails with it (on_parent_failure = fail).
            assert h.get(f"/jobs/{child['id']}").json()["state"] == "failed"
            # A retry while the input is still missing is refused, nothing changed.
            refused = h.post(f"/jobs/{job_id}/retry")
            assert refused.status_code == 409 and sha(b"gone") in refused.text
            assert h.get(f"/jobs/{job_id}").json()["state"] == "failed"
            # An upload now releases nothing: a failed job is not waiting.
            h.put(f"/blobs/{sha(b'gone')}", content=b"gone")
            assert h.get(f"/jobs/{job_id}").json()["state"] == "failed"
            # With it stored, the retry runs the job.
            assert h.post(f"/jobs/{job_id}/retry").json()["state"] == "running"
            again = h.post("/jobs", params={"inputs": "later"}, json=spec({"x": b"gone"}, "true"))
            assert again.status_code == 201  # stored now: nothing missing


def test_openapi_documents_the_continuation(farm: LocalFarm) -> None:
    doc = httpx.get(f"{farm.url}/openapi.json", trust_env=False).json()
    post = doc["paths"]["/api/v1/jobs"]["post"]
    assert "202" in post["responses"]
    ref = post["responses"]["202"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/UploadContinuation")
    assert "missing" in json.dumps(doc["components"]["schemas"]["JobHeld"])
    assert any(p["name"] == "inputs" for p in post["parameters"])


def _race(store: Any, data: bytes) -> tuple[str, list[str]]:
    """Submit a job requiring ``data`` and upload ``data`` at once; the job's state and
    what it still misses."""
    job = JobSubmit.model_validate(spec({"f": data}, "true"))
    go = threading.Barrier(2)
    out: dict[str, Any] = {}

    def submit() -> None:
        go.wait()
        out["sub"] = store.submit(job, hold_inputs=True)

    def upload() -> None:
        go.wait()
        store.put_blob(sha(data), data)

    threads = [threading.Thread(target=submit), threading.Thread(target=upload)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    job_id = out["sub"].id
    return store.get_job(job_id, include_tasks=False).state, store.missing_inputs(job_id)


def test_upload_racing_a_submission_never_strands_the_job(db_url: str) -> None:
    """Submissions and uploads of the same digest at once: whichever commits second sees
    the other, so no job waits for a blob that is stored (the advisory-lock handshake)."""
    store = make_store(db_url)
    try:
        outcomes = [_race(store, f"race {i}\n".encode()) for i in range(20)]
        assert [o for o in outcomes if o != ("queued", [])] == []
    finally:
        store.close()


def test_blobs_stored_by_other_paths_release_on_resubmission_or_upload(db_url: str) -> None:
    """Inline blobs (and task outputs) do not look at held jobs: a re-submission with the
    key looks again, and so does an upload of a blob that is already stored."""
    store = make_store(db_url)
    try:
        a, b = b"stored inline later\n", b"stored as an output later\n"
        job = JobSubmit.model_validate(spec({"a": a, "b": b}, "true", key="other-paths"))
        sub = store.submit(job, hold_inputs=True)
        assert sub.created and store.missing_inputs(sub.id) == sorted([sha(a), sha(b)])
        store.put_blobs({sha(a): a})
        assert store.missing_inputs(sub.id) == sorted([sha(a), sha(b)])
        again = store.submit(job, hold_inputs=True)
        assert (again.id, again.created) == (sub.id, False)
        assert store.missing_inputs(sub.id) == [sha(b)]
        store.put_blobs({sha(b): b})
        assert store.get_job(sub.id, include_tasks=False).state == "waiting"
        assert store.put_blob(sha(b), b) == (len(b), False)  # already stored: still releases
        assert store.get_job(sub.id, include_tasks=False).state == "queued"
        assert store.missing_inputs(sub.id) == []
        release = [e for e in store.list_events(job_id=sub.id) if e.kind == "job.release"]
        assert [e.reason for e in release] == [RELEASE_REASON]
    finally:
        store.close()
