"""Chaos: the database goes away under a running farm (issue 9).

A real master and a real agent process run a job of short tasks while

1. PostgreSQL is restarted with ``pg_ctl restart -m immediate`` (three times),
2. PostgreSQL is unreachable for 30 s (a fault proxy between the master and
   the server blackholes the link: connections hang, they are not refused),
3. SQLite's disk (a 4 MiB tmpfs) is full.

While the database is gone the master answers every request that needs it
with a busy deferral (503, ``{"error": "busy", "message": "database …"}``,
``Retry-After``), seen on the wire here; never a 500. It logs one line when
the database is lost and one when it is back, no traceback; when the database
returns it carries on by itself (fresh connections), the job finishes, and
the invariants of DESIGN §5 hold (nothing lost, nothing committed twice).
On a full SQLite disk a submission gets a clear 507 ``database_full`` error
and changes nothing (rows counted before and after), reads still work, and
once space is freed a job runs to its end.

Each PostgreSQL test restarts or cuts off a cluster of its own
(``pg.own_cluster``), never the session's shared one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from chaoslib import ChaosFarm, fetch_events, job_counts, summary_line, wait_job, wait_until
from invariants import assert_no_violations, check_job, check_outputs
from sqlalchemy.engine import make_url

import pg
from faultproxy import FaultProxy
from herder.api_models import JobSubmit, JobView
from herder.client import ApiError, HerderClient
from herder.localfarm import LocalFarm
from waiting import metric

DB_TIMEOUT_S = "3"  # HERDER_DB_TIMEOUT_S of the masters: how long a request waits for the DB
OUTAGE_S = 30.0  # the figure


def short_job(name: str, n: int, pad: int = 0, sleep_s: float = 0.0) -> JobSubmit:
    """``n`` tasks that each write one small output file (``pad`` lengthens commands)."""
    filler = f" # {'x' * pad}" if pad else ""
    nap = f"sleep {sleep_s:g} && " if sleep_s else ""
    return JobSubmit.model_validate(
        {
            "name": name,
            "stages": [
                {
                    "name": "s",
                    "tasks": [
                        {
                            "name": f"t{i}",
                            "command": (
                                f"{nap}mkdir -p out && echo '{name} {i}' > out/r.txt{filler}"
                            ),
                        }
                        for i in range(n)
                    ],
                }
            ],
        }
    )


def expected_outputs(job: JobView) -> dict[int, dict[str, bytes]]:
    return {
        t.id: {"out/r.txt": f"{job.name} {t.name.removeprefix('t')}\n".encode()}
        for s in job.stages
        for t in s.tasks
    }


def finished(url: str, job_id: int) -> int:
    counts = job_counts(url, job_id) or {}
    return sum(counts.get(k, 0) for k in ("succeeded", "failed", "cancelled"))


@dataclass
class Answer:
    what: str
    status: int | None  # None: no answer (timeout, connection error)
    retry_after: str | None
    body: object
    elapsed_s: float


@dataclass
class Prober:
    """Sends requests that need the database and records every answer as seen on the wire."""

    url: str
    job_id: int
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._http = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def _send(self, what: str, method: str, path: str, body: object = None) -> Answer:
        t0 = time.monotonic()
        try:
            r = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            answer = Answer(what, None, None, repr(exc), time.monotonic() - t0)
        else:
            try:
                payload: object = r.json()
            except ValueError:
                payload = r.text[:500]
            answer = Answer(
                what, r.status_code, r.headers.get("retry-after"), payload, time.monotonic() - t0
            )
        self.answers.append(answer)
        return answer

    def round(self, n: int, idempotency_key: str | None = None) -> list[Answer]:
        """A read, a write (a new job, or the same one again under a key) and the health check."""
        spec = short_job(f"probe{n}", 1)
        spec.idempotency_key = idempotency_key
        submit = spec.model_dump(mode="json", exclude_none=True)
        return [
            self._send("read", "GET", f"/api/v1/jobs/{self.job_id}"),
            self._send("write", "POST", "/api/v1/jobs", submit),
            self._send("health", "GET", "/healthz"),
        ]


def assert_busy_deferral(a: Answer) -> None:
    """A 503 busy deferral about the database, with a Retry-After."""
    assert a.status == 503, f"{a.what}: {a.status} {a.body!r} (want a 503 busy deferral)"
    assert a.retry_after is not None and float(a.retry_after) >= 1, (
        f"{a.what}: no Retry-After on the 503: {a.retry_after!r}"
    )
    assert isinstance(a.body, dict) and a.body.get("error") == "busy", a.body
    assert str(a.body.get("message", "")).startswith("database "), a.body


def assert_clean_logs(cf: ChaosFarm, lost_max: int) -> str:
    cf.check_master()
    assert cf.master_crashes == [], f"the master exited on its own: {cf.master_crashes}"
    assert cf.tracebacks() == {}, f"tracebacks in the logs:\n{cf.traceback_excerpts()}"
    log = cf.master_log()
    lost, back = log.count("event=database_lost"), log.count("event=database_back")
    assert lost <= lost_max and back == lost, (
        f"{lost} database_lost / {back} database_back lines (want at most {lost_max}, paired)"
    )
    assert "event=unhandled_exception" not in log
    return log


def check_finished_job(client: HerderClient, job_id: int) -> None:
    job = wait_job(client, job_id, timeout=90)
    events = fetch_events(client, job_id)
    summary = check_job(job, events)
    summary.violations += check_outputs(job, expected_outputs(job), client.get_blob)
    assert_no_violations(summary.violations)


@contextlib.contextmanager
def farm_on(db_url: str, workdir: Path) -> Iterator[ChaosFarm]:
    cf = ChaosFarm(
        LocalFarm(db_url=db_url, workdir=workdir, lease_s=5.0, ack_timeout_s=5.0, log_level="info")
    )
    try:
        cf.start_master()
        cf.start_agent("A", slots=4)
        cf.farm.wait_agents(1)
        yield cf
    except BaseException:
        print(f"\n===== logs of {workdir} =====\n{cf.log_tails()}")
        raise
    finally:
        cf.stop()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_postgres_restarted_mid_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERDER_DB_TIMEOUT_S", DB_TIMEOUT_S)
    started = time.monotonic()
    # Durable commits: a killed server must keep what it acknowledged (DESIGN §5).
    with (
        pg.own_cluster(synchronous_commit=True) as cluster,
        farm_on(pg.create_database(cluster.dsn), tmp_path) as cf,
    ):
        with HerderClient(cf.url, timeout=15) as client:
            job_id = client.submit_job(short_job("restart", 100, sleep_s=0.1)).id
            prober = Prober(cf.url, job_id)
            stop = threading.Event()

            def probe_loop() -> None:
                n = 0
                while not stop.wait(0.2):  # paced: the probes must not starve the job
                    prober.round(n, idempotency_key="probe")
                    n += 1

            thread = threading.Thread(target=probe_loop, daemon=True)
            thread.start()
            restarts_at = []
            try:
                for threshold in (15, 40, 65):
                    wait_until(
                        lambda t=threshold: finished(cf.url, job_id) >= t,
                        60,
                        f"{threshold} tasks done",
                    )
                    restarts_at.append(finished(cf.url, job_id))
                    cluster.restart("immediate")
                assert restarts_at[-1] < 100, f"the job ended before the restarts: {restarts_at}"
                check_finished_job(client, job_id)
            finally:
                stop.set()
                thread.join(30)
                prober.close()
            # Every answer the master gave: served, or deferred as busy.
            for a in prober.answers:
                if a.status == 200 or (a.what == "write" and a.status == 201):
                    continue
                assert_busy_deferral(a)
            deferred = sum(a.status == 503 for a in prober.answers)
            assert metric(cf.url, "herder_database_up") == 1
            assert_clean_logs(cf, lost_max=3)
        print(
            summary_line(
                "pg-restart",
                "postgresql",
                restarts_at=restarts_at,
                probes=len(prober.answers),
                deferred=deferred,
                wall_s=round(time.monotonic() - started, 1),
            )
        )


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_postgres_unreachable_for_30s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERDER_DB_TIMEOUT_S", DB_TIMEOUT_S)
    started = time.monotonic()
    with pg.own_cluster() as cluster, FaultProxy(cluster.port, record=False) as proxy:
        direct = pg.create_database(cluster.dsn)
        via_proxy = make_url(direct).set(port=proxy.port).render_as_string(hide_password=False)
        with farm_on(via_proxy, tmp_path) as cf, HerderClient(cf.url, timeout=15) as client:
            job_id = client.submit_job(short_job("outage", 60)).id
            wait_until(lambda: finished(cf.url, job_id) >= 10, 60, "10 tasks done")
            prober = Prober(cf.url, job_id)
            proxy.cut("blackhole")
            t_cut = time.monotonic()
            n = 0
            try:
                while time.monotonic() - t_cut < OUTAGE_S:
                    prober.round(n)
                    n += 1
            finally:
                proxy.heal()
                prober.close()
            outage_answers = list(prober.answers)
            for a in outage_answers:
                assert_busy_deferral(a)
                assert a.elapsed_s < 2 * float(DB_TIMEOUT_S) + 2, a
            assert {a.what for a in outage_answers} == {"read", "write", "health"}
            health = [a.body for a in outage_answers if a.what == "health"]
            assert all(isinstance(b, dict) and b.get("database") == "down" for b in health)
            unavailable = [
                a for a in outage_answers if str(a.body).find("database unavailable") >= 0
            ]
            assert unavailable, "no answer said the database is unavailable"

            check_finished_job(client, job_id)
            # The deferred submissions changed nothing: the job is the only one.
            assert [j.id for j in client.list_jobs()] == [job_id]
            assert httpx.get(f"{cf.url}/healthz", timeout=10).json()["database"] == "up"
            log = assert_clean_logs(cf, lost_max=1)
            assert "event=database_lost" in log, "the outage was never noticed"
            agent_log = cf.agent_log("A")
    print(
        summary_line(
            "pg-unreachable",
            "postgresql",
            outage_s=OUTAGE_S,
            probes=len(outage_answers),
            delivery_retries=agent_log.count("event=delivery_failed"),
            wall_s=round(time.monotonic() - started, 1),
        )
    )


# ------------------------------------------------------------------ SQLite


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs at {path} (this test runs as root): {r.stderr.strip()}",
            pytrace=False,
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_disk(path: Path) -> Path:
    """Write a filler file until the file system is full."""
    filler = path / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
    return filler


def row_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("jobs", "stages", "tasks", "attempts", "events")
        }
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sqlite_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERDER_DB_TIMEOUT_S", DB_TIMEOUT_S)
    started = time.monotonic()
    with small_tmpfs(tmp_path / "disk") as disk:
        db = disk / "herder.db"
        with farm_on(f"sqlite:///{db}", tmp_path / "farm") as cf:
            with HerderClient(cf.url, timeout=15) as client:
                first = client.submit_job(short_job("before", 5)).id
                check_finished_job(client, first)

                filler = fill_disk(disk)
                before = row_counts(db)
                # Big enough not to fit in what the WAL file already holds.
                big = short_job("while-full", 2000, pad=400)
                with pytest.raises(ApiError) as err:
                    client.submit_job(big)
                e = err.value
                assert (e.status, e.code) == (507, "database_full"), (e.status, e.code, e.message)
                assert e.message.startswith("database full: ") and "SQLITE_FULL" in e.message, (
                    e.message
                )
                raw = httpx.post(
                    f"{cf.url}/api/v1/jobs",
                    content=json.dumps(big.model_dump(mode="json", exclude_none=True)),
                    headers={"content-type": "application/json"},
                    timeout=30,
                )
                assert raw.status_code == 507 and raw.headers.get("retry-after"), raw.headers
                assert row_counts(db) == before, "a failed submission changed the database"
                hz = httpx.get(f"{cf.url}/healthz", timeout=10).json()
                assert hz["database"] == "full" and "SQLITE_FULL" in hz["message"], hz
                # Reads are still served.
                assert client.get_job(first).state == "succeeded"
                assert [j.id for j in client.list_jobs()] == [first]

                os.unlink(filler)
                after = client.submit_job(short_job("after", 20)).id
                check_finished_job(client, after)
                assert sorted(j.id for j in client.list_jobs()) == sorted([first, after])
            # Small writes (heartbeats) may still fit while big ones fail: a few pairs.
            log = assert_clean_logs(cf, lost_max=3)
            assert "event=database_lost problem=full" in log
    print(
        summary_line(
            "sqlite-full", "sqlite", rows=before, wall_s=round(time.monotonic() - started, 1)
        )
    )
