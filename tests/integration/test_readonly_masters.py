"""Read-only masters on a PostgreSQL hot standby, and masters that defer (issue 10).

A primary PostgreSQL and a hot standby fed by streaming replication
(``pg_basebackup -R``, tests/pgstandby.py); one read-write master on the
primary and two read-only masters on the standby, all real ``herder master``
processes; the clients are the real client loop (``herder.client``).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

import pg
import pgstandby
from herder.api_models import JobSubmit, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.localfarm import LocalFarm
from mastersproc import MasterProc
from waiting import wait_for

pytestmark = pytest.mark.postgres

HEARTBEAT_S = 0.5


@dataclass
class Replicated:
    primary: pg.Cluster
    standby: pg.Cluster


@pytest.fixture(scope="module")
def replicated() -> Iterator[Replicated]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HERDER_MASTER_HEARTBEAT_S", str(HEARTBEAT_S))
        try:
            with pg.own_cluster() as primary, pgstandby.hot_standby(primary) as standby:
                yield Replicated(primary, standby)
        except pg.PostgresUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)


@dataclass
class Farm:
    rw: MasterProc
    ro: list[MasterProc]
    primary_url: str
    standby_url: str
    replicated: Replicated
    workdir: Path

    def replay(self) -> None:
        pgstandby.wait_replayed(self.replicated.primary, self.replicated.standby)

    def logs(self) -> str:
        return "\n".join(f"--- {m.name}\n{m.log()[-3000:]}" for m in (self.rw, *self.ro))


def start_farm(rep: Replicated, workdir: Path, *rw_flags: str) -> Farm:
    primary_url = pg.create_database(rep.primary.dsn)
    standby_url = (
        make_url(primary_url).set(port=rep.standby.port).render_as_string(hide_password=False)
    )
    rw = MasterProc(primary_url, workdir, "rw", *rw_flags).start()
    farm = Farm(rw, [], primary_url, standby_url, rep, workdir)
    farm.replay()  # the schema (and the read-write master's directory row) on the standby
    for i in (1, 2):
        farm.ro.append(MasterProc(standby_url, workdir, f"ro{i}", "--read-only").start())
    return farm


@contextmanager
def running_farm(rep: Replicated, workdir: Path, *rw_flags: str) -> Iterator[Farm]:
    f = start_farm(rep, workdir, *rw_flags)
    try:
        wait_all_listed(f)
        yield f
    finally:
        for m in (*f.ro, f.rw):
            m.stop()
        try:
            pg.drop_database(rep.primary.dsn, f.primary_url)
        except Exception:
            pass


@pytest.fixture(scope="module")
def farm(replicated: Replicated, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """One read-write and two read-only masters, shared by the tests that only read
    and write (each its own jobs)."""
    with running_farm(replicated, tmp_path_factory.mktemp("farm")) as f:
        yield f


def directory(url: str) -> dict[str, str]:
    r = httpx.get(f"{url}/api/v1/masters", timeout=5, trust_env=False)
    assert r.status_code == 200, r.text
    return {m["url"]: m["role"] for m in r.json()["masters"]}


def wait_all_listed(f: Farm) -> None:
    want = {f.rw.url: "read-write", **{m.url: "read-only" for m in f.ro}}
    for m in (f.rw, *f.ro):
        wait_for(lambda m=m: directory(m.url) == want, 20, f"{m.name} lists all", f.logs)


def job(n: int = 1, command: str = "true") -> JobSubmit:
    return JobSubmit(
        name="ro-test",
        stages=[StageSpec(name="s", tasks=[TaskSpec(command=command) for _ in range(n)])],
    )


def test_directory_lists_read_only_masters_and_writes_land_through_no_service(farm: Farm) -> None:
    ro1, ro2 = farm.ro
    # A raw write to a read-only master: 421 naming the read-write master only.
    r = httpx.post(f"{ro1.url}/api/v1/jobs", json=job().model_dump(mode="json"), timeout=5)
    assert r.status_code == 421, r.text
    body = r.json()
    assert body["error"] == "no_service" and "read-only" in body["message"]
    assert body["alternates"] == [farm.rw.url]
    # With priority too: it cannot serve it at all.
    r = httpx.post(
        f"{ro1.url}/api/v1/jobs",
        json=job().model_dump(mode="json"),
        headers={"Herder-Priority": "1"},
        timeout=5,
    )
    assert r.status_code == 421

    # The real client, knowing only a read-only master: the write lands on the primary.
    with HerderClient(masters=[ro1.url], timeout=10) as client:
        view = client.submit_job(job(2))
        assert client.preferred == farm.rw.url
    with HerderClient(masters=[farm.rw.url], timeout=10) as client:
        assert client.get_job(view.id).name == "ro-test"
    # Reads are served by the read-only master from its replica.
    farm.replay()
    r = httpx.get(f"{ro2.url}/api/v1/jobs/{view.id}", timeout=5)
    assert r.status_code == 200 and r.json()["id"] == view.id
    # Not there (yet) on a replica: no-service to the read-write master, whose 404 is final.
    r = httpx.get(f"{ro2.url}/api/v1/jobs/999999", timeout=5)
    assert r.status_code == 421 and r.json()["alternates"] == [farm.rw.url]
    with HerderClient(masters=[ro2.url], timeout=10) as client:
        with pytest.raises(Exception) as info:
            client.get_job(999999)
        assert getattr(info.value, "status", None) == 404
    # Nothing was written on the standby by the read-only masters (it would refuse).
    for m in farm.ro:
        assert "event=master_start_failed" not in m.log()
        assert "read-only transaction" not in m.log()


@pytest.fixture
def busy_farm(replicated: Replicated, tmp_path: Path) -> Iterator[Farm]:
    flags = ("--admission-workers", "1", "--admission-depth", "1", "--write-wait-s", "60")
    with running_farm(replicated, tmp_path, *flags) as f:
        yield f


def test_a_busy_read_write_master_sends_readers_to_read_only_masters(busy_farm: Farm) -> None:
    f = busy_farm
    with HerderClient(masters=[f.rw.url], timeout=30) as client:
        view = client.submit_job(job(1))
    f.replay()

    # The slow requests in the way: two writes on a job whose row the test holds
    # locked on the primary; the first holds the one worker, the second waits.
    lock = psycopg.connect(pg_dsn_of(f.primary_url))
    lock.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (view.id,))
    slow: list[httpx.Response] = []

    def slow_write(path: str) -> None:
        slow.append(httpx.post(f"{f.rw.url}/api/v1/jobs/{view.id}/{path}", timeout=60))

    writers = [threading.Thread(target=slow_write, args=(p,)) for p in ("pause", "cancel")]
    try:
        for w in writers:
            w.start()
            time.sleep(0.3)
        wait_for(lambda: admission(f.rw.url) == (1, 1), 10, "one served, one waiting", f.logs)
        # Read-only masters stay listed: their rows relayed through it bypass the queue.
        # (A heartbeat timeout is 3 intervals: rows not renewed would be gone, and
        # stay gone. Rows renewed but a beat late, relayed and then replayed, may
        # drop out for an instant: waited for, not read once.)
        time.sleep(5 * HEARTBEAT_S)
        wait_for(lambda: len(directory(f.ro[0].url)) == 3, 5, "all three listed", f.logs)

        # A reader without priority: busy, with the read-only masters as alternates.
        r = httpx.get(f"{f.rw.url}/api/v1/jobs/{view.id}", timeout=5)
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["error"] == "busy"
        assert sorted(body["alternates"]) == sorted(m.url for m in f.ro)
        assert body["queued"]["requests"] == 2
        assert int(r.headers["retry-after"]) >= 1
        # A write without priority: busy too, but no read-only master is an alternate.
        r = httpx.post(f"{f.rw.url}/api/v1/jobs", json=job().model_dump(mode="json"), timeout=5)
        assert r.status_code == 503 and r.json()["alternates"] == []

        # The real client is sent to a read-only master and served there.
        with HerderClient(masters=[f.rw.url], timeout=30) as client:
            assert client.get_job(view.id).id == view.id
            assert client.preferred in {m.url for m in f.ro}

        # A priority request is queued, not deferred, and served once the way is free.
        answers: list[httpx.Response] = []
        prio = threading.Thread(
            target=lambda: answers.append(
                httpx.get(
                    f"{f.rw.url}/api/v1/jobs/{view.id}",
                    headers={"Herder-Priority": "1"},
                    timeout=60,
                )
            )
        )
        prio.start()
        wait_for(lambda: admission(f.rw.url) == (1, 2), 10, "priority request queued", f.logs)
        time.sleep(0.5)
        assert not answers  # waiting its turn
    finally:
        lock.rollback()
        lock.close()
    prio.join(30)
    for w in writers:
        w.join(30)
    assert [a.status_code for a in answers] == [200]
    assert sorted(r.status_code for r in slow) == [200, 200]

    # A read-only master stopped leaves the directory at once (its "stopped" row).
    ro1, ro2 = f.ro
    ro2.stop()
    wait_for(lambda: ro2.url not in directory(f.rw.url), 10, "stopped ro2 leaves", f.logs)
    f.replay()
    assert ro2.url not in directory(ro1.url)


def pg_dsn_of(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def admission(url: str) -> tuple[int, int]:
    """(active, waiting) of a master's admission queue, from its /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("herder_admission_")
    }
    return int(values["herder_admission_active"]), int(values["herder_admission_waiting"])


