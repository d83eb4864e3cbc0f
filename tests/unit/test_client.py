"""herder.client: typed methods, error mapping, and the seeds/004 request loop."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from herder.api_models import (
    AgentRegister,
    ClaimRequest,
    Completion,
    Heartbeat,
    JobSubmit,
    LogChunk,
    RunningAttempt,
)
from herder.client import (
    ApiError,
    BlobDigestError,
    ConflictError,
    HerderClient,
    NoMasterAvailable,
    NotFoundError,
    RequestOutcomeUnknown,
    StaleAttemptError,
    normalize_master_url,
    sha256_file,
)

NOW = "2024-05-01T12:00:00Z"
Handler = Callable[[httpx.Request], httpx.Response]


def job_json(job_id: int = 7, state: str = "queued") -> dict[str, Any]:
    return {
        "id": job_id,
        "href": f"/api/v1/jobs/{job_id}",
        "name": "build",
        "owner": "ann",
        "pool": "default",
        "priority": 0,
        "state": state,
        "idempotency_key": None,
        "created_at": NOW,
        "updated_at": NOW,
        "finished_at": None,
        "counts": {"queued": 1},
        "stages": [
            {
                "index": 0,
                "name": "compile",
                "state": "queued",
                "counts": {"queued": 1},
                "tasks": [task_json()],
            }
        ],
    }


def task_json(task_id: int = 3) -> dict[str, Any]:
    return {
        "id": task_id,
        "href": f"/api/v1/tasks/{task_id}",
        "job_id": 7,
        "stage": 0,
        "name": None,
        "state": "queued",
        "command": "cc -c a.c",
        "placement": "remote",
        "max_attempts": 1,
        "cpus": 1,
        "ram_mb": 0,
        "attempts": [],
    }


def agent_json(agent_id: str = "a1") -> dict[str, Any]:
    return {
        "id": agent_id,
        "href": f"/api/v1/agents/{agent_id}",
        "name": "box",
        "hostname": "box.local",
        "slots": 4,
        "tags": ["linux"],
        "cpus": 4,
        "ram_mb": 8000,
        "state": "online",
        "registered_at": NOW,
        "last_seen_at": NOW,
    }


def spec(key: str | None = None) -> JobSubmit:
    return JobSubmit.model_validate(
        {
            "name": "build",
            "idempotency_key": key,
            "stages": [{"name": "compile", "tasks": [{"command": "cc -c a.c"}]}],
        }
    )


def jr(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


class Farm:
    """Fake masters: one handler per host, every request recorded."""

    def __init__(self, **handlers: Handler) -> None:
        self.handlers = {f"http://{h}": fn for h, fn in handlers.items()}
        self.calls: list[tuple[str, str, str, bool]] = []  # (server, method, path, priority)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        server = f"{request.url.scheme}://{request.url.host}"
        self.calls.append(
            (
                server.removeprefix("http://"),
                request.method,
                request.url.path,
                request.headers.get("Herder-Priority") == "1",
            )
        )
        self.requests.append(request)
        handler = self.handlers.get(server)
        if handler is None:
            raise httpx.ConnectError("connection refused", request=request)
        return handler(request)

    def client(self, masters: list[str] | str | None = None, **kw: Any) -> HerderClient:
        if masters is None:
            masters = [f"http://{h.removeprefix('http://')}" for h in self.handlers]
        return HerderClient(masters, transport=httpx.MockTransport(self), **kw)

    @property
    def servers(self) -> list[str]:
        return [c[0] for c in self.calls]


def one(handler: Handler) -> tuple[Farm, HerderClient]:
    farm = Farm(m1=handler)
    return farm, farm.client()


def dead(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def busy(alternates: list[str] | None = None, queued: int = 5) -> Handler:
    """Busy unless the request carries the priority flag, then it answers."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Herder-Priority") == "1":
            return jr(200, {"status": "ok", "who": request.url.host})
        return jr(
            503,
            {
                "error": "busy",
                "message": "too much work",
                "alternates": alternates or [],
                "queued": queued,
            },
            {"Retry-After": "2"},
        )

    return handler


