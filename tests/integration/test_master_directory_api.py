"""The master directory API in process (SQLite and PostgreSQL): two master apps
on one database, heartbeats, failure reports, validation, agent mode."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from herder.api_models import AgentRegister, Heartbeat, MasterFailureReport
from herder.master.app import MasterConfig, create_app
from herder.store import Store
from waiting import wait_for

INTERVAL = 0.2
# Far above the interval: a listed master must not drop out because its
# heartbeat thread stalled (GIL, GC, a loaded machine) for three intervals.
TIMEOUT = 5.0


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    try:
        yield s
    finally:
        s.close()


def _master(store: Store, host: str, port: int = 7100, **kw: object) -> TestClient:
    kw.setdefault("heartbeat_timeout_s", TIMEOUT)
    cfg = MasterConfig(
        master_id=f"testhost:{host}:{port}",
        url=f"http://{host}:{port}",
        heartbeat_interval_s=INTERVAL,
        **kw,  # type: ignore[arg-type]
    )
    return TestClient(create_app(store, cfg), raise_server_exceptions=False)


def report(**over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "time": "2025-01-01T12:00:00Z",
        "reporter": "agent@box",
        "request": "POST /api/v1/agents/a1/claim",
        "kind": "unreachable",
        "url": "http://127.0.0.3:7100",
    }
    body.update(over)
    return body


def ids(client: TestClient, *, all_: bool = False) -> list[str]:
    r = client.get("/api/v1/masters", params={"all": "true"} if all_ else None)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["masters"]]


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


A = "testhost:127.0.0.2:7100"
B = "testhost:127.0.0.3:7100"


def test_two_masters_listed_failure_hides_until_next_heartbeat(store: Store) -> None:
    with _master(store, "127.0.0.2") as a, _master(store, "127.0.0.3") as b:
        # Both registered in their start-up, before serving.
        assert ids(a) == [A, B] == ids(b)
        body = a.get("/api/v1/masters").json()["masters"]
        by_id = {m["id"]: m for m in body}
        assert by_id[A]["url"] == "http://127.0.0.2:7100"
        assert by_id[B]["url"] == "http://127.0.0.3:7100"
        for m in body:
            assert m["state"] == "up" and m["role"] == "read-write" and m["failures"] == 0
            assert m["href"] == f"/api/v1/masters/{m['id']}"
            assert m["failures_href"] == m["href"] + "/failures"
            assert m["heartbeat_timeout_s"] == pytest.approx(TIMEOUT)
            assert m["started_at"].endswith("Z") and m["last_heartbeat_at"].endswith("Z")

        # Report B's failure by host:port (the client does not know its id) to A:
        # hidden at once, until B's next heartbeat (every INTERVAL).
        r = a.post("/api/v1/masters/127.0.0.3:7100/failures", json=report())
        assert r.status_code == 201, r.text
        f = r.json()
        assert f["master_id"] == B and f["kind"] == "unreachable"
        assert f["time"] == "2025-01-01T12:00:00Z" and f["received_at"].endswith("Z")
        # Race-free check: the failure is recorded after (or in the tick of) the
        # last heartbeat, so B is hidden unless a heartbeat has landed since.
        view = a.get(f"/api/v1/masters/{B}").json()
        assert view["failures"] == 1 and view["last_failure_at"] is not None
        if _dt(view["last_heartbeat_at"]) <= _dt(view["last_failure_at"]):
            assert view["state"] == "failed" and view["down_reason"] == "failure_reported"
            assert B not in ids(a)
        wait_for(
            lambda: B in ids(a), 10, "B listed again", poll_s=0.02
        )  # heartbeated again → visible
        assert a.get(f"/api/v1/masters/{B}").json()["state"] == "up"

        # ?all=true lists every master with its failure info.
        everyone = {m["id"]: m for m in a.get("/api/v1/masters?all=true").json()["masters"]}
        assert everyone[B]["failures"] == 1 and everyone[A]["failures"] == 0

        # By id, by URL: both count; listing is newest first.
        assert a.post(f"/api/v1/masters/{B}/failures", json=report(kind="busy")).status_code == 201
        assert (
            b.post(
                "/api/v1/masters/http%3A%2F%2F127.0.0.3%3A7100/failures",
                json=report(kind="timeout"),
            ).status_code
            == 201
        )
        listed = a.get(f"/api/v1/masters/{B}/failures").json()["failures"]
        assert [x["kind"] for x in listed] == ["timeout", "busy", "unreachable"]
        assert (
            a.get("/api/v1/masters/127.0.0.3:7100/failures?limit=1").json()["failures"][0]["kind"]
            == "timeout"
        )
        assert a.get(f"/api/v1/masters/{B}").json()["failures"] == 3
        assert a.get(f"/api/v1/masters/{A}/failures").json() == {"failures": []}

        # /metrics carries the master's identity.
        text = b.get("/metrics").text
        assert f'herder_master_info{{id="{B}",url="http://127.0.0.3:7100"}} 1' in text

    # Both shut down gracefully: stopped, not listed, still in ?all=true.
    views = {m.id: m for m in store.list_masters(include_all=True)}
    assert {views[A].state, views[B].state} == {"stopped"}
    assert views[B].failures == 3
    assert store.list_masters() == []


def test_unknown_master_is_404_distinct_from_a_missing_route(store: Store) -> None:
    with _master(store, "127.0.0.2") as a:
        for path in (
            "/api/v1/masters/nosuch:1/failures",
            "/api/v1/masters/http%3A%2F%2F10.9.9.9%3A1/failures",
        ):
            r = a.post(path, json=report())
            assert r.status_code == 404
            err = r.json()
            assert err["error"] == "not_found"
            assert "in the directory" in err["message"] and err["message"] != "Not Found"
        r = a.get("/api/v1/masters/nosuch:1")
        assert r.status_code == 404 and "no master nosuch:1 in the directory" in r.json()["message"]
        assert a.get("/api/v1/masters/nosuch:1/failures").status_code == 404
        # The framework's own 404 (no such route) still says "Not Found".
        assert a.get("/api/v1/nosuchroute").json()["message"] == "Not Found"
    assert store.list_masters(include_all=True)[0].failures == 0


@pytest.mark.parametrize(
    "body",
    [
        report(extra="field"),
        report(time="not a time"),
        report(reporter=""),
        report(kind=""),
        report(kind="BAD KIND"),
        report(request="x" * 501),
        {k: v for k, v in report().items() if k != "reporter"},
        {k: v for k, v in report().items() if k != "kind"},
        {k: v for k, v in report().items() if k != "time"},
        {},
        [],
    ],
)
def test_bad_failure_bodies_are_422_and_write_nothing(store: Store, body: object) -> None:
    with _master(store, "127.0.0.2") as a:
        r = a.post(f"/api/v1/masters/{A}/failures", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "invalid_request"
        r = a.post(
            f"/api/v1/masters/{A}/failures",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"] == "malformed_json"
        assert a.get(f"/api/v1/masters/{A}/failures").json() == {"failures": []}
        assert a.get(f"/api/v1/masters/{A}").json()["failures"] == 0
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM master_failures")).scalar_one() == 0


def test_heartbeat_timeout_drops_a_master(store: Store) -> None:
    from herder.store.store import MasterStatus

    # A master that heartbeated once (as a SIGKILLed one would have) with a short
    # timeout, still long enough for the checks right after a heartbeat.
    store.master_heartbeat(
        MasterStatus(id="gone:127.0.0.5:1", url="http://127.0.0.5:1", heartbeat_timeout_s=2.0),
        starting=True,
    )
    assert [m.id for m in store.list_masters()] == ["gone:127.0.0.5:1"]
    wait_for(lambda: store.list_masters() == [], 10, "directory emptied", poll_s=0.02)
    view = store.get_master("127.0.0.5:1")
    assert view.state == "failed" and view.down_reason == "heartbeat_timeout"
    # It comes back with a heartbeat; a restart resets started_at.
    store.master_heartbeat(
        MasterStatus(id="gone:127.0.0.5:1", url="http://127.0.0.5:1", heartbeat_timeout_s=2.0),
        starting=True,
    )
    again = store.get_master("gone:127.0.0.5:1")
    assert again.state == "up" and again.started_at > view.started_at
    # A failure report for a stopped master is recorded; it stays stopped.
    store.master_stopped(MasterStatus(id="gone:127.0.0.5:1", url="http://127.0.0.5:1"))
    store.report_master_failure(
        "http://127.0.0.5:1/",
        MasterFailureReport.model_validate(report(url="http://127.0.0.5:1")),
    )
    stopped = store.get_master("gone:127.0.0.5:1")
    assert stopped.state == "stopped" and stopped.failures == 1


def test_stats_in_the_directory(store: Store) -> None:
    with _master(store, "127.0.0.2") as a:
        for _ in range(5):
            assert a.get("/api/v1/health").status_code == 200

        def counted() -> bool:
            return a.get(f"/api/v1/masters/{A}").json()["requests"] >= 5

        wait_for(counted, 10, "requests counted", poll_s=0.02)
        m = a.get(f"/api/v1/masters/{A}").json()
        assert m["avg_request_ms"] > 0 and m["unhandled_exceptions"] == 0
        assert m["in_flight"] >= 0 and m["version"]


def test_agent_mode_and_talkback_url_in_the_agent_view(store: Store) -> None:
    with ExitStack() as stack:
        a = stack.enter_context(_master(store, "127.0.0.2"))
        reg = AgentRegister(
            agent_id="ag1", name="ag1", hostname="h", slots=1, talkback_url="http://127.0.0.1:7999"
        )
        r = a.post("/api/v1/agents", json=reg.model_dump(mode="json", exclude_none=True))
        assert r.status_code == 201
        assert r.json()["mode"] == "master"
        assert r.json()["talkback_url"] == "http://127.0.0.1:7999"
        hb = Heartbeat(mode="autonomous").model_dump(mode="json")
        assert a.post("/api/v1/agents/ag1/heartbeat", json=hb).status_code == 200
        assert a.get("/api/v1/agents/ag1").json()["mode"] == "autonomous"
        assert [x["mode"] for x in a.get("/api/v1/agents").json()["agents"]] == ["autonomous"]
        # Re-registering without a mode keeps it; a master-mode heartbeat resets it.
        assert (
            a.post("/api/v1/agents", json=reg.model_dump(mode="json", exclude_none=True)).json()[
                "mode"
            ]
            == "autonomous"
        )
        assert a.post("/api/v1/agents/ag1/heartbeat", json={}).status_code == 200
        assert store.get_agent("ag1").mode == "master"
        bad = a.post("/api/v1/agents/ag1/heartbeat", json={"mode": "rogue"})
        assert bad.status_code == 422


def test_failure_hides_until_the_next_heartbeat_store_level(store: Store) -> None:
    """Deterministic (no background heartbeat): report → hidden; heartbeat → visible."""
    from herder.store.store import MasterStatus

    m1 = MasterStatus(id="h:127.0.0.6:1", url="http://127.0.0.6:1", heartbeat_timeout_s=60)
    m2 = MasterStatus(id="h:127.0.0.7:1", url="http://127.0.0.7:1", heartbeat_timeout_s=60)
    store.master_heartbeat(m1, starting=True)
    store.master_heartbeat(m2, starting=True)
    assert [m.id for m in store.list_masters()] == [m1.id, m2.id]
    f = store.report_master_failure("127.0.0.6:1", MasterFailureReport.model_validate(report()))
    assert f.master_id == m1.id
    assert [m.id for m in store.list_masters()] == [m2.id]
    hidden = store.get_master(m1.id)
    assert hidden.state == "failed" and hidden.down_reason == "failure_reported"
    assert hidden.failures == 1
    time.sleep(0.01)  # SQLite's clock ticks in milliseconds
    store.master_heartbeat(m1)
    assert [m.id for m in store.list_masters()] == [m1.id, m2.id]
    back = store.get_master(m1.id)
    assert back.state == "up" and back.failures == 1 and back.started_at == hidden.started_at
    assert [x.kind for x in store.list_master_failures(m1.id)] == ["unreachable"]