def test_downloads_are_handed_to_read_only_masters(farm: Farm) -> None:
    data = b"herder blob " * 10_000
    digest = hashlib.sha256(data).hexdigest()
    r = httpx.put(f"{farm.rw.url}/api/v1/blobs/{digest}", content=data, timeout=10)
    assert r.status_code == 201, r.text
    # The read-write master answers a continuation: the same read, with handoff=0,
    # at the read-only masters (permuted), itself last.
    r = httpx.get(f"{farm.rw.url}/api/v1/blobs/{digest}", timeout=10)
    assert r.status_code == 200 and r.headers["herder-continuation"] == "1"
    body = r.json()
    assert body["continuation"]["method"] == "GET"
    assert body["continuation"]["path"] == f"/api/v1/blobs/{digest}"
    assert body["continuation"]["params"] == {"handoff": "0"}
    assert sorted(body["alternates"][:2]) == sorted(m.url for m in farm.ro)
    assert body["alternates"][2] == farm.rw.url
    r = httpx.get(f"{farm.rw.url}/api/v1/blobs/{digest}?handoff=0", timeout=10)
    assert r.status_code == 200 and r.content == data

    # The client follows it; a replica that is behind sends it back to the primary.
    with HerderClient(masters=[farm.rw.url], timeout=10) as client:
        assert client.get_blob(digest) == data
    farm.replay()
    with HerderClient(masters=[farm.rw.url], timeout=10) as client:
        assert client.get_blob(digest) == data
        assert client.preferred in {m.url for m in farm.ro}