def always_busy(request: httpx.Request) -> httpx.Response:
    return jr(503, {"error": "busy", "message": "swamped", "queued": 9}, {"Retry-After": "3"})


def ok(request: httpx.Request) -> httpx.Response:
    return jr(200, {"status": "ok", "who": request.url.host})


# ------------------------------------------------------------------ methods


def test_submit_job_posts_json_and_parses_aware_times() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/api/v1/jobs")
        assert request.headers["content-type"] == "application/json"
        body = json.loads(request.content)
        assert body["name"] == "build"
        assert body["idempotency_key"] is None  # exclude_none=False
        assert body["stages"][0]["tasks"][0]["command"] == "cc -c a.c"
        return jr(201, job_json())

    _, client = one(handler)
    job = client.submit_job(spec())
    assert job.id == 7 and job.stages[0].tasks[0].id == 3
    assert job.created_at == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert job.created_at.tzinfo is not None


def test_job_and_task_reads() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        path, q = request.url.path, dict(request.url.params)
        if request.method == "GET" and path == "/api/v1/jobs/7":
            return jr(200, job_json())
        if request.method == "GET" and path == "/api/v1/jobs":
            assert q == {"state": "running", "limit": "5"}
            summary = {k: v for k, v in job_json().items() if k != "stages"}
            return jr(200, {"jobs": [summary]})
        if request.method == "POST" and path == "/api/v1/jobs/7/cancel":
            return jr(200, job_json(state="cancelled"))
        if path == "/api/v1/jobs/7/events":
            assert q["after"] == "4"
            ev = {
                "id": 5,
                "at": NOW,
                "job_id": 7,
                "task_id": 3,
                "attempt_id": None,
                "agent_id": None,
                "kind": "task",
                "from_state": "blocked",
                "to_state": "queued",
                "reason": None,
            }
            return jr(200, {"events": [ev]})
        if path == "/api/v1/tasks/3":
            return jr(200, task_json())
        return jr(404, {"error": "not_found", "message": path})

    _, client = one(handler)
    assert client.get_job(7).name == "build"
    jobs = client.list_jobs(state="running", limit=5)
    assert [j.id for j in jobs] == [7]
    assert client.cancel_job(7).state == "cancelled"
    events = client.job_events(7, after=4)
    assert events[0].id == 5 and events[0].to_state == "queued"
    assert client.get_task(3).command == "cc -c a.c"


def test_logs_page_until_complete() -> None:
    text = "x" * 25

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/attempts/9/log"
        offset = int(request.url.params["offset"])
        assert request.url.params["stream"] == "stderr"
        data = text[offset : offset + 10]
        return jr(
            200,
            {
                "attempt_id": 9,
                "stream": "stderr",
                "offset": offset,
                "next_offset": offset + len(data),
                "data": data,
                "complete": offset + len(data) >= len(text),
            },
        )

    farm, client = one(handler)
    assert client.read_log(9, "stderr", 10).data == "x" * 10
    assert client.read_full_log(9, "stderr") == text
    assert len(farm.calls) == 1 + 3


def test_full_log_stops_when_a_running_log_stops_growing() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        data = "abc" if offset == 0 else ""
        body = {
            "attempt_id": 1,
            "stream": "stdout",
            "offset": offset,
            "next_offset": offset + len(data),
            "data": data,
            "complete": False,
        }
        return jr(200, body)

    _, client = one(handler)
    assert client.read_full_log(1, "stdout") == "abc"


