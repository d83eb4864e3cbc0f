"""The follow stream and inline submissions over real HTTP (DESIGN §10, issue 8).

A client follows a job through one long-poll that answers as soon as tasks
finish, carrying their logs and small outputs inline; a submission carries
its small inputs inline and can answer with task ids only.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.api_models import JobSubmit
from herder.client import HerderClient
from herder.localfarm import LocalFarm


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFarm]:
    f = LocalFarm(workdir=tmp_path_factory.mktemp("farm"))
    f.start_master()
    f.start_agent(slots=2, name="f1")
    f.wait_agents(1)
    yield f
    f.close(at_once=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_follow_carries_results_logs_and_outputs_inline(farm: LocalFarm, tmp_path: Path) -> None:
    data = b"hello inline\n"
    digest = hashlib.sha256(data).hexdigest()
    spec = JobSubmit.model_validate(
        {
            "name": "follow",
            # Two stages: a failure stops its job's running work at once, so a
            # sibling in the same stage could be cancelled before it succeeds.
            "stages": [
                {
                    "name": "s",
                    "tasks": [
                        {
                            "name": "copy",
                            "command": "cat in.txt && tr a-z A-Z < in.txt > out.txt",
                            "requires": [{"path": "in.txt", "digest": digest}],
                        },
                    ],
                },
                {"name": "t", "tasks": [{"name": "fail", "command": "echo oops >&2; exit 3"}]},
            ],
            "blobs": {digest: _b64(data)},
        }
    )
    with HerderClient(farm.url) as client:
        sub = client.submit_job_ids(spec)
        assert sub.created and len(sub.task_ids) == 2
        # No PUT happened: the input came inside the submission.
        assert client.missing_blobs([digest]) == []
        results = {}
        after = 0
        started = time.monotonic()
        while len(results) < 2:
            assert time.monotonic() - started < 60, "the follow stream never delivered"
            page = client.follow_job(sub.id, after, wait_s=10)
            assert page.next >= after
            after = page.next
            for r in page.results:
                results[r.task_id] = r
        copy, fail = results[sub.task_ids[0]], results[sub.task_ids[1]]
        assert copy.state == "succeeded" and copy.stdout == "hello inline\n"
        (out,) = copy.outputs
        assert out.path == "out.txt"
        assert copy.blobs[out.digest] == b"HELLO INLINE\n"
        # A final task of a failed job comes with its error and stderr.
        assert fail.state == "failed" and fail.exit_code == 3
        assert fail.stderr == "oops\n" and fail.stdout == ""
        # Nothing more happens: the job is over and the stream says so at once.
        t0 = time.monotonic()
        last = client.follow_job(sub.id, after, wait_s=10)
        assert last.state == "failed" and last.results == [] and last.next == after
        assert time.monotonic() - t0 < 5


def test_follow_waits_then_answers_when_a_task_finishes(farm: LocalFarm) -> None:
    with HerderClient(farm.url) as client:
        spec = JobSubmit.model_validate(
            {"name": "slow", "stages": [{"name": "s", "tasks": [{"command": "sleep 1"}]}]}
        )
        sub = client.submit_job_ids(spec)
        # Offers come first; then a long-poll that ends with the result, not the timeout.
        after, result = 0, None
        t0 = time.monotonic()
        while result is None:
            page = client.follow_job(sub.id, after, wait_s=20)
            after = page.next
            result = page.results[0] if page.results else None
            assert time.monotonic() - t0 < 15
        assert result.state == "succeeded"


def test_bad_inline_blob_changes_nothing(farm: LocalFarm) -> None:
    data = b"real bytes"
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    body = {
        "name": "bad",
        "stages": [
            {
                "name": "s",
                "tasks": [{"command": "true", "requires": [{"path": "x", "digest": wrong}]}],
            }
        ],
        "blobs": {wrong: _b64(data)},
    }
    before = httpx.get(f"{farm.url}/api/v1/jobs", params={"limit": 1000}).json()["jobs"]
    r = httpx.post(f"{farm.url}/api/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "digest_mismatch"
    after = httpx.get(f"{farm.url}/api/v1/jobs", params={"limit": 1000}).json()["jobs"]
    assert len(after) == len(before)
    missing = httpx.post(f"{farm.url}/api/v1/blobs/missing", json={"digests": [wrong]}).json()
    assert missing["missing"] == [wrong]
    # Not base64, and too big to ride inline: clear 422s.
    body["blobs"] = {wrong: "***"}
    r = httpx.post(f"{farm.url}/api/v1/jobs", json=body)
    assert r.status_code == 422 and "base64" in r.json()["message"]
    big = b"x" * (64 * 1024 + 1)
    d = hashlib.sha256(big).hexdigest()
    body["blobs"] = {d: _b64(big)}
    r = httpx.post(f"{farm.url}/api/v1/jobs", json=body)
    assert r.status_code == 422 and "upload it" in r.json()["message"]


def test_follow_errors_and_openapi(farm: LocalFarm) -> None:
    r = httpx.get(f"{farm.url}/api/v1/jobs/999999/follow", params={"wait_s": 0})
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = httpx.get(f"{farm.url}/api/v1/jobs/1/follow", params={"wait_s": 1e9})
    assert r.status_code == 422
    r = httpx.post(
        f"{farm.url}/api/v1/agents/x/claim",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    r = httpx.post(f"{farm.url}/api/v1/agents/x/claim", json={"max_tasks": -1})
    assert r.status_code == 422 and r.json()["message"].startswith("max_tasks")
    doc = httpx.get(f"{farm.url}/openapi.json").json()
    assert "/api/v1/jobs/{job_id}/follow" in doc["paths"]
    claim = doc["paths"]["/api/v1/agents/{agent_id}/claim"]["post"]
    ref = claim["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ClaimRequest"
    assert "ClaimRequest" in doc["components"]["schemas"]
    assert "Completion" in doc["components"]["schemas"]
