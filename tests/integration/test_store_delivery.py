"""Delivery rules in the store (issue 4), on SQLite and PostgreSQL: retry
elsewhere first, blocklist, reconciliation, drain, maintenance lock."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from typing import Any

import sqlalchemy as sa

from herder.api_models import (
    AgentRegister,
    Completion,
    Heartbeat,
    RunningAttempt,
    TaskSpec,
)
from herder.store import Store
from herder.store.schema import agents
from storekit import fail, job, make_store, ok, tasks


def agent(store: Store, name: str, **kw: Any) -> str:
    kw.setdefault("slots", 4)
    view, _ = store.register_agent(AgentRegister(agent_id=name, name=name, hostname="host", **kw))
    return view.id


def age_agent(store: Store, agent_id: str, seconds: float) -> None:
    """Make an agent look unseen for ``seconds`` (as if it died)."""
    now = store.db_now()
    from datetime import timedelta

    with store.engine.begin() as conn:
        conn.execute(
            sa.update(agents)
            .where(agents.c.id == agent_id)
            .values(last_seen_at=(now - timedelta(seconds=seconds)).replace(tzinfo=None))
        )


# --------------------------------------------------------- retry elsewhere


def test_failed_task_is_retried_elsewhere_first(db_url: str) -> None:
    store = make_store(db_url, retry_elsewhere_s=30, offline_after_s=1000)
    try:
        store.submit_job(job([TaskSpec(command="x", max_attempts=5)]))
        a, b = agent(store, "a"), agent(store, "b")
        (o,) = store.claim(a, 1).offers
        assert store.complete(fail(o))[0].task_state == "queued"
        assert store.claim(a, 1).offers == []  # b is live: not back on a yet
        (o2,) = store.claim(b, 1).offers
        assert o2.task_id == o.task_id
        assert store.complete(fail(o2))[0].task_state == "queued"
        # now it failed last on b: a may have it at once
        (o3,) = store.claim(a, 1).offers
        assert store.complete(fail(o3))[0].task_state == "queued"
        # failed on a, b says nothing: after retry_elsewhere_s a gets it back.
        # The store clock is the database's plus the offset, so real time since
        # the failure counts too: 5 s of slack before the deadline, not 1 s.
        assert store.claim(a, 1).offers == []
        store.advance_clock(25)
        assert store.claim(a, 1).offers == []
        store.advance_clock(6)
        (o4,) = store.claim(a, 1).offers
        assert o4.task_id == o.task_id
    finally:
        store.close()


def test_sole_live_agent_gets_its_failed_task_back_at_once(db_url: str) -> None:
    store = make_store(db_url, retry_elsewhere_s=60, lease_s=2)  # offline after 10 s
    try:
        store.submit_job(job([TaskSpec(command="x", max_attempts=3)]))
        a, b = agent(store, "a"), agent(store, "b")
        age_agent(store, b, 30)  # b is gone
        (o,) = store.claim(a, 1).offers
        store.complete(fail(o))
        (again,) = store.claim(a, 1).offers
        assert again.task_id == o.task_id
        # a draining agent does not count as live either
        store.complete(fail(again))
        store.heartbeat(b, Heartbeat(draining=True))
        (third,) = store.claim(a, 1).offers
        assert third.task_id == o.task_id
    finally:
        store.close()


def test_lost_lease_is_retried_elsewhere_and_released_is_not(db_url: str) -> None:
    store = make_store(db_url, lease_s=5, retry_elsewhere_s=60, heartbeat_grace_s=1)
    try:
        store.submit_job(job(tasks(2)))
        a, b = agent(store, "a"), agent(store, "b")
        o1, o2 = store.claim(a, 2).offers
        store.ack(o1.attempt_id, o1.token)
        rel = Completion(attempt_id=o2.attempt_id, token=o2.token, outcome="released")
        store.complete(rel)
        assert store.reap() == 0
        store.advance_clock(6)
        store.heartbeat(b, Heartbeat())  # keep b live
        assert store.reap() == 1
        # o2 released: back to a is fine; o1 lost on a: not on a first
        offers = store.claim(a, 2).offers
        assert [x.task_id for x in offers] == [o2.task_id]
        (x,) = store.claim(b, 2).offers
        assert x.task_id == o1.task_id
        t1 = store.get_task(o1.task_id)
        assert (t1.failures, t1.infra_failures) == (0, 1)
    finally:
        store.close()


# --------------------------------------------------------------- blocklist


def test_blocklist_after_k_failures_then_forgiven(db_url: str) -> None:
    store = make_store(
        db_url,
        blocklist_threshold=2,
        blocklist_forgive_s=30,
        retry_elsewhere_s=0,
        offline_after_s=1000,
    )
    try:
        bad, _ = store.submit_job(job(tasks(4, max_attempts=5), name="bad"))
        other, _ = store.submit_job(job(tasks(1), name="other"))
        a, b = agent(store, "a"), agent(store, "b")
        o1, o2 = store.claim(a, 2).offers
        assert {o1.job_id, o2.job_id} == {bad.id}
        store.complete(fail(o1))
        assert store.blocklist(bad.id)[0]["blocked"] is False
        store.complete(fail(o2))
        (row,) = store.blocklist(bad.id)
        assert (row["agent_id"], row["failures"], row["blocked"]) == (a, 2, True)
        evs = [e for e in store.list_events(job_id=bad.id) if e.kind == "agent.blocklisted"]
        assert len(evs) == 1 and evs[0].agent_id == a and evs[0].task_id == o2.task_id
        assert evs[0].attempt_id == o2.attempt_id and "until" in (evs[0].reason or "")
        # a gets only the other job's task; b gets the bad job's
        offers = store.claim(a, 10).offers
        assert [x.job_id for x in offers] == [other.id]
        assert {x.job_id for x in store.claim(b, 10).offers} == {bad.id}
        # forgiven after forgive_s
        bad2, _ = store.submit_job(job(tasks(1), name="bad-later"))
        # Real time since the failure counts too (database clock plus offset).
        store.advance_clock(25)
        assert store.blocklist(bad.id)[0]["blocked"] is True
        store.advance_clock(6)
        assert store.blocklist(bad.id)[0]["blocked"] is False
        got = store.claim(a, 10).offers
        assert [x.job_id for x in got] == [bad2.id]
    finally:
        store.close()


def test_blocklist_is_ignored_for_the_only_live_agent(db_url: str) -> None:
    store = make_store(db_url, blocklist_threshold=1, retry_elsewhere_s=0)
    try:
        view, _ = store.submit_job(job(tasks(2, max_attempts=3)))
        a = agent(store, "a")
        o1, _o2 = store.claim(a, 2).offers
        store.complete(fail(o1))
        assert store.blocklist(view.id)[0]["blocked"]
        (again,) = store.claim(a, 2).offers  # no other agent: the farm keeps working
        assert again.task_id == o1.task_id
    finally:
        store.close()


def test_lost_leases_do_not_blocklist(db_url: str) -> None:
    store = make_store(db_url, lease_s=5, blocklist_threshold=1, retry_elsewhere_s=0)
    try:
        view, _ = store.submit_job(job(tasks(1)))
        a, _b = agent(store, "a"), agent(store, "b")
        (o,) = store.claim(a, 1).offers
        store.ack(o.attempt_id, o.token)
        store.advance_clock(6)
        assert store.reap() == 1
        assert store.blocklist(view.id) == []
        launch = store.claim(a, 1).offers[0]
        lf = Completion(attempt_id=launch.attempt_id, token=launch.token, outcome="launch_failed")
        store.complete(lf)
        assert store.blocklist(view.id)[0]["blocked"]  # a launch failure is the agent's fault
    finally:
        store.close()


# ------------------------------------------------------------ reconciliation


def test_heartbeat_reconciliation_records_events(db_url: str) -> None:
    store = make_store(db_url, heartbeat_grace_s=2, lease_s=30)
    try:
        _view, _ = store.submit_job(job(tasks(2)))
        a = agent(store, "a")
        o1, o2 = store.claim(a, 2).offers
        store.ack(o1.attempt_id, o1.token)
        store.ack(o2.attempt_id, o2.token)
        store.advance_clock(3)
        hb = store.heartbeat(
            a, Heartbeat(running=[RunningAttempt(attempt_id=o1.attempt_id, token=o1.token)])
        )
        assert hb.cancel == [] and hb.drain is False
        t2 = store.get_task(o2.task_id)
        assert (t2.state, t2.infra_failures) == ("queued", 1)
        (ev,) = [e for e in store.list_events(task_id=o2.task_id) if e.kind == "task.lease_expired"]
        assert (ev.from_state, ev.to_state, ev.attempt_id, ev.agent_id) == (
            "running",
            "queued",
            o2.attempt_id,
            a,
        )
        assert ev.reason == "not reported by its agent's heartbeat"
        # the agent still runs o2 after all: told to kill it
        hb = store.heartbeat(
            a,
            Heartbeat(
                running=[
                    RunningAttempt(attempt_id=o1.attempt_id, token=o1.token),
                    RunningAttempt(attempt_id=o2.attempt_id, token=o2.token),
                ]
            ),
        )
        assert hb.cancel == [o2.attempt_id]
        assert store.complete(ok(o2))[0].result == "stale"
        assert store.complete(ok(o1))[0].result == "accepted"
    finally:
        store.close()


# ------------------------------------------------------------------- drain


def test_drain_and_undrain(db_url: str) -> None:
    store = make_store(db_url)
    try:
        store.submit_job(job(tasks(3)))
        a = agent(store, "a")
        (o,) = store.claim(a, 1).offers
        view = store.set_drain(a, True)
        assert view.state == "draining"
        assert store.claim(a, 5).offers == [] and store.claim(a, 0).drain is True
        hb = store.heartbeat(
            a, Heartbeat(running=[RunningAttempt(attempt_id=o.attempt_id, token=o.token)])
        )
        assert hb.drain is True and hb.cancel == []  # running work finishes
        assert store.get_agent(a).state == "draining"
        assert store.complete(ok(o))[0].result == "accepted"
        # re-registering (a restarted agent) keeps it drained
        agent(store, "a")
        assert store.get_agent(a).state == "draining"
        assert store.heartbeat(a, Heartbeat()).drain is True
        assert store.claim(a, 5).offers == []
        view = store.set_drain(a, False)
        assert view.state == "online"
        assert store.heartbeat(a, Heartbeat()).drain is False
        assert len(store.claim(a, 5).offers) == 2
        kinds = [
            e.kind for e in store.list_events() if e.agent_id == a and e.kind.startswith("agent.")
        ]
        assert kinds == ["agent.register", "agent.drain", "agent.undrain"]
        store.set_drain(a, False)  # idempotent, no event
        assert len([e for e in store.list_events() if e.kind == "agent.undrain"]) == 1
    finally:
        store.close()


# ------------------------------------------------------------ maintenance


def test_maintenance_lock_one_holder_and_takeover(db_url: str) -> None:
    m1, m2 = make_store(db_url), make_store(db_url)  # two masters on one database
    try:
        assert m1.lock_holder() is None
        assert m1.try_lock("m1", ttl_s=30)
        assert not m2.try_lock("m2", ttl_s=30)
        assert m1.try_lock("m1", ttl_s=30)  # renew
        assert m1.maintain("m1", 30) == 0 and m2.maintain("m2", 30) is None
        holder = m2.lock_holder()
        assert holder is not None and holder[0] == "m1"
        # m1 stops renewing: m2 takes over after the TTL, not before
        for m in (m1, m2):
            m.advance_clock(20)
        assert not m2.try_lock("m2", ttl_s=30)
        for m in (m1, m2):
            m.advance_clock(11)
        assert m2.try_lock("m2", ttl_s=30)
        assert not m1.try_lock("m1", ttl_s=30)
        assert m2.release_lock("m2")
        assert not m2.release_lock("m1")  # not the holder: nothing to release
        assert m1.try_lock("m1", ttl_s=30)  # released: taken at once
    finally:
        m1.close()
        m2.close()


def test_maintenance_lock_first_take_races(db_url: str) -> None:
    stores = [make_store(db_url) for _ in range(4)]
    barrier = threading.Barrier(8)
    won: list[str] = []
    errors: list[BaseException] = []

    def take(i: int) -> None:
        try:
            barrier.wait()
            if stores[i % 4].try_lock(f"m{i}", ttl_s=30):
                won.append(f"m{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors, errors
        assert len(won) == 1
        holder = stores[0].lock_holder()
        assert holder is not None and holder[0] == won[0]
    finally:
        for s in stores:
            s.close()


def test_two_masters_reaping_never_double_requeue(db_url: str) -> None:
    """Two masters run maintenance rounds while leases expire; the holder stops halfway.

    Only one holds the lock at a time, the other takes over after the TTL, and
    each lost attempt is reaped exactly once (counted in the event log).
    """
    n_tasks = 40
    # The holder renews once half the TTL is gone: a round stalled longer than
    # TTL/2 (the main thread claims on the same database) would lose it early.
    ttl = 3.0
    stores = {
        name: make_store(db_url, lease_s=0.3, ack_timeout_s=0.3, infra_budget=100)
        for name in ("m1", "m2")
    }
    stops = {name: threading.Event() for name in stores}
    # (holder, monotonic time before the maintain call, after it): the renewal
    # happened between the two, whatever the scheduler did to the threads.
    held: list[tuple[str, float, float]] = []
    errors: list[BaseException] = []
    reaped: Counter[str] = Counter()

    def master(name: str) -> None:
        store = stores[name]
        try:
            while not stops[name].is_set():
                before = time.monotonic()
                n = store.maintain(name, ttl_s=ttl)
                if n is not None:
                    held.append((name, before, time.monotonic()))
                    reaped[name] += n
                time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)

    m1 = stores["m1"]
    try:
        m1.submit_job(job(tasks(n_tasks)))
        agents_ = [agent(m1, f"a{i}") for i in range(4)]
        threads = [threading.Thread(target=master, args=(name,)) for name in stores]
        for th in threads:
            th.start()
        # Agents claim, ack half, and vanish: offers expire and leases run out.
        deadline = time.monotonic() + 30
        claimed = 0
        first: str | None = None
        while time.monotonic() < deadline and claimed < 4 * n_tasks:
            for i, a in enumerate(agents_):
                for o in m1.claim(a, 5).offers:
                    claimed += 1
                    if (o.attempt_id + i) % 2:
                        m1.ack(o.attempt_id, o.token)
            if first is None and claimed >= 2 * n_tasks and held:
                first = held[-1][0]
                stops[first].set()  # the holder dies (stops renewing)
            time.sleep(0.05)
        time.sleep(1.0)
        for ev in stops.values():
            ev.set()
        for th in threads:
            th.join()
        assert not errors, errors
        assert claimed >= 4 * n_tasks and first is not None
        # One holder at a time: exactly one handover, to the other master.
        owners = [name for name, _, _ in held]
        changes = [(x, y) for x, y in itertools.pairwise(owners) if x != y]
        assert len(changes) == 1 and changes[0][0] == first, changes
        # The takeover came no sooner than the TTL after the last renewal. A holder
        # renews only once half the TTL is gone (an idle round is a read), so its
        # last renewal came at most TTL/2 before its last round.
        last_first = max(t0 for name, t0, _ in held if name == first)
        first_other = min(t1 for name, _, t1 in held if name != first)
        assert first_other - last_first >= ttl / 2 * 0.95
        assert all(reaped[name] > 0 for name in stores), reaped
        evs = m1.list_events(limit=100_000)
        lost = [e for e in evs if e.kind in ("task.offer_expired", "task.lease_expired")]
        per_attempt = Counter(e.attempt_id for e in lost)
        assert per_attempt and max(per_attempt.values()) == 1
        assert sum(reaped.values()) == len(lost)
        assert all(e.to_state == "queued" for e in lost)
    finally:
        for ev in stops.values():
            ev.set()
        for st in stores.values():
            st.close()


def test_maintenance_handover_when_holder_stops(db_url: str) -> None:
    m1, m2 = make_store(db_url), make_store(db_url)
    try:
        t0 = time.monotonic()  # before m1's renewal: m2 cannot win sooner than t0 + TTL
        assert m1.maintain("m1", 0.5) == 0
        while m2.maintain("m2", 0.5) is None:
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)
        waited = time.monotonic() - t0
        assert 0.475 <= waited < 10.0, waited
        assert m1.maintain("m1", 0.5) is None
    finally:
        m1.close()
        m2.close()