def test_agent_cycle_methods() -> None:
    seen: list[tuple[str, str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body))
        path = request.url.path
        if path == "/api/v1/agents" and request.method == "POST":
            return jr(201, agent_json(body["agent_id"]))
        if path == "/api/v1/agents":
            return jr(200, {"agents": [agent_json()]})
        if path == "/api/v1/agents/a1":
            return jr(200, agent_json())
        if path == "/api/v1/agents/a1/claim":
            offer = {
                "attempt_id": 11,
                "token": "t0k",
                "task_id": 3,
                "job_id": 7,
                "href": "/api/v1/tasks/3",
                "command": ["true"],
                "env": {},
                "requires": [],
                "outputs": None,
                "timeout_s": None,
                "lease_expires_at": NOW,
                "ack_deadline": NOW,
            }
            comp = {"attempt_id": 10, "result": "accepted", "task_state": "succeeded"}
            return jr(200, {"offers": [offer], "completions": [comp], "lease_s": 30})
        if path.endswith("/ack") or path.endswith("/log"):
            return httpx.Response(204)
        if path == "/api/v1/attempts/11/complete":
            return jr(200, {"attempt_id": 11, "result": "accepted", "task_state": "succeeded"})
        if path == "/api/v1/agents/a1/heartbeat":
            return jr(200, {"cancel": [12], "lease_expires_at": NOW, "lease_s": 30})
        return jr(404, {"error": "not_found", "message": path})

    _, client = one(handler)
    reg = AgentRegister(agent_id="a1", name="box", hostname="box.local", slots=4)
    assert client.register_agent(reg).id == "a1"
    assert [a.id for a in client.list_agents()] == ["a1"]
    assert client.get_agent("a1").slots == 4
    done = Completion(attempt_id=10, token="old", outcome="exited", exit_code=0)
    resp = client.claim("a1", ClaimRequest(max_tasks=2, wait_s=5, completions=[done], acks=[9]))
    assert resp.offers[0].attempt_id == 11 and resp.offers[0].token == "t0k"
    assert resp.completions[0].result == "accepted"
    assert resp.offers[0].lease_expires_at.tzinfo is not None
    assert client.ack(11, "t0k") is None
    client.append_log(11, "t0k", [LogChunk(stream="stdout", data="hi\n")])
    result = client.complete(Completion(attempt_id=11, token="t0k", outcome="exited", exit_code=0))
    assert result.task_state == "succeeded"
    hb = client.heartbeat("a1", Heartbeat(running=[RunningAttempt(attempt_id=11, token="t0k")]))
    assert hb.cancel == [12]

    bodies = {(m, p): b for m, p, b in seen}
    assert bodies[("POST", "/api/v1/agents/a1/claim")]["max_tasks"] == 2
    assert bodies[("POST", "/api/v1/agents/a1/claim")]["completions"][0]["attempt_id"] == 10
    assert bodies[("POST", "/api/v1/attempts/11/ack")] == {"token": "t0k"}
    assert bodies[("POST", "/api/v1/attempts/11/log")]["chunks"][0]["data"] == "hi\n"
    assert bodies[("POST", "/api/v1/agents/a1/heartbeat")]["running"][0]["attempt_id"] == 11


def test_claim_extends_the_read_timeout_by_wait_s() -> None:
    timeouts: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        return jr(200, {"offers": [], "lease_s": 30})

    _, client = one(handler)
    client._timeout = 10.0
    client.claim("a1", ClaimRequest(max_tasks=1, wait_s=20))
    assert timeouts[-1]["read"] == pytest.approx(30.0)
    assert timeouts[-1]["connect"] == pytest.approx(10.0)


