"""Every API input bounded and checked at the door (issue 11), against a real master
process over HTTP on loopback, on SQLite and PostgreSQL.

Each bad input is refused with its status and a message naming the field, and
the store is unchanged (rows counted in the database before and after).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa

import pg
from herder.api_limits import COMMAND_STRING_MAX, INT64_MAX
from herder.localfarm import free_port
from waiting import wait_for

HERE = Path(__file__).parent
MAX_BODY = 4 << 20  # the test master's JSON body bound
MAX_BLOB = 2 << 20  # ... and blob bound
MAX_TASKS = 50  # ... and tasks per job (inputs_master.py)


@dataclass
class Master:
    url: str
    db_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    engine: sa.Engine

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def counts(self) -> tuple[int, ...]:
        with self.engine.connect() as c:
            return tuple(
                c.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                for t in ("jobs", "tasks", "blobs", "events")
            )


def start_master(db_url: str, workdir: Path, max_body: int, max_blob: int) -> Master:
    port = free_port()
    log_path = workdir / f"master-{port}.log"
    limits = [str(max_body), str(max_blob)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "inputs_master.py"), db_url, str(port), *limits],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 30, "test master healthy", lambda: log_path.read_text())
    return Master(url, db_url, proc, log_path, sa.create_engine(db_url))


def stop_master(m: Master) -> None:
    m.engine.dispose()
    m.proc.terminate()
    try:
        m.proc.wait(15)
    except subprocess.TimeoutExpired:
        m.proc.kill()
        m.proc.wait()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def dialect_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'herder.db'}"
        return
    maint = request.getfixturevalue("pg_dsn")
    url = pg.create_database(maint)
    try:
        yield url
    finally:
        pg.drop_database(maint, url)


@pytest.fixture(scope="module")
def master(dialect_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Master]:
    m = start_master(dialect_url, tmp_path_factory.mktemp("master"), MAX_BODY, MAX_BLOB)
    try:
        yield m
    finally:
        stop_master(m)


def job(**task: Any) -> dict[str, Any]:
    return {"name": "j", "stages": [{"name": "s", "tasks": [{"command": "true", **task}]}]}


def post_raw(m: Master, path: str, body: dict[str, Any]) -> httpx.Response:
    # json.dumps escapes a lone surrogate as "\udc00", as a fuzzer sends it.
    return httpx.post(
        f"{m.url}{path}",
        content=json.dumps(body).encode("ascii"),
        headers={"content-type": "application/json"},
        timeout=30,
    )


def assert_refused(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "message"}, body
    for needle in needles:
        assert needle in body["message"], body


BIG = "x" * (COMMAND_STRING_MAX + 1)

BAD_JOBS: dict[str, tuple[Any, ...]] = {
    "surrogate_command": (job(command="echo \udc00"), "stages.0.tasks.0.command"),
    "surrogate_argv": (job(command=["echo", "\ud800"]), "stages.0.tasks.0.command.1"),
    "surrogate_env_key": (job(env={"A\udc00": "1"}), "stages.0.tasks.0.env"),
    "surrogate_name": ({**job(), "name": "j\udfff"}, "name"),
    "nul_command": (job(command="echo a\x00b"), "stages.0.tasks.0.command"),
    "nul_argv": (job(command=["echo", "a\x00b"]), "argv[1] contains a NUL"),
    "nul_env_key": (job(env={"A\x00": "1"}), "stages.0.tasks.0.env"),
    "nul_env_value": (job(env={"A": "a\x00b"}), "NUL"),
    "equals_env_key": (job(env={"A=B": "1"}), "invalid environment variable name"),
    "empty_env_key": (job(env={"": "1"}), "invalid environment variable name"),
    "long_command": (job(command=BIG), "stages.0.tasks.0.command"),
    "long_env": (job(env={"A": BIG}), "stages.0.tasks.0.env"),
    "argv_total": (job(command=["x" * 100_000] * 11), "stages.0.tasks.0: "),
    "timeout_huge": (job(timeout_s=1e308), "stages.0.tasks.0.timeout_s"),
    "timeout_zero": (job(timeout_s=0), "stages.0.tasks.0.timeout_s"),
    "timeout_31_days": (job(timeout_s=31 * 86400), "stages.0.tasks.0.timeout_s"),
    "ram_int64": (job(ram_mb=1 << 63), "stages.0.tasks.0.ram_mb"),
    "ram_huge": (job(ram_mb=1 << 40), "stages.0.tasks.0.ram_mb"),
    "cpus": (job(cpus=10**6), "stages.0.tasks.0.cpus"),
    "max_attempts": (job(max_attempts=1000), "stages.0.tasks.0.max_attempts"),
    "priority": ({**job(), "priority": 1 << 64}, "priority"),
    "output_backslash": (job(outputs=["a\\b"]), "stages.0.tasks.0.outputs"),
    "output_escape": (job(outputs=["../x"]), "stages.0.tasks.0.outputs"),
    "output_control": (job(outputs=["a\nb"]), "stages.0.tasks.0.outputs"),
    "require_control": (
        job(requires=[{"path": "a\x1b[0m", "digest": "0" * 64}]),
        "stages.0.tasks.0.requires.0.path",
    ),
    "nul_name": ({**job(), "name": "a\x00b"}, "name: contains a NUL"),
    "nul_pool": ({**job(), "pool": "p\x00"}, "pool: contains a NUL"),
    "nul_owner": ({**job(), "owner": "o\x00"}, "owner: contains a NUL"),
    "nul_key": ({**job(), "idempotency_key": "k\x00"}, "idempotency_key: contains a NUL"),
    "nul_tag": (job(tags=["t\x00"]), "stages.0.tasks.0.tags: ", "is not a valid tag"),
    "bad_tag": (job(tags=["has space"]), "stages.0.tasks.0.tags: ", "is not a valid tag"),
    "both_tags": (job(tags=["gpu", "!gpu"]), "tags both required and negated: gpu"),
    "nul_task_name": (job(name="n\x00"), "stages.0.tasks.0.name: contains a NUL"),
    "too_many_tasks": (
        {"name": "j", "stages": [{"name": "s", "tasks": [{"command": "true"}] * (MAX_TASKS + 1)}]},
        f"more than {MAX_TASKS}",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_bad_submission_is_refused_and_nothing_stored(master: Master, case: str) -> None:
    body, *needles = BAD_JOBS[case]
    before = master.counts()
    assert_refused(post_raw(master, "/api/v1/jobs", body), 422, *needles)
    assert master.counts() == before


def test_master_keeps_serving_after_a_lone_surrogate(master: Master) -> None:
    r = post_raw(master, "/api/v1/jobs", job(command="echo \udc00"))
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "stages", "0", "tasks", "0", "command"]
    ok = httpx.post(f"{master.url}/api/v1/jobs", json=job(command="echo fine"), timeout=30)
    assert ok.status_code == 201, ok.text
    for path in ("/api/v1/jobs", f"/api/v1/jobs/{ok.json()['id']}", "/api/v1/events"):
        assert httpx.get(f"{master.url}{path}", timeout=30).status_code == 200
    assert "Traceback" not in master.log()


def test_a_valid_job_at_the_bounds_is_accepted(master: Master) -> None:
    body = job(
        command=["x" * (COMMAND_STRING_MAX - 10)],
        env={"A": "é" * 1000},
        timeout_s=30 * 86400,
        ram_mb=1 << 26,
        max_attempts=100,
    )
    r = httpx.post(f"{master.url}/api/v1/jobs", json=body, timeout=30)
    assert r.status_code == 201, r.text


OUT_OF_RANGE = [
    ("GET", f"/api/v1/jobs/{1 << 63}", None),
    ("GET", f"/api/v1/jobs/{10**30}", None),
    ("GET", f"/api/v1/tasks/{1 << 63}", None),
    ("POST", f"/api/v1/jobs/{1 << 64}/cancel", None),
    ("GET", f"/api/v1/jobs/1/events?after={1 << 63}", None),
    ("GET", f"/api/v1/events?job_id={1 << 63}", None),
    ("GET", f"/api/v1/events?task_id={1 << 63}", None),
    ("GET", f"/api/v1/attempts/{1 << 63}/log", None),
    ("POST", f"/api/v1/attempts/{1 << 63}/ack", {"token": "t"}),
    ("POST", "/api/v1/attempts/1/ack", {"token": "tökén"}),
    ("POST", "/api/v1/attempts/1/ack", {"token": "t" * 101}),
    (
        "POST",
        "/api/v1/attempts/1/log",
        {"token": "\u00e9", "chunks": [{"stream": "stdout", "data": "x"}]},
    ),
    ("POST", "/api/v1/agents/a1/claim", {"max_tasks": 0, "acks": [1 << 63]}),
    (
        "POST",
        "/api/v1/attempts/1/complete",
        {"attempt_id": 1, "token": "t", "outcome": "exited", "exit_code": 1 << 63},
    ),
    (
        "POST",
        "/api/v1/agents/a1/heartbeat",
        {"running": [{"attempt_id": 1, "token": "tök"}]},
    ),
    (
        "POST",
        "/api/v1/agents",
        {"name": "a", "hostname": "h", "slots": 1, "ram_mb": 1 << 63},
    ),
    ("POST", "/api/v1/agents", {"name": "a\x00", "hostname": "h", "slots": 1}),
    ("POST", "/api/v1/agents", {"name": "a", "hostname": "h", "slots": 1, "tags": ["\x00"]}),
    ("GET", "/api/v1/agents/a%00", None),
    ("POST", "/api/v1/agents/a%00/heartbeat", {}),
    ("POST", "/api/v1/agents/a%01/drain", None),
    ("GET", "/api/v1/masters/m%00", None),
    (
        "POST",
        "/api/v1/masters/m1/failures",
        {"time": "2026-01-01T00:00:00Z", "reporter": "r\x00", "kind": "timeout"},
    ),
]


@pytest.mark.parametrize(("method", "path", "body"), OUT_OF_RANGE)
def test_out_of_range_ints_and_bad_tokens_are_422(
    master: Master, method: str, path: str, body: dict[str, Any] | None
) -> None:
    before = master.counts()
    r = httpx.request(method, f"{master.url}{path}", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request"
    assert master.counts() == before


def test_ascii_token_of_unknown_attempt_is_not_a_server_error(master: Master) -> None:
    r = httpx.post(f"{master.url}/api/v1/attempts/{INT64_MAX}/ack", json={"token": "t"})
    assert r.status_code in (404, 409), r.text


def chunks(data: bytes, size: int = 64 << 10) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_json_body_past_the_limit_is_413_chunked_or_not(master: Master) -> None:
    before = master.counts()
    big = json.dumps(job(env={f"V{i}": "x" * 60_000 for i in range(80)})).encode()
    assert len(big) > MAX_BODY
    url = f"{master.url}/api/v1/jobs"
    headers = {"content-type": "application/json"}
    r = httpx.post(url, content=chunks(big), headers=headers, timeout=30)  # no Content-Length
    assert_refused(r, 413, str(MAX_BODY))
    r = httpx.post(url, content=big, headers=headers, timeout=30)
    assert_refused(r, 413, str(MAX_BODY))
    # FastAPI-parsed bodies too
    r = httpx.post(f"{master.url}/api/v1/masters/m1/failures", content=chunks(big), headers=headers)
    assert_refused(r, 413, str(MAX_BODY))
    assert master.counts() == before


def test_blob_uploads_stream_and_are_checked(master: Master) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, several chunks
    digest = hashlib.sha256(data).hexdigest()
    url = f"{master.url}/api/v1/blobs/{digest}"
    before = master.counts()
    # the wrong bytes for the digest: 422, nothing kept
    r = httpx.put(url, content=chunks(data[:-1] + b"!"), timeout=30)
    assert_refused(r, 422, "sha256")
    # past the bound, chunked: 413 although no Content-Length announced it
    too_big = b"\0" * (MAX_BLOB + 1)
    r = httpx.put(
        f"{master.url}/api/v1/blobs/{hashlib.sha256(too_big).hexdigest()}",
        content=chunks(too_big),
        timeout=30,
    )
    assert_refused(r, 413, str(MAX_BLOB))
    assert master.counts() == before
    r = httpx.put(url, content=chunks(data), timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["size"] == len(data)
    assert httpx.put(url, content=data, timeout=30).status_code == 200
    assert httpx.get(url, timeout=30).content == data
    empty = hashlib.sha256(b"").hexdigest()
    assert httpx.put(f"{master.url}/api/v1/blobs/{empty}", content=b"").status_code == 201
    assert httpx.get(f"{master.url}/api/v1/blobs/{empty}").content == b""


def metric(m: Master, name: str) -> float:
    for line in httpx.get(f"{m.url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_500_of_the_exception_handler_is_counted(master: Master) -> None:
    before = metric(master, "herder_responses_5xx_total")
    r = httpx.get(f"{master.url}/test/boom")
    assert r.status_code == 500
    assert r.json()["error"] == "internal"
    assert metric(master, "herder_responses_5xx_total") == before + 1


def test_unknown_methods_are_405_with_allow(master: Master) -> None:
    for method in ("TRACE", "PATCH", "DELETE"):
        r = httpx.request(method, f"{master.url}/api/v1/jobs")
        assert r.status_code == 405, r.text
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
        assert r.json()["error"] == "method_not_allowed"


def test_openapi_documents_the_refusals(master: Master) -> None:
    doc = httpx.get(f"{master.url}/openapi.json").json()
    put = doc["paths"]["/api/v1/blobs/{digest}"]["put"]["responses"]
    assert {"200", "201", "413", "422", "500"} <= set(put)
    submit = doc["paths"]["/api/v1/jobs"]["post"]["responses"]
    assert {"200", "201", "413", "422"} <= set(submit)


@pytest.mark.timeout(240)
def test_200_mb_upload_keeps_master_memory_bounded(
    dialect_url: str, tmp_path: Path, master: Master
) -> None:
    # A master of its own (the module's bounds blobs to 2 MiB), on the same database.
    big = start_master(dialect_url, tmp_path, MAX_BODY, 256 << 20)
    try:
        block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
        n = 200
        sha = hashlib.sha256()
        for _ in range(n):
            sha.update(block)
        digest = sha.hexdigest()
        proc = psutil.Process(big.proc.pid)
        base = proc.memory_info().rss
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                done.wait(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            r = httpx.put(
                f"{big.url}/api/v1/blobs/{digest}",
                content=(block for _ in range(n)),
                timeout=180,
            )
        finally:
            done.set()
            sampler.join()
        assert r.status_code == 201, r.text
        assert r.json()["size"] == n * len(block)
        growth_mb = (peak[0] - base) / 1e6
        print(f"master RSS {base / 1e6:.0f} MB, peak {peak[0] / 1e6:.0f} MB (+{growth_mb:.0f})")
        # PostgreSQL receives the bytes through COPY, SQLite writes them into a
        # zeroblob in place (`data` is the blobs table's last column): nothing but
        # chunks in the master (785 MB before).
        assert growth_mb < 100, growth_mb
        length = "octet_length" if dialect_url.startswith("postgresql") else "length"
        with big.engine.connect() as c:
            stored = c.execute(
                sa.text(f"SELECT size, {length}(data) FROM blobs WHERE digest = :d"),
                {"d": digest},
            ).one()
        assert tuple(stored) == (n * len(block), n * len(block))
    finally:
        stop_master(big)


def test_master_failure_report_with_a_lone_surrogate_is_refused(master: Master) -> None:
    report = {"time": "2026-01-01T00:00:00Z", "reporter": "r\udc00", "kind": "timeout"}
    with master.engine.connect() as c:
        before = c.execute(sa.text("SELECT count(*) FROM master_failures")).scalar_one()
    assert_refused(post_raw(master, "/api/v1/masters/m1/failures", report), 422, "reporter")
    with master.engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM master_failures")).scalar_one() == before


def test_nul_in_program_output_and_errors_is_kept_storable(master: Master) -> None:
    """Output and error texts are data, not names: their NULs become U+FFFD (no
    PostgreSQL text holds a NUL) instead of refusing what an agent must report."""
    http = httpx.Client(base_url=master.url, timeout=30)
    agent = http.post("/api/v1/agents", json={"name": "nul", "hostname": "h", "slots": 1})
    agent_id = agent.json()["id"]
    submitted = http.post("/api/v1/jobs", json={**job(), "pool": "nul-pool"})
    assert submitted.status_code == 201, submitted.text
    offers: list[dict[str, Any]] = []

    def offered() -> bool:
        claim = http.post(f"/api/v1/agents/{agent_id}/claim", json={"max_tasks": 1})
        offers.extend(o for o in claim.json()["offers"] if o["job_id"] == submitted.json()["id"])
        return bool(offers)

    wait_for(offered, 30, "an offer of the job", master.log)
    offer = offers[0]
    attempt, token = offer["attempt_id"], offer["token"]
    assert http.post(f"/api/v1/attempts/{attempt}/ack", json={"token": token}).status_code == 204
    chunk = {"stream": "stdout", "data": "a\x00b"}
    r = http.post(f"/api/v1/attempts/{attempt}/log", json={"token": token, "chunks": [chunk]})
    assert r.status_code == 204, r.text
    done = {"attempt_id": attempt, "token": token, "outcome": "exited", "exit_code": 3}
    r = http.post(f"/api/v1/attempts/{attempt}/complete", json={**done, "error": "e\x00"})
    assert r.status_code == 200, r.text
    assert http.get(f"/api/v1/attempts/{attempt}/log").json()["data"] == "a\ufffdb"
    assert http.get(f"/api/v1/tasks/{offer['task_id']}").json()["error"] == "e\ufffd"
