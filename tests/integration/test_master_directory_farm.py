"""The master directory with real master processes.

Two masters on one PostgreSQL database (127.0.0.2 and 127.0.0.3, same port):
both listed with their URLs; a SIGKILLed one drops out after the heartbeat
timeout; a failure reported for the other hides it until its next heartbeat;
the failures are listed; bad bodies are rejected and record nothing. A single
master on SQLite works the same way.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

import pg
from herder.client import HerderClient
from herder.client.discovery import MasterDiscovery, report_failures
from herder.localfarm import LocalFarm
from herder.store import Store
from waiting import port_free_on, timed_wait

HEARTBEAT_S = 0.5  # timeout: 3 intervals = 1.5 s
HOSTS = ["127.0.0.2", "127.0.0.3"]


@pytest.fixture(autouse=True)
def _fast_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERDER_MASTER_HEARTBEAT_S", str(HEARTBEAT_S))


def directory(url: str, all_: bool = False) -> dict[str, dict[str, object]]:
    r = httpx.get(f"{url}/api/v1/masters", params={"all": "true"} if all_ else None, timeout=5)
    assert r.status_code == 200, r.text
    return {str(m["url"]): m for m in r.json()["masters"]}


def _dt(value: object) -> datetime:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@pytest.fixture
def two_masters(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[LocalFarm, LocalFarm, str]]:
    port = port_free_on(HOSTS)
    db_url = pg.create_database(pg_dsn)
    farms = [
        LocalFarm(db_url=db_url, host=h, port=port, workdir=tmp_path / h, log_level="info")
        for h in HOSTS
    ]
    try:
        for farm in farms:  # one after the other: the first one migrates the database
            farm.start_master()
        yield farms[0], farms[1], db_url
    finally:
        for farm in farms:
            farm.close()
        try:
            pg.drop_database(pg_dsn, db_url)
        except Exception:
            pass


@pytest.mark.postgres
def test_two_masters_on_postgres(two_masters: tuple[LocalFarm, LocalFarm, str]) -> None:
    a, b, db_url = two_masters
    hostname = socket.gethostname()
    # Both masters list both, with the URLs agents use and ids hostname:host:port.
    for farm in (a, b):
        listed = directory(farm.url)
        assert set(listed) == {a.url, b.url}
    for farm in (a, b):
        m = directory(a.url)[farm.url]
        assert m["id"] == f"{hostname}:{farm.host}:{farm.port}"
        assert m["state"] == "up" and m["role"] == "read-write"
        assert m["heartbeat_timeout_s"] == pytest.approx(3 * HEARTBEAT_S)
    a_id = str(directory(a.url)[a.url]["id"])
    b_id = str(directory(a.url)[b.url]["id"])

    # Report a failure of A to B, by A's host:port as a client that does not
    # know the id would: A is hidden until its next heartbeat, then back.
    body = {
        "time": "2025-01-01T12:00:00Z",
        "reporter": "test@box",
        "request": "GET /api/v1/jobs/1",
        "kind": "busy",
        "url": a.url,
    }
    r = httpx.post(f"{b.url}/api/v1/masters/{a.host}:{a.port}/failures", json=body, timeout=5)
    assert r.status_code == 201, r.text
    assert r.json()["master_id"] == a_id
    # Each check is judged within one answer, so a heartbeat landing between
    # two requests cannot make it flaky.
    view = directory(b.url, all_=True)[a.url]
    assert view["failures"] == 1
    if _dt(view["last_heartbeat_at"]) <= _dt(view["last_failure_at"]):
        # No heartbeat since the report (the usual case with a 0.5 s interval).
        assert view["state"] == "failed" and view["down_reason"] == "failure_reported"
    else:
        assert view["state"] == "up"
    up = directory(b.url)
    if a.url in up:
        assert _dt(up[a.url]["last_heartbeat_at"]) > _dt(up[a.url]["last_failure_at"])
    timed_wait(lambda: a.url in directory(b.url), 5, "A listed again after its heartbeat")
    assert directory(b.url)[a.url]["failures"] == 1

    # Bad bodies: 422, nothing recorded.
    for bad in (
        {**body, "extra": 1},
        {**body, "time": "soon"},
        {k: v for k, v in body.items() if k != "reporter"},
        {**body, "kind": ""},
    ):
        r = httpx.post(f"{b.url}/api/v1/masters/{a_id}/failures", json=bad, timeout=5)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
    r = httpx.post(f"{b.url}/api/v1/masters/10.1.1.1:9/failures", json=body, timeout=5)
    assert r.status_code == 404 and "in the directory" in r.json()["message"]
    failures = httpx.get(f"{a.url}/api/v1/masters/{a_id}/failures", timeout=5).json()["failures"]
    assert [(f["kind"], f["reporter"], f["request"]) for f in failures] == [
        ("busy", "test@box", "GET /api/v1/jobs/1")
    ]

    # The metrics name each master.
    text = httpx.get(f"{b.url}/metrics", timeout=5).text
    assert f'herder_master_info{{id="{b_id}",url="{b.url}"}} 1' in text

    # SIGKILL B: it drops out of A's directory after the heartbeat timeout.
    assert b.master is not None
    b.master.kill9()
    took = timed_wait(lambda: b.url not in directory(a.url), 10, "B dropped out")
    assert took < 3 * HEARTBEAT_S + 3.0
    gone = directory(a.url, all_=True)[b.url]
    assert gone["state"] == "failed" and gone["down_reason"] == "heartbeat_timeout"
    assert set(directory(a.url)) == {a.url}

    # A client that finds B dead reports it through the discovery code; the
    # report lands on B's row (by its directory id, learnt from A's directory).
    discovery = MasterDiscovery([b.url, a.url], directory=True)
    try:
        with HerderClient(discovery=discovery, timeout=3) as client:
            assert client.health()["status"] == "ok"
            assert client.preferred == a.url
            rep = report_failures(client, discovery=discovery)
            assert rep.error is None and not rep.unsupported and rep.sent == 1, rep
    finally:
        discovery.close()
    kinds = httpx.get(f"{a.url}/api/v1/masters/{b_id}/failures", timeout=5).json()["failures"]
    assert len(kinds) == 1 and kinds[0]["url"] == b.url

    # A graceful stop marks A stopped at once.
    assert a.master is not None
    a.master.stop()
    store = Store.open(db_url, migrate=False)
    try:
        states = {m.url: m.state for m in store.list_masters(include_all=True)}
        assert states == {a.url: "stopped", b.url: "failed"}
        assert store.list_masters() == []
    finally:
        store.close()


def test_single_master_on_sqlite(tmp_path: Path) -> None:
    with LocalFarm(workdir=tmp_path / "farm") as farm:
        farm.start_master()
        listed = directory(farm.url)
        assert list(listed) == [farm.url]
        m = listed[farm.url]
        assert m["id"] == f"{socket.gethostname()}:{farm.host}:{farm.port}"
        assert m["state"] == "up"
        hb = _dt(m["last_heartbeat_at"])
        timed_wait(
            lambda: _dt(directory(farm.url)[farm.url]["last_heartbeat_at"]) > hb,
            5,
            "a heartbeat",
        )
        r = httpx.get(f"{farm.url}/api/v1/masters/{farm.host}:{farm.port}", timeout=5)
        assert r.status_code == 200 and r.json()["url"] == farm.url
        assert farm.master is not None
        farm.master.stop()
        store = Store.open(str(farm.db_url), migrate=False)
        try:
            assert [x.state for x in store.list_masters(include_all=True)] == ["stopped"]
        finally:
            store.close()


def test_advertise_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalFarm(workdir=tmp_path / "farm") as farm:
        # The CLI rejects a URL that is not http(s)://host.
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "herder",
                "master",
                "--advertise-url",
                "nope",
                "--db",
                str(farm.db_url),
                "--listen",
                f"{farm.host}:{farm.port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode != 0 and "advertise" in (bad.stderr + bad.stdout).lower()
    monkeypatch.setenv("HERDER_ADVERTISE_URL", "https://masters.example/m1/")
    with LocalFarm(workdir=tmp_path / "farm2") as farm:
        farm.start_master()
        listed = directory(farm.url)
        assert list(listed) == ["https://masters.example/m1"]
        text = httpx.get(f"{farm.url}/metrics", timeout=5).text
        assert 'url="https://masters.example/m1"} 1' in text