def test_blobs(tmp_path: Path) -> None:
    store: dict[str, bytes] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/blobs/missing":
            digests = json.loads(request.content)["digests"]
            return jr(200, {"missing": [d for d in digests if d not in store]})
        digest = path.rsplit("/", 1)[-1]
        if request.method == "PUT":
            assert request.headers["content-type"] == "application/octet-stream"
            store[digest] = request.content
            return jr(
                201, {"digest": digest, "size": len(request.content), "href": path, "created": True}
            )
        if digest in store:
            return httpx.Response(200, content=store[digest])
        return jr(404, {"error": "not_found", "message": f"blob {digest}"})

    farm, client = one(handler)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.c").write_bytes(b"int a;\n")
    (tmp_path / "b.c").write_bytes(b"int b;\n")
    (tmp_path / "dup.c").write_bytes(b"int b;\n")
    (tmp_path / "src" / "a.c").chmod(0o644)
    (tmp_path / "b.c").chmod(0o755)
    (tmp_path / "dup.c").chmod(0o600)
    da = hashlib.sha256(b"int a;\n").hexdigest()
    db = hashlib.sha256(b"int b;\n").hexdigest()
    store[da] = b"int a;\n"  # already known: not uploaded again

    got = client.upload_files(tmp_path, ["./src/a.c", "b.c", "dup.c"])
    assert got == {
        "src/a.c": (da, 7, 0o644),
        "./src/a.c": (da, 7, 0o644),
        "b.c": (db, 7, 0o755),
        "dup.c": (db, 7, 0o600),
    }
    puts = [c for c in farm.calls if c[1] == "PUT"]
    assert puts == [("m1", "PUT", f"/api/v1/blobs/{db}", False)]
    assert sum(1 for c in farm.calls if c[2] == "/api/v1/blobs/missing") == 1
    assert sha256_file(tmp_path / "b.c") == db

    assert client.get_blob(db) == b"int b;\n"
    dest = tmp_path / "out" / "b.o"
    assert client.download_blob(db, dest) == 7
    assert dest.read_bytes() == b"int b;\n"
    assert [p.name for p in dest.parent.iterdir()] == ["b.o"]

    store[da] = b"tampered"
    with pytest.raises(BlobDigestError):
        client.get_blob(da)
    with pytest.raises(BlobDigestError):
        client.download_blob(da, tmp_path / "out" / "a.o")
    assert not (tmp_path / "out" / "a.o").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["b.o"]  # temp file removed

    with pytest.raises(NotFoundError):
        client.download_blob("0" * 64, tmp_path / "out" / "none")
    assert [p.name for p in dest.parent.iterdir()] == ["b.o"]


def test_upload_refuses_paths_outside_root(tmp_path: Path) -> None:
    from herder.paths import UnsafePath

    _, client = one(ok)
    with pytest.raises(UnsafePath):
        client.upload_files(tmp_path, ["../etc/passwd"])


def test_headers_token_and_user_agent() -> None:
    farm = Farm(m1=ok)
    client = farm.client(token="s3cret")
    client.health()
    req = farm.requests[-1]
    assert req.headers["authorization"] == "Bearer s3cret"
    assert req.headers["user-agent"].startswith("herder-client/")
    assert "Herder-Priority" not in req.headers
    farm2 = Farm(m1=ok)
    farm2.client().health()
    assert "authorization" not in farm2.requests[-1].headers


def test_master_url_forms() -> None:
    assert normalize_master_url("localhost:6238") == "http://localhost:6238"
    assert normalize_master_url("https://m/api/v1/") == "https://m"
    c = HerderClient("http://a:1, b:2 http://a:1", transport=httpx.MockTransport(ok))
    assert c.masters == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError):
        HerderClient([], transport=httpx.MockTransport(ok))
    with pytest.raises(ValueError):
        normalize_master_url("ftp://x")


def test_context_manager_closes() -> None:
    with Farm(m1=ok).client() as client:
        client.health()
    assert client._http.is_closed


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (
            404,
            {"error": "not_found", "message": "job 9 not found", "detail": {"id": 9}},
            NotFoundError,
            "not_found",
        ),
        (
            409,
            {"error": "stale_attempt", "message": "attempt 3 is stale"},
            StaleAttemptError,
            "stale_attempt",
        ),
        (409, {"error": "conflict", "message": "nope"}, ConflictError, "conflict"),
        (
            422,
            {"error": "invalid_request", "message": "bad", "detail": [{"loc": ["x"]}]},
            ApiError,
            "invalid_request",
        ),
        (500, {"error": "internal", "message": "internal error"}, ApiError, "internal"),
    ],
)
def test_error_mapping(status: int, body: dict[str, Any], cls: type[ApiError], code: str) -> None:
    _, client = one(lambda r: jr(status, body))
    with pytest.raises(cls) as info:
        client.get_job(9)
    err = info.value
    assert type(err) is cls
    assert (err.status, err.code, err.message) == (status, code, body["message"])
    assert err.detail == body.get("detail")


def test_non_json_error_is_still_clear() -> None:
    _, client = one(lambda r: httpx.Response(500, text="<html>Internal Server Error</html>"))
    with pytest.raises(ApiError) as info:
        client.get_job(1)
    assert info.value.status == 500 and info.value.code == "http_500"
    assert "Internal Server Error" in str(info.value)


