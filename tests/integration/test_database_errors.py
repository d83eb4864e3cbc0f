"""Database failures through the store and the master's API, on real databases.

* SQLite locked beyond its busy timeout: the store raises ``DatabaseBusy``
  (not minutes of retries), changes nothing, and the master answers a busy
  deferral (503, ``Retry-After``);
* a PostgreSQL backend killed under the store's pooled connections: the next
  transaction reconnects by itself (the pool is invalidated, the statement
  retried);
* a connection lost while COMMIT is sent: ``CommitOutcomeUnknown``, never
  retried blindly; the completion the agent then sends again is fenced
  (accepted once, stale after);
* a master whose database refuses connections: every request that needs it
  gets a 503 busy deferral with ``Retry-After``, ``/healthz`` says the
  database is down, one log line for the whole outage.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from herder.api_models import AgentRegister
from herder.errors import CommitOutcomeUnknown, DatabaseBusy
from herder.master.app import MasterConfig, create_app
from herder.master.context import ApiContext
from herder.master.metrics import MasterStats
from herder.master.service import MasterService
from herder.store import Store
from herder.store import engine as store_engine
from storekit import job, ok, tasks
from waiting import wait_for

postgres_only = pytest.mark.parametrize(
    "db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)


def counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {
            t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
            for t in ("jobs", "tasks", "events")
        }


def agent(store: Store) -> str:
    view, _ = store.register_agent(AgentRegister(name="a", hostname="h", slots=4))
    return view.id


@pytest.fixture
def locked_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """A SQLite store with a 200 ms busy timeout whose file another process-like
    connection holds the write lock of."""
    monkeypatch.setattr(store_engine, "SQLITE_BUSY_TIMEOUT_MS", 200)
    store = Store.open(f"sqlite:///{tmp_path / 'h.db'}", migrate=True)
    holder = sqlite3.connect(tmp_path / "h.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield store
    finally:
        holder.close()
        store.close()


def test_sqlite_locked_beyond_busy_timeout_is_busy(locked_sqlite: Store) -> None:
    store = locked_sqlite
    t0 = time.monotonic()
    with pytest.raises(DatabaseBusy) as info:
        store.submit_job(job(tasks(2)))
    assert time.monotonic() - t0 < 5, "retried far beyond the busy timeout"
    assert "database is locked" in info.value.message and info.value.status == 503
    assert counts(store) == {"jobs": 0, "tasks": 0, "events": 0}


def test_master_answers_locked_sqlite_with_a_busy_deferral(locked_sqlite: Store) -> None:
    client = TestClient(create_app(locked_sqlite), raise_server_exceptions=False)
    r = client.post("/api/v1/jobs", json=job(tasks(1)).model_dump(mode="json"))
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert body["error"] == "busy" and body["message"].startswith("database busy: "), body
    assert counts(locked_sqlite)["jobs"] == 0


def backend_pids(store: Store, maint: psycopg.Connection[Any]) -> list[int]:
    db = store.url.database
    rows = maint.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (db,)
    ).fetchall()
    return [int(r[0]) for r in rows]


@postgres_only
def test_killed_backends_are_replaced_without_an_error(db_url: str, pg_dsn: str) -> None:
    store = Store.open(db_url, migrate=True)
    try:
        a = agent(store)
        store.submit_job(job(tasks(3)))
        assert len(store.claim(a, 1).offers) == 1  # a pooled connection now exists
        with psycopg.connect(pg_dsn, autocommit=True) as maint:
            pids = backend_pids(store, maint)
            assert pids
            for pid in pids:
                maint.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # Both a write and a read find a dead pooled connection first, and go on.
        assert len(store.claim(a, 1).offers) == 1
        assert store.get_job(1).state == "running"
    finally:
        store.close()


@postgres_only
def test_connection_lost_at_commit_is_an_unknown_outcome_and_fencing_holds(
    db_url: str, pg_dsn: str
) -> None:
    store = Store.open(db_url, migrate=True)
    try:
        a = agent(store)
        store.submit_job(job(tasks(1)))
        (offer,) = store.claim(a, 1).offers
        store.ack(offer.attempt_id, offer.token)
        kills: list[int] = []

        def kill_before_commit(conn: sa.Connection) -> None:
            if kills:
                return
            pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
            with psycopg.connect(pg_dsn, autocommit=True) as maint:
                maint.execute("SELECT pg_terminate_backend(%s)", (pid,))
            kills.append(pid)

        sa.event.listen(store.engine, "commit", kill_before_commit)
        with pytest.raises(CommitOutcomeUnknown) as info:
            store.complete(ok(offer))
        sa.event.remove(store.engine, "commit", kill_before_commit)
        assert len(kills) == 1, "the transaction was retried after an unknown commit"
        assert info.value.status == 504 and "may or may not" in info.value.message
        # Here the server never saw the COMMIT: nothing changed ...
        assert store.get_task(offer.task_id).state == "running"
        # ... and the agent's retry is accepted once; any further repeat is fenced.
        r, _ = store.complete(ok(offer))
        assert (r.result, r.task_state) == ("accepted", "succeeded")
        assert store.complete(ok(offer))[0].result == "stale"
        events = store.list_events(task_id=offer.task_id, limit=100)
        assert [e.kind for e in events].count("task.succeed") == 1
    finally:
        store.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_master_without_its_database_defers_every_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store.open(f"postgresql://nobody@127.0.0.1:{closed_port()}/none", migrate=False)
    try:
        client = TestClient(
            create_app(store, MasterConfig(url="http://m:1")), raise_server_exceptions=False
        )
        with caplog.at_level(logging.INFO, logger="herder.master"):
            answers = [
                client.get("/api/v1/jobs"),
                client.post("/api/v1/jobs", json=job(tasks(1)).model_dump(mode="json")),
                client.post(
                    "/api/v1/agents",
                    json={"name": "a", "hostname": "h", "slots": 1},
                ),
                client.get("/api/v1/masters"),
            ]
            health = client.get("/healthz")
        for r in answers:
            assert r.status_code == 503, (r.request.url, r.status_code, r.text)
            assert int(r.headers["retry-after"]) >= 1
            body = r.json()
            assert body["error"] == "busy"
            assert body["message"].startswith("database unavailable: "), body
            assert "Traceback" not in r.text
        assert health.status_code == 503 and health.json()["database"] == "down"
        lost = [r for r in caplog.records if "event=database_lost" in r.getMessage()]
        assert len(lost) == 1, [r.getMessage() for r in caplog.records]
        assert not [r for r in caplog.records if r.exc_info]
        metrics = client.get("/metrics").text
        assert "herder_database_up 0" in metrics
    finally:
        store.close()


def guarded_ctx(store: Store, timeout_s: float) -> ApiContext:
    return ApiContext(
        MasterService(store), MasterStats(), MasterConfig(db_timeout_s=timeout_s), None
    )


def test_a_call_answered_busy_never_commits_afterwards(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'h.db'}", migrate=True)
    release = threading.Event()
    ended: list[object] = []

    def slow_submit() -> Any:
        release.wait(10)  # stuck before its transaction, as behind a hung connection
        try:
            view, _ = store.submit_job(job(tasks(1)))
        except Exception as exc:
            ended.append(exc)
            raise
        ended.append(view)
        return view

    async def main() -> None:
        ctx = guarded_ctx(store, 0.3)
        with pytest.raises(DatabaseBusy, match=r"no answer within 0\.3 s"):
            await ctx.call(slow_submit)
        release.set()

    try:
        asyncio.run(main())
        # The abandoned call goes on in its thread, and rolls back instead of committing.
        wait_for(lambda: ended, 10, "the abandoned call to end")
        assert isinstance(ended[0], DatabaseBusy), ended
        assert counts(store) == {"jobs": 0, "tasks": 0, "events": 0}
    finally:
        store.close()


def test_a_call_that_committed_is_waited_for_not_deferred(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'h.db'}", migrate=True)
    timeout = 1.0
    release = threading.Event()

    def submit_then_hang_until(deadline: float | None) -> Any:
        view, _ = store.submit_job(job(tasks(1)))
        # Committed; the rest of the call is slow: until just past the
        # timeout, or until the test lets it go (past twice the timeout).
        if deadline is None:
            release.wait(30)
        else:
            time.sleep(max(0.0, deadline - time.monotonic()))
        return view.id

    async def main() -> None:
        ctx = guarded_ctx(store, timeout)
        # Past the timeout, but committed: the caller gets the real answer ...
        deadline = time.monotonic() + timeout + 0.2
        assert await ctx.call(submit_then_hang_until, deadline) == 1
        assert time.monotonic() > deadline
        # ... or, past twice the timeout, an unknown outcome, never "busy".
        try:
            with pytest.raises(CommitOutcomeUnknown):
                await ctx.call(submit_then_hang_until, None)
        finally:
            release.set()

    try:
        asyncio.run(main())
        assert counts(store)["jobs"] == 2
    finally:
        store.close()


def test_master_started_without_its_database_exits_with_a_clear_message() -> None:
    from herder.master.server import serve

    with pytest.raises(SystemExit) as info:
        serve(f"postgresql://nobody@127.0.0.1:{closed_port()}/none", port=closed_port())
    assert str(info.value.code).startswith("herder master: database unavailable: ")
    assert "refused" in str(info.value.code)