def test_an_agent_works_through_read_only_masters(farm: Farm, tmp_path: Path) -> None:
    ro1, ro2 = farm.ro
    # The agent knows only a read-only master: register, claims, completions all
    # land on the read-write master through no-service deferrals.
    agents = LocalFarm(port=ro1.port, workdir=tmp_path / "agent", log_level="info")
    try:
        agents.start_agent(slots=2)
        with HerderClient(masters=[ro2.url], timeout=10) as client:
            view = client.submit_job(job(4, "echo hello | tee out.txt"))
            final = wait_for(
                lambda: (j := client.get_job(view.id)).state in ("succeeded", "failed") and j,
                60,
                "job finished",
                lambda: farm.logs() + agents.agents[0].log_text()[-3000:],
            )
            assert final.state == "succeeded", final
            task = client.get_task(final.stages[0].tasks[0].id)
            outputs = task.attempts[-1].outputs if task.attempts else []
            assert outputs, task
            farm.replay()
            blob = client.get_blob(outputs[0].digest)
            assert blob == b"hello\n"
            # Outputs and logs through the read-write master: the manifest from it,
            # the bytes handed to a read-only master (continuations).
        with HerderClient(masters=[farm.rw.url], timeout=10) as client:
            assert client.get_task(task.id).attempts[-1].outputs == outputs
            assert client.preferred == farm.rw.url
            assert client.get_blob(outputs[0].digest) == b"hello\n"
            assert client.preferred in {m.url for m in farm.ro}
        with HerderClient(masters=[farm.rw.url], timeout=10) as client:
            assert client.read_full_log(task.attempts[-1].id) == "hello\n"
            assert client.preferred in {m.url for m in farm.ro}

        # `herder run` against a read-only master: uploads, submission (no-service
        # to the read-write master), follow, outputs back into the directory.
        build = tmp_path / "build"
        build.mkdir()
        (build / "a.txt").write_text("abc\n")
        (build / "Rakefile").write_text(
            "count:\n\tremote-wc -c a.txt > n.txt\n\t\trequires a.txt\nshow:\n\tcat n.txt\n"
        )
        proc = subprocess.run(
            [sys.executable, "-m", "herder", "run", "--plain", "--master", ro1.url],
            cwd=build,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (build / "n.txt").read_text().split()[0] == "4"
    finally:
        agents.close()


def test_read_only_store_refuses_a_database_it_cannot_serve_and_never_writes(
    replicated: Replicated, tmp_path: Path
) -> None:
    from herder.master.readonly import ReadOnlyStoreError, open_read_only_store
    from herder.store import Store
    from herder.store.common import MasterStatus

    empty = pg.create_database(replicated.primary.dsn)
    try:
        # A database without herder's schema (never migrated): refused, one clear line.
        with pytest.raises(ReadOnlyStoreError, match="revision none"):
            open_read_only_store(empty)
        m = MasterProc(empty, tmp_path, "ro-empty", "--read-only")
        m.proc.start()
        assert m.proc.wait(60) == 1
        assert "schema revision none" in m.log() and "Traceback" not in m.log()
        # Migrated, opened read-only on the primary itself: its sessions refuse writes.
        Store.open(empty, migrate=True).close()
        store = open_read_only_store(empty)
        try:
            with pytest.raises(Exception, match="read-only transaction"):
                store.master_heartbeat(MasterStatus(id="x", url="http://x:1"))
            assert store.list_masters() == []
        finally:
            store.close()
    finally:
        pg.drop_database(replicated.primary.dsn, empty)