def test_complete_stale_raises() -> None:
    _, client = one(lambda r: jr(409, {"error": "stale_attempt", "message": "stale"}))
    with pytest.raises(StaleAttemptError):
        client.complete(Completion(attempt_id=1, token="t", outcome="exited", exit_code=0))


# -------------------------------------------------------- seeds/004 loop


def test_dead_master_skipped_then_next_tried_and_recorded() -> None:
    farm = Farm(m1=dead, m2=ok)
    client = farm.client()
    assert client.health()["who"] == "m2"
    assert farm.servers == ["m1", "m2"]
    assert [(f.url, f.kind) for f in client.failures] == [("http://m1", "unreachable")]
    # Sticky: the next request goes to m2 first.
    client.health()
    assert farm.servers[-1] == "m2" and len(farm.calls) == 3
    assert client.preferred == "http://m2"
    assert len(client.pop_failures()) == 1 and client.failures == []


def test_sticky_preferred_falls_back_to_configured_list() -> None:
    state = {"m2_up": True}

    def m2(request: httpx.Request) -> httpx.Response:
        if state["m2_up"]:
            return ok(request)
        raise httpx.ConnectError("down", request=request)

    farm = Farm(m1=dead, m2=m2, m3=ok)
    client = farm.client()
    client.health()
    assert farm.servers == ["m1", "m2"]
    state["m2_up"] = False
    assert client.health()["who"] == "m3"
    assert farm.servers[2:] == ["m2", "m1", "m3"]
    assert client.preferred == "http://m3"


def test_busy_then_alternates_then_priority_round() -> None:
    # m1 busy → its alternates m2 (dead) and m3 (busy) are tried → second round
    # with the priority flag: m1 queues and answers.
    farm = Farm(m1=busy(["http://m2", "http://m3"]), m2=dead, m3=busy([]))
    client = farm.client(["http://m1"])
    assert client.health()["who"] == "m1"
    assert farm.calls == [
        ("m1", "GET", "/api/v1/health", False),
        ("m2", "GET", "/api/v1/health", False),
        ("m3", "GET", "/api/v1/health", False),
        ("m1", "GET", "/api/v1/health", True),
    ]
    kinds = [(f.url, f.kind) for f in client.failures]
    assert kinds == [("http://m1", "busy"), ("http://m2", "unreachable"), ("http://m3", "busy")]


def test_alternates_are_deduplicated() -> None:
    # Both masters name each other and themselves, repeatedly: each is tried once per round.
    alts = ["http://m1", "http://m2", "m2", "http://m2/", "http://m3", "http://m3"]
    farm = Farm(m1=busy(alts), m2=busy(alts), m3=busy(alts))
    client = farm.client(["http://m1", "http://m2"])
    client.health()
    assert farm.servers == ["m1", "m2", "m3", "m1"]
    assert [c[3] for c in farm.calls] == [False, False, False, True]


def test_dead_alternate_is_not_retried() -> None:
    farm = Farm(m1=busy(["http://m2"]), m2=dead)
    client = farm.client(["http://m1", "http://m2"])
    client.health()
    assert farm.servers == ["m1", "m2", "m1"]  # m2 dead: not in the priority round


def test_all_busy_raises_no_master_available_with_retry_after() -> None:
    farm = Farm(m1=always_busy, m2=always_busy)
    client = farm.client()
    with pytest.raises(NoMasterAvailable) as info:
        client.health()
    assert farm.servers == ["m1", "m2", "m1", "m2"]
    assert [c[3] for c in farm.calls] == [False, False, True, True]
    err = info.value
    assert err.retry_after == 3.0
    assert [(a.server, a.outcome, a.priority) for a in err.attempts] == [
        ("http://m1", "busy", False),
        ("http://m2", "busy", False),
        ("http://m1", "busy", True),
        ("http://m2", "busy", True),
    ]
    assert "9 queued" in str(err)


