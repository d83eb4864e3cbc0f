"""The Store contract (docs/architecture.md), run against SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from herder.api_models import (
    INLINE_REQUIRE_MAX,
    AgentRegister,
    Completion,
    Heartbeat,
    LogChunk,
    Offer,
    OutputFile,
    RunningAttempt,
    TaskSpec,
    decode_inline,
    encode_inline,
)
from herder.errors import DigestMismatch, NotFound, StaleAttempt
from herder.store import Store
from storekit import fail, job, make_store, ok, tasks


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url, migrate=True)
    try:
        yield s
    finally:
        s.close()


def agent(store: Store, name: str = "a1", **kw: Any) -> str:
    kw.setdefault("slots", 4)
    view, _ = store.register_agent(AgentRegister(name=name, hostname="host", **kw))
    return view.id


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- basics


def test_open_dialect_and_clock(store: Store, db_url: str) -> None:
    assert store.dialect == ("sqlite" if db_url.startswith("sqlite") else "postgresql")
    now = store.db_now()
    assert now.tzinfo is not None and now.utcoffset() is not None
    assert now.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs(time.time() - now.timestamp()) < 5


def test_submit_get_list(store: Store) -> None:
    view, created = store.submit_job(
        job(
            [TaskSpec(command="a", tags=["linux"], env={"X": "1"}), TaskSpec(command=["b", "c"])],
            [TaskSpec(command="d", timeout_s=5, max_attempts=3)],
            name="build",
            owner="ann",
            priority=7,
        )
    )
    assert created
    assert view.href == f"/api/v1/jobs/{view.id}"
    assert (view.name, view.owner, view.priority, view.state) == ("build", "ann", 7, "queued")
    assert view.created_at.tzinfo is not None
    assert [s.state for s in view.stages] == ["queued", "blocked"]
    assert view.counts == {"queued": 2, "blocked": 1}
    t0, t1 = view.stages[0].tasks
    assert t0.command == "a" and t0.tags == ["linux"] and t0.env == {"X": "1"}
    assert t1.command == ["b", "c"]
    t2 = view.stages[1].tasks[0]
    assert (t2.state, t2.timeout_s, t2.max_attempts, t2.stage) == ("blocked", 5, 3, 1)
    assert store.get_job(view.id) == view
    assert store.get_task(t0.id).href == f"/api/v1/tasks/{t0.id}"

    other, _ = store.submit_job(job(tasks(1), name="other"))
    listed = store.list_jobs()
    assert [j.id for j in listed] == [other.id, view.id]
    assert listed[1].counts == {"queued": 2, "blocked": 1}
    assert [j.id for j in store.list_jobs(limit=1)] == [other.id]
    assert store.list_jobs(state="failed") == []

    with pytest.raises(NotFound):
        store.get_job(99999)
    with pytest.raises(NotFound):
        store.get_task(99999)


def test_idempotent_submit(store: Store) -> None:
    a, created_a = store.submit_job(job(tasks(2), idempotency_key="k1"))
    b, created_b = store.submit_job(job(tasks(5), idempotency_key="k1"))
    assert created_a and not created_b
    assert a.id == b.id and b.idempotency_key == "k1"
    c, created_c = store.submit_job(job(tasks(1), idempotency_key="k2"))
    assert created_c and c.id != a.id
    assert len(store.list_jobs()) == 2


def test_concurrent_idempotent_submit_yields_one_job(db_url: str) -> None:
    stores = [make_store(db_url) for _ in range(3)]
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def submit(s: Store) -> None:
        try:
            barrier.wait()
            view, _ = s.submit_job(job(tasks(3), idempotency_key="same"))
            results.append(view.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(stores[i % 3],)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in stores:
        s.close()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 6


# ---------------------------------------------------------------- claim


def test_claim_limits_and_priority_order(store: Store) -> None:
    low, _ = store.submit_job(job(tasks(3), priority=0, name="low"))
    high, _ = store.submit_job(job(tasks(2), priority=10, name="high"))
    a = agent(store)
    first = store.claim(a, 3)
    assert len(first.offers) == 3
    assert [o.job_id for o in first.offers] == [high.id, high.id, low.id]
    ids = [o.task_id for o in first.offers]
    assert ids[:2] == sorted(ids[:2])
    o = first.offers[0]
    assert o.href == f"/api/v1/tasks/{o.task_id}"
    assert len(o.token) >= 16 and o.command.startswith("echo")
    assert o.ack_deadline > store.db_now() - (o.ack_deadline - o.ack_deadline)
    rest = store.claim(a, 10)
    assert len(rest.offers) == 2 and {x.job_id for x in rest.offers} == {low.id}
    assert store.claim(a, 10).offers == []
    assert store.claim(a, 0).offers == []
    assert len({x.token for x in first.offers + rest.offers}) == 5
    assert store.get_job(high.id).state == "running"
    assert store.get_task(o.task_id).state == "offered"
    with pytest.raises(NotFound):
        store.claim("nobody", 1)


def test_claim_filters_tags_cpus_and_placement(store: Store) -> None:
    store.submit_job(
        job(
            [
                TaskSpec(command="gpu", tags=["gpu", "linux"]),
                TaskSpec(command="linux", tags=["linux"]),
                TaskSpec(command="big", cpus=16),
                TaskSpec(command="local", placement="local"),
                TaskSpec(command="any"),
            ]
        )
    )
    plain = agent(store, "plain", tags=["linux"], cpus=4)
    got = {o.command for o in store.claim(plain, 10).offers}
    assert got == {"linux", "any"}
    gpu = agent(store, "gpu", tags=["linux", "gpu", "cuda"], cpus=32)
    got = {o.command for o in store.claim(gpu, 10).offers}
    assert got == {"gpu", "big"}  # the local task is never offered to an agent


def test_stage_gating(store: Store) -> None:
    view, _ = store.submit_job(job(tasks(2), tasks(1)))
    a = agent(store)
    o1, o2 = store.claim(a, 10).offers
    assert all(o.task_id in {t.id for t in view.stages[0].tasks} for o in (o1, o2))
    r, woke = store.complete(ok(o1))
    assert r.result == "accepted" and r.task_state == "succeeded" and not woke
    assert store.claim(a, 10).offers == []  # stage 1 still blocked
    out = store.claim(a, 10, completions=[ok(o2)])
    assert out.woke and [x.task_state for x in out.results] == ["succeeded"]
    assert len(out.offers) == 1
    assert out.offers[0].task_id == view.stages[1].tasks[0].id
    store.complete(ok(out.offers[0]))
    done = store.get_job(view.id)
    assert done.state == "succeeded" and done.finished_at is not None
    assert [s.state for s in done.stages] == ["succeeded", "succeeded"]


def test_paused_or_finished_jobs_are_not_offered(store: Store) -> None:
    view, _ = store.submit_job(job(tasks(2)))
    store.cancel_job(view.id)
    a = agent(store)
    assert store.claim(a, 10).offers == []


# ---------------------------------------------------------------- fencing


def test_fenced_completion(store: Store) -> None:
    view, _ = store.submit_job(job(tasks(1, max_attempts=3)))
    a = agent(store, "a")
    b = agent(store, "b")
    (o,) = store.claim(a, 1).offers
    bad = Completion(attempt_id=o.attempt_id, token="0" * 32, outcome="exited", exit_code=0)
    assert store.complete(bad)[0].result == "stale"
    # the wrong agent reports it
    out = store.claim(b, 0, completions=[ok(o)])
    assert out.results[0].result == "stale"
    # unknown attempt
    ghost = Completion(attempt_id=424242, token="x", outcome="exited", exit_code=0)
    assert store.complete(ghost)[0].result == "stale"
    # fail once → requeued; the old attempt is stale from now on
    r, woke = store.complete(fail(o))
    assert (r.result, r.task_state, woke) == ("accepted", "queued", True)
    assert store.complete(ok(o))[0].result == "stale"
    (o2,) = store.claim(b, 1).offers
    assert o2.task_id == o.task_id and o2.attempt_id != o.attempt_id
    assert store.complete(ok(o))[0].result == "stale"
    with pytest.raises(StaleAttempt):
        store.ack(o.attempt_id, o.token)
    with pytest.raises(StaleAttempt):
        store.append_log(o.attempt_id, o.token, [LogChunk(stream="stdout", data="x")])
    r2, _ = store.complete(ok(o2))
    assert r2.result == "accepted" and r2.task_state == "succeeded"
    # double completion: the second is stale
    assert store.complete(ok(o2))[0].result == "stale"
    t = store.get_task(o.task_id)
    assert [x.state for x in t.attempts] == ["failed", "succeeded"]
    assert [x.agent_id for x in t.attempts] == [a, b]
    assert store.get_job(view.id).state == "succeeded"


def test_ack(store: Store) -> None:
    store.submit_job(job(tasks(2)))
    a = agent(store)
    o1, o2 = store.claim(a, 2).offers
    with pytest.raises(StaleAttempt):
        store.ack(o1.attempt_id, "nope")
    store.ack(o1.attempt_id, o1.token)
    store.ack(o1.attempt_id, o1.token)  # idempotent
    t = store.get_task(o1.task_id)
    assert t.state == "running" and t.attempts[0].state == "running"
    assert t.attempts[0].started_at is not None
    store.claim(a, 0, acks=[o2.attempt_id])
    assert store.get_task(o2.task_id).state == "running"


def test_retry_until_max_attempts_then_job_fails(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command="x", max_attempts=2), *tasks(1)], tasks(1)))
    a = agent(store)
    offers = store.claim(a, 10).offers
    assert len(offers) == 2
    flaky = next(o for o in offers if o.command == "x")
    other = next(o for o in offers if o.command != "x")
    store.ack(other.attempt_id, other.token)
    r, _ = store.complete(fail(flaky, 3))
    assert r.task_state == "queued"
    task = store.get_task(flaky.task_id)
    assert (task.failures, task.error, task.exit_code) == (1, "exit status 3", 3)
    (again,) = store.claim(a, 10).offers
    r, _ = store.complete(fail(again, 4))
    assert r.task_state == "failed"
    task = store.get_task(flaky.task_id)
    assert (task.state, task.failures, task.error) == ("failed", 2, "exit status 4")
    done = store.get_job(view.id)
    assert done.state == "failed" and done.finished_at is not None
    assert done.stages[1].tasks[0].state == "cancelled"
    # a failed job stops all its work: its running task was cancelled with it,
    # and that attempt's late completion is stale (nothing changes)
    assert store.get_task(other.task_id).state == "cancelled"
    assert store.get_task(other.task_id).attempts[0].state == "cancelled"
    r, _ = store.complete(ok(other))
    assert r.result == "stale"
    assert store.get_task(other.task_id).state == "cancelled"
    assert store.get_job(view.id).state == "failed"
    assert store.claim(a, 10).offers == []


def test_timeout_outcome(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command="sleep 9", timeout_s=5)]))
    a = agent(store)
    (o,) = store.claim(a, 1).offers
    r, _ = store.complete(
        Completion(attempt_id=o.attempt_id, token=o.token, outcome="timeout", exit_code=None)
    )
    assert r.task_state == "failed"
    t = store.get_task(o.task_id)
    assert t.error == "timed out after 5s" and t.failures == 1
    assert t.attempts[0].state == "failed"
    assert store.get_job(view.id).state == "failed"


def test_release_and_launch_failed_are_infrastructure(db_url: str) -> None:
    store = make_store(db_url, infra_budget=2)
    try:
        view, _ = store.submit_job(job([TaskSpec(command="x", max_attempts=1)]))
        a = agent(store)
        (o,) = store.claim(a, 1).offers
        rel = Completion(attempt_id=o.attempt_id, token=o.token, outcome="released")
        r, woke = store.complete(rel)
        assert (r.task_state, woke) == ("queued", True)
        t = store.get_task(o.task_id)
        assert (t.failures, t.infra_failures) == (0, 0)
        assert t.attempts[0].state == "released"
        (o,) = store.claim(a, 1).offers
        lf = Completion(
            attempt_id=o.attempt_id, token=o.token, outcome="launch_failed", error="no such file"
        )
        assert store.complete(lf)[0].task_state == "queued"
        t = store.get_task(o.task_id)
        assert (t.failures, t.infra_failures) == (0, 1)
        (o,) = store.claim(a, 1).offers
        lf = Completion(attempt_id=o.attempt_id, token=o.token, outcome="launch_failed")
        assert store.complete(lf)[0].task_state == "failed"  # infra budget of 2 spent
        t = store.get_task(o.task_id)
        assert (t.failures, t.infra_failures, t.state) == (0, 2, "failed")
        assert store.get_job(view.id).state == "failed"
    finally:
        store.close()


def test_completion_stores_log_and_outputs(store: Store) -> None:
    store.submit_job(job(tasks(1)))
    a = agent(store)
    (o,) = store.claim(a, 1).offers
    store.append_log(o.attempt_id, o.token, [LogChunk(stream="stdout", data="héllo ")])
    digest = sha(b"out")
    c = ok(
        o,
        outputs=[OutputFile(path="out/a.o", digest=digest, size=3)],
        log=[
            LogChunk(stream="stdout", data="wörld\n"),
            LogChunk(stream="stderr", data="warn\n"),
        ],
    )
    assert store.complete(c)[0].result == "accepted"
    att = store.get_task(o.task_id).attempts[0]
    assert att.outputs[0].path == "out/a.o" and att.outputs[0].digest == digest
    assert att.log_href == f"/api/v1/attempts/{o.attempt_id}/log"
    out = store.read_log(o.attempt_id, "stdout")
    assert (out.data, out.complete, out.next_offset) == ("héllo wörld\n", True, 12)
    assert store.read_log(o.attempt_id, "stderr").data == "warn\n"


# ---------------------------------------------------------------- reaper


def test_reap_unacked_offers(db_url: str) -> None:
    store = make_store(db_url, ack_timeout_s=5, lease_s=30)
    try:
        store.submit_job(job(tasks(2)))
        a = agent(store)
        o1, o2 = store.claim(a, 2).offers
        store.ack(o2.attempt_id, o2.token)
        assert store.reap() == 0
        store.advance_clock(6)
        assert store.reap() == 1
        t1 = store.get_task(o1.task_id)
        assert t1.state == "queued" and t1.infra_failures == 0
        assert t1.attempts[0].state == "lost"
        assert store.get_task(o2.task_id).state == "running"
        assert store.complete(ok(o1))[0].result == "stale"
        (again,) = store.claim(a, 5).offers
        assert again.task_id == o1.task_id
        kinds = [e.kind for e in store.list_events(task_id=o1.task_id)]
        assert "task.offer_expired" in kinds
    finally:
        store.close()


def test_reap_expired_leases(db_url: str) -> None:
    store = make_store(db_url, ack_timeout_s=30, lease_s=5, infra_budget=2)
    try:
        view, _ = store.submit_job(job(tasks(1)))
        a = agent(store)
        (o,) = store.claim(a, 1).offers
        store.ack(o.attempt_id, o.token)
        assert store.reap() == 0
        store.advance_clock(6)
        assert store.reap() == 1
        t = store.get_task(o.task_id)
        assert (t.state, t.infra_failures, t.failures) == ("queued", 1, 0)
        assert store.complete(ok(o))[0].result == "stale"
        (o,) = store.claim(a, 1).offers
        store.ack(o.attempt_id, o.token)
        assert store.reap() == 0
        store.advance_clock(6)
        assert store.reap() == 1
        t = store.get_task(o.task_id)
        assert (t.state, t.infra_failures) == ("failed", 2)
        assert store.get_job(view.id).state == "failed"
        assert store.reap() == 0
        kinds = [e.kind for e in store.list_events(task_id=o.task_id)]
        assert kinds.count("task.lease_expired") == 1 and "task.lease_exhausted" in kinds
    finally:
        store.close()


# ---------------------------------------------------------------- cancel


def test_cancel_job(store: Store) -> None:
    view, _ = store.submit_job(job(tasks(3), tasks(2)))
    a = agent(store)
    o1, o2 = store.claim(a, 2).offers
    store.ack(o1.attempt_id, o1.token)
    done = store.cancel_job(view.id, reason="not needed")
    assert done.state == "cancelled" and done.finished_at is not None
    assert done.counts == {"cancelled": 5}
    assert store.claim(a, 10).offers == []
    hb = store.heartbeat(
        a, Heartbeat(running=[RunningAttempt(attempt_id=o1.attempt_id, token=o1.token)])
    )
    assert hb.cancel == [o1.attempt_id]
    # the agent reports the kill: recorded, task stays cancelled
    c = Completion(attempt_id=o1.attempt_id, token=o1.token, outcome="cancelled")
    r, _ = store.complete(c)
    assert (r.result, r.task_state) == ("accepted", "cancelled")
    # a normal completion of a cancelled task is stale
    assert store.complete(ok(o2))[0].result == "stale"
    assert store.cancel_job(view.id).state == "cancelled"  # idempotent
    events = store.list_events(job_id=view.id)
    assert any(e.kind == "job.cancel" and e.reason == "not needed" for e in events)
    assert sum(e.kind == "task.cancel" for e in events) == 5
    with pytest.raises(NotFound):
        store.cancel_job(12345)


# ---------------------------------------------------------------- heartbeat


def test_heartbeat_renews_and_lists_cancels(db_url: str) -> None:
    store = make_store(db_url, lease_s=10.0, heartbeat_grace_s=2)
    try:
        store.submit_job(job(tasks(3)))
        a = agent(store)
        b = agent(store, "b")
        o1, o2, o3 = store.claim(a, 3).offers
        store.ack(o1.attempt_id, o1.token)
        store.ack(o3.attempt_id, o3.token)
        running = [
            RunningAttempt(attempt_id=o1.attempt_id, token=o1.token),
            RunningAttempt(attempt_id=o2.attempt_id, token=o2.token),  # offered: becomes running
            RunningAttempt(attempt_id=999999, token="zz"),  # unknown: cancel
        ]
        before = store.db_now()
        hb = store.heartbeat(a, Heartbeat(running=running, usage={"ram_used_mb": 100}))  # type: ignore[arg-type]
        assert hb.cancel == [999999]
        assert hb.lease_expires_at is not None and hb.lease_expires_at > before
        assert hb.lease_s == 10.0
        assert store.get_task(o2.task_id).state == "running"
        view = store.get_agent(a)
        assert view.usage is not None and view.usage.ram_used_mb == 100
        assert view.running == 3 and view.last_seen_at is not None
        # another agent listing a's attempt is told to cancel it
        hb_b = store.heartbeat(
            b, Heartbeat(running=[RunningAttempt(attempt_id=o1.attempt_id, token=o1.token)])
        )
        assert hb_b.cancel == [o1.attempt_id]
        # keep renewing o1 and o2 past the lease; o3 is never listed → requeued
        for _ in range(7):
            store.advance_clock(2)
            hb = store.heartbeat(a, Heartbeat(running=running[:2]))
            assert hb.cancel == []
            store.reap()
        assert store.get_task(o1.task_id).state == "running"
        assert store.get_task(o2.task_id).state == "running"
        t3 = store.get_task(o3.task_id)
        assert (t3.state, t3.infra_failures) == ("queued", 1)
        hb = store.heartbeat(
            a, Heartbeat(running=[RunningAttempt(attempt_id=o3.attempt_id, token=o3.token)])
        )
        assert hb.cancel == [o3.attempt_id]
        with pytest.raises(NotFound):
            store.heartbeat("ghost", Heartbeat())
    finally:
        store.close()


def test_register_agent_is_idempotent(store: Store) -> None:
    v1, c1 = store.register_agent(
        AgentRegister(agent_id="host-1", name="n", hostname="h", slots=2, tags=["b", "a"])
    )
    v2, c2 = store.register_agent(
        AgentRegister(agent_id="host-1", name="n2", hostname="h", slots=8)
    )
    assert c1 and not c2
    assert v1.id == v2.id == "host-1" and v2.slots == 8 and v2.name == "n2"
    assert v1.tags == ["a", "b"] and v1.href == "/api/v1/agents/host-1"
    assert v2.state == "online"
    v3, c3 = store.register_agent(AgentRegister(name="x", hostname="h", slots=1))
    assert c3 and v3.id != "host-1"
    assert [x.id for x in store.list_agents()] == sorted(["host-1", v3.id])
    with pytest.raises(NotFound):
        store.get_agent("nope")


def test_draining_agent_gets_no_offers(store: Store) -> None:
    store.submit_job(job(tasks(2)))
    a = agent(store)
    store.heartbeat(a, Heartbeat(draining=True))
    assert store.get_agent(a).state == "draining"
    assert store.claim(a, 2).offers == []
    store.heartbeat(a, Heartbeat())
    assert len(store.claim(a, 2).offers) == 2


# ---------------------------------------------------------------- logs


def test_logs_append_and_read_with_offsets(store: Store) -> None:
    store.submit_job(job(tasks(1)))
    a = agent(store)
    (o,) = store.claim(a, 1).offers
    store.ack(o.attempt_id, o.token)
    store.append_log(
        o.attempt_id,
        o.token,
        [
            LogChunk(stream="stdout", data="abc"),
            LogChunk(stream="stderr", data="E1"),
            LogChunk(stream="stdout", data="déf"),
        ],
    )
    store.append_log(o.attempt_id, o.token, [LogChunk(stream="stdout", data="ghi")])
    full = store.read_log(o.attempt_id, "stdout")
    assert (full.data, full.offset, full.next_offset, full.complete) == ("abcdéfghi", 0, 9, False)
    part = store.read_log(o.attempt_id, "stdout", offset=4, limit=3)
    assert (part.data, part.next_offset) == ("éfg", 7)
    tail = store.read_log(o.attempt_id, "stdout", offset=part.next_offset)
    assert tail.data == "hi" and tail.next_offset == 9
    end = store.read_log(o.attempt_id, "stdout", offset=9)
    assert end.data == "" and end.next_offset == 9
    assert store.read_log(o.attempt_id, "stderr").data == "E1"
    with pytest.raises(StaleAttempt):
        store.append_log(o.attempt_id, "bad", [LogChunk(stream="stdout", data="x")])
    with pytest.raises(NotFound):
        store.read_log(9999, "stdout")


# ---------------------------------------------------------------- blobs


def test_blobs(store: Store) -> None:
    data = b"\x00\x01binary\xff" * 100
    d = sha(data)
    other = sha(b"other")
    assert store.missing_blobs([d, other, d]) == [d, other]
    assert store.put_blob(d, data) == (len(data), True)
    assert store.put_blob(d, data) == (len(data), False)
    assert store.missing_blobs([d, other]) == [other]
    assert store.get_blob(d) == data
    with pytest.raises(DigestMismatch):
        store.put_blob(other, data)
    with pytest.raises(NotFound):
        store.get_blob(other)
    empty = sha(b"")
    assert store.put_blob(empty, b"") == (0, True)
    assert store.get_blob(empty) == b""
    assert store.missing_blobs([]) == []


def test_small_files_travel_inline(store: Store) -> None:
    small, big = b"int f(void) { return 4; }\n", b"x" * (INLINE_REQUIRE_MAX + 1)
    ds, db = sha(small), sha(big)
    store.put_blob(ds, small)
    store.put_blob(db, big)
    req = [{"path": "f.c", "digest": ds}, {"path": "big.h", "digest": db}]
    store.submit_job(job([TaskSpec(command="cc -c f.c", requires=req)]))  # type: ignore[list-item]
    a = agent(store)
    (o,) = store.claim(a, 1).offers
    # the small required file comes with the offer; the big one is fetched
    assert decode_inline(o.inline) == {ds: small}
    # a small output comes with the completion and is stored as if uploaded
    obj = b"\x7fELF object"
    do = sha(obj)
    out = OutputFile(path="f.o", digest=do, size=len(obj), mode=0o644)
    c = ok(o, outputs=[out], blobs={do: encode_inline(obj)})
    res = store.claim(a, 0, completions=[c]).results
    assert [r.result for r in res] == ["accepted"]
    assert store.get_blob(do) == obj


def test_inline_blob_with_wrong_digest_changes_nothing(store: Store) -> None:
    store.submit_job(job(tasks(1)))
    a = agent(store)
    (o,) = store.claim(a, 1).offers
    lie = sha(b"what was claimed")
    out = OutputFile(path="o", digest=lie, size=5, mode=0o644)
    bad = ok(o, outputs=[out], blobs={lie: encode_inline(b"other")})
    before = store.list_events()
    with pytest.raises(DigestMismatch):
        store.claim(a, 1, completions=[bad])
    with pytest.raises(DigestMismatch):
        store.complete(bad)
    assert store.missing_blobs([lie]) == [lie]
    assert store.get_task(o.task_id).state == "offered"
    assert store.list_events() == before


# ---------------------------------------------------------------- events


def test_events_recorded_for_transitions(store: Store) -> None:
    view, _ = store.submit_job(job(tasks(1), tasks(1)))
    a = agent(store)
    (o,) = store.claim(a, 1).offers
    store.ack(o.attempt_id, o.token)
    out = store.claim(a, 1, completions=[ok(o)])
    store.complete(ok(out.offers[0]))
    evs = store.list_events(job_id=view.id)
    assert all(e.at.tzinfo is not None for e in evs)
    ids = [e.id for e in evs]
    assert ids == sorted(ids)
    kinds = [(e.kind, e.from_state, e.to_state) for e in evs]
    assert kinds == [
        ("job.submit", None, "queued"),
        ("task.offer", "queued", "offered"),
        ("job.start", "queued", "running"),
        ("task.ack", "offered", "running"),
        ("task.succeed", "running", "succeeded"),
        ("task.unblock", "blocked", "queued"),
        ("task.offer", "queued", "offered"),
        ("task.succeed", "offered", "succeeded"),
        ("job.succeed", "running", "succeeded"),
    ]
    offer = evs[1]
    assert (offer.task_id, offer.attempt_id, offer.agent_id) == (o.task_id, o.attempt_id, a)
    assert [e.kind for e in store.list_events(task_id=o.task_id)] == [
        "task.offer",
        "task.ack",
        "task.succeed",
    ]
    assert store.list_events(job_id=view.id, after_id=ids[-2]) == evs[-1:]
    assert len(store.list_events(job_id=view.id, limit=2)) == 2


# ---------------------------------------------------------------- concurrency


def test_concurrent_claims_never_share_a_task(db_url: str) -> None:
    n_tasks = 120
    setup = make_store(db_url)
    setup.submit_job(job(tasks(n_tasks), priority=1))
    setup.submit_job(job(tasks(n_tasks)))
    stores = [setup, make_store(db_url)]  # two "masters" on one database
    agents = [agent(setup, f"a{i}") for i in range(6)]
    got: list[tuple[int, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(agents))

    def work(i: int) -> None:
        s = stores[i % 2]
        pending: list[Offer] = []
        try:
            barrier.wait()
            while True:
                out = s.claim(agents[i], 7, completions=[ok(o) for o in pending])
                assert all(r.result == "accepted" for r in out.results)
                pending = out.offers
                with lock:
                    got.extend((o.task_id, o.attempt_id) for o in out.offers)
                if not out.offers:
                    break
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(agents))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors, errors
        task_ids = [t for t, _ in got]
        assert len(task_ids) == len(set(task_ids)) == 2 * n_tasks
        assert all(j.state == "succeeded" for j in setup.list_jobs())
    finally:
        for s in stores:
            s.close()


# ---------------------------------------------------------------- hot path


def test_submit_returns_ids_in_order_and_is_idempotent(store: Store) -> None:
    spec = job(tasks(3), tasks(2, tags=["linux", "gpu"]), idempotency_key="k-submit")
    sub = store.submit(spec)
    assert sub.created and len(sub.task_ids) == 5
    assert sub.task_ids == sorted(sub.task_ids)
    view = store.get_job(sub.id)
    assert [t.id for st in view.stages for t in st.tasks] == sub.task_ids
    assert [t.state for st in view.stages for t in st.tasks] == ["queued"] * 3 + ["blocked"] * 2
    assert view.stages[1].tasks[0].tags == ["gpu", "linux"]
    again = store.submit(spec)
    assert (again.id, again.created, again.task_ids) == (sub.id, False, sub.task_ids)


def test_batch_that_finishes_a_stage_queues_and_offers_the_next(store: Store) -> None:
    """Completions of one claim that finish stage 0 queue stage 1 before the offer."""
    a = agent(store, slots=4)
    j = store.submit(job(tasks(2), tasks(2)))
    first = store.claim(a, 4)
    assert len(first.offers) == 2
    out = store.claim(a, 4, completions=[ok(o) for o in first.offers])
    assert [r.result for r in out.results] == ["accepted", "accepted"]
    assert out.woke
    assert sorted(o.task_id for o in out.offers) == j.task_ids[2:]
    kinds = [(e.kind, e.task_id) for e in store.list_events(job_id=j.id)]
    t0, t1, t2, t3 = j.task_ids
    assert kinds[-6:] == [
        ("task.succeed", t0),
        ("task.succeed", t1),
        ("task.unblock", t2),
        ("task.unblock", t3),
        ("task.offer", t2),
        ("task.offer", t3),
    ]
    done = store.claim(a, 4, completions=[ok(o) for o in out.offers])
    assert [r.result for r in done.results] == ["accepted", "accepted"]
    assert store.get_job(j.id).state == "succeeded"


def test_mixed_batch_keeps_completion_order(store: Store) -> None:
    """Successes and failures in one claim: applied in order, duplicates stale."""
    a = agent(store, slots=4)
    j = store.submit(job(tasks(3, max_attempts=2), tasks(1)))
    offers = store.claim(a, 3).offers
    batch = [ok(offers[0]), fail(offers[1]), ok(offers[2]), ok(offers[0])]
    out = store.claim(a, 0, completions=batch)
    assert [(r.result, r.task_state) for r in out.results] == [
        ("accepted", "succeeded"),
        ("accepted", "queued"),
        ("accepted", "succeeded"),
        ("stale", None),
    ]
    kinds = [(e.kind, e.task_id) for e in store.list_events(job_id=j.id)][-3:]
    assert kinds == [
        ("task.succeed", offers[0].task_id),
        ("task.fail_retry", offers[1].task_id),
        ("task.succeed", offers[2].task_id),
    ]
    assert store.get_job(j.id).stages[1].tasks[0].state == "blocked"
    retry = store.claim(a, 3).offers
    assert [o.task_id for o in retry] == [offers[1].task_id]
    nxt = store.claim(a, 3, completions=[ok(retry[0])])
    assert [o.task_id for o in nxt.offers] == j.task_ids[3:]


def test_autonomous_heartbeat_requeues_its_offers_past_the_ack_deadline(db_url: str) -> None:
    s = Store.open(db_url, migrate=True, ack_timeout_s=5)
    try:
        a = agent(s)
        j = s.submit(job(tasks(1)))
        (o,) = s.claim(a, 1).offers
        s.heartbeat(a, Heartbeat(running=[], mode="autonomous"))
        assert s.get_task(o.task_id).state == "offered"  # not yet past its deadline
        s.advance_clock(6)
        s.heartbeat(a, Heartbeat(running=[], mode="master"))
        assert s.get_task(o.task_id).state == "offered"  # a master's reaper does it
        s.heartbeat(a, Heartbeat(running=[], mode="autonomous"))
        assert s.get_task(o.task_id).state == "queued"
        assert [e.kind for e in s.list_events(job_id=j.id)][-1] == "task.offer_expired"
    finally:
        s.close()