def test_all_dead_raises_no_master_available() -> None:
    farm = Farm(m1=dead, m2=dead)
    client = farm.client()
    with pytest.raises(NoMasterAvailable) as info:
        client.get_job(1)
    assert farm.servers == ["m1", "m2"]  # dead servers are not tried again
    assert "http://m1 dead (connection refused)" in str(info.value)
    assert "GET /api/v1/jobs/1" in str(info.value)
    assert {f.url for f in client.failures} == {"http://m1", "http://m2"}


def test_no_service_with_alternates() -> None:
    def read_only(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return jr(
                421,
                {"error": "no_service", "message": "read-only master", "alternates": ["http://rw"]},
            )
        return ok(request)

    def rw(request: httpx.Request) -> httpx.Response:
        return jr(201, job_json())

    farm = Farm(ro=read_only, rw=rw)
    client = farm.client(["http://ro"])
    assert client.submit_job(spec()).id == 7
    assert farm.servers == ["ro", "rw"]
    assert client.failures == []  # no-service is not a failure of the master
    assert client.preferred == "http://rw"


def test_no_service_everywhere_raises() -> None:
    farm = Farm(m1=lambda r: jr(421, {"error": "no_service", "message": "read-only"}))
    with pytest.raises(NoMasterAvailable) as info:
        farm.client().cancel_job(1)
    # seeds/004: a no-service master is not asked again in the priority round.
    assert [a.outcome for a in info.value.attempts] == ["no_service"]


def test_continuation_resets_flag_and_runs_next_command() -> None:
    # m1 is busy → m2 busy → priority round: m1 creates the job and answers with a
    # continuation naming the read-only m3 for the (long) read.
    def m1(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Herder-Priority") != "1":
            return jr(503, {"error": "busy", "message": "busy", "alternates": ["http://m2"]})
        assert request.method == "POST"
        body = {
            "continuation": {"method": "GET", "path": "/jobs/7", "body": None},
            "alternates": ["http://m3"],
        }
        return jr(202, body, {"Herder-Continuation": "1"})

    def m3(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("GET", "/api/v1/jobs/7")
        return jr(200, job_json(state="running"))

    farm = Farm(m1=m1, m2=always_busy, m3=m3)
    client = farm.client(["http://m1"])
    job = client.submit_job(spec())
    assert job.state == "running"
    assert farm.calls == [
        ("m1", "POST", "/api/v1/jobs", False),
        ("m2", "POST", "/api/v1/jobs", False),
        ("m1", "POST", "/api/v1/jobs", True),
        ("m3", "GET", "/api/v1/jobs/7", False),  # flag reset; alternate tried first
    ]


def test_continuation_retries_tried_servers_and_sends_body() -> None:
    # The continuation's command goes to tried servers again (they may now answer).
    def m1(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/jobs":
            return jr(
                200,
                {
                    "continuation": {
                        "method": "POST",
                        "path": "/api/v1/blobs/missing",
                        "body": {"digests": []},
                    }
                },
                {"Herder-Continuation": "1"},
            )
        return jr(503, {"error": "busy", "message": "busy"})

    calls = {"n": 0}

    def m2(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return jr(503, {"error": "busy", "message": "busy"})
        assert json.loads(request.content) == {"digests": []}
        return jr(200, {"missing": []})

    farm = Farm(m1=m1, m2=m2)
    client = farm.client(["http://m2", "http://m1"])
    response = client._request("POST", "/jobs", json={"x": 1}, idempotent=False)
    assert response.json() == {"missing": []}
    assert farm.calls == [
        ("m2", "POST", "/api/v1/jobs", False),
        ("m1", "POST", "/api/v1/jobs", False),
        ("m2", "POST", "/api/v1/blobs/missing", False),
    ]


def test_non_idempotent_not_resent_after_ambiguous_failure() -> None:
    def lost(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    farm = Farm(m1=lost, m2=ok)
    client = farm.client()
    with pytest.raises(RequestOutcomeUnknown) as info:
        client.complete(Completion(attempt_id=1, token="t", outcome="exited", exit_code=0))
    assert farm.servers == ["m1"]
    assert isinstance(info.value.cause, httpx.ReadTimeout)
    with pytest.raises(RequestOutcomeUnknown):
        client.submit_job(spec())  # no idempotency key
    assert farm.servers == ["m1", "m1"]
    with pytest.raises(RequestOutcomeUnknown):
        client.append_log(1, "t", [LogChunk(stream="stdout", data="x")])


def test_idempotent_request_retried_elsewhere_after_ambiguous_failure() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset", request=request)

    def m2(request: httpx.Request) -> httpx.Response:
        return jr(200, job_json()) if request.method == "POST" else ok(request)

    farm = Farm(m1=broken, m2=m2)
    client = farm.client()
    assert client.submit_job(spec(key="k1")).id == 7  # idempotency key: safe to resend
    # Once more on m1 (a fresh connection) before giving up on it.
    assert farm.servers == ["m1", "m1", "m2"]


def test_connect_failure_is_safe_even_for_non_idempotent() -> None:
    farm = Farm(m1=dead, m2=lambda r: jr(200, {"attempt_id": 1, "result": "accepted"}))
    client = farm.client()
    result = client.complete(Completion(attempt_id=1, token="t", outcome="exited", exit_code=0))
    assert result.result == "accepted"
    assert farm.servers == ["m1", "m2"]


def test_gateway_error_on_non_idempotent_is_ambiguous() -> None:
    farm = Farm(m1=lambda r: httpx.Response(502, text="bad gateway"), m2=ok)
    client = farm.client()
    with pytest.raises(RequestOutcomeUnknown):
        client.complete(Completion(attempt_id=1, token="t", outcome="exited", exit_code=0))
    assert client.health()["who"] == "m2"


def test_busy_deferral_resends_non_idempotent() -> None:
    # A deferral means the master did not process it: resending is safe.
    farm = Farm(m1=always_busy, m2=lambda r: jr(200, {"attempt_id": 1, "result": "accepted"}))
    client = farm.client()
    assert (
        client.complete(Completion(attempt_id=1, token="t", outcome="exited")).result == "accepted"
    )
    assert farm.servers == ["m1", "m2"]


def test_claim_with_completions_is_not_resent() -> None:
    def lost(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("server disconnected", request=request)

    farm = Farm(m1=lost, m2=lambda r: jr(200, {"offers": [], "lease_s": 30}))
    client = farm.client()
    done = Completion(attempt_id=1, token="t", outcome="exited", exit_code=0)
    with pytest.raises(RequestOutcomeUnknown):
        client.claim("a1", ClaimRequest(max_tasks=1, completions=[done]))
    assert client.claim("a1", ClaimRequest(max_tasks=1)).offers == []
    assert farm.servers == ["m1", "m1", "m1", "m2"]


def test_error_answer_is_not_retried_elsewhere() -> None:
    farm = Farm(m1=lambda r: jr(404, {"error": "not_found", "message": "no"}), m2=ok)
    client = farm.client()
    with pytest.raises(NotFoundError):
        client.get_job(1)
    assert farm.servers == ["m1"]


def test_malformed_answer_is_a_clear_client_error() -> None:
    from herder.client import HerderClientError

    _, client = one(lambda r: jr(200, {"id": "not-a-job"}))
    with pytest.raises(HerderClientError, match="not a valid JobView"):
        client.get_job(1)


def test_unexpected_redirect_is_an_api_error() -> None:
    _, client = one(lambda r: httpx.Response(302, headers={"location": "http://elsewhere/"}))
    with pytest.raises(ApiError) as info:
        client.get_job(1)
    assert info.value.status == 302


def test_iter_job_events_until_final() -> None:
    states = iter(["running", "succeeded"])

    def event(i: int) -> dict[str, Any]:
        return {
            "id": i,
            "at": NOW,
            "job_id": 7,
            "task_id": None,
            "attempt_id": None,
            "agent_id": None,
            "kind": "job",
            "from_state": None,
            "to_state": None,
            "reason": None,
        }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            after = int(request.url.params["after"])
            return jr(200, {"events": [event(i) for i in range(after + 1, min(after + 3, 5))]})
        return jr(200, job_json(state=next(states)))

    _, client = one(handler)
    ids = [e.id for e in client.iter_job_events(7, poll_s=0)]
    assert ids == [1, 2, 3, 4]
