"""Loose ends of issue 13 in the store, on SQLite and PostgreSQL: a held child keeps
its failed parent from retention, a waiting job can be changed and cancelled (not
paused), a user retry restarts the RAM-raise count, a rejected task is a result."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from herder.api_models import AgentRegister, Completion, Offer
from herder.core.rules import RamRetryPolicy
from herder.errors import Conflict
from herder.store import Store
from herder.store.control import JobChanges
from herder.store.retention import RetentionPolicy
from herder.store.schema import job_deps, jobs
from storekit import fail, job, make_store, ok, tasks

DAY = 86400.0


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = make_store(db_url)
    s.retention = RetentionPolicy()
    try:
        yield s
    finally:
        s.close()


def agent(store: Store, **kw: object) -> str:
    view, _ = store.register_agent(
        AgentRegister(name="a", hostname="h", slots=8, cpus=8, **kw)  # type: ignore[arg-type]
    )
    return view.id


def backdate(store: Store, ids: list[int], days: float) -> None:
    at = store.db_now() - timedelta(days=days)
    with store.engine.begin() as conn:
        conn.execute(sa.update(jobs).where(jobs.c.id.in_(ids)).values(finished_at=at))


def exists(store: Store, job_id: int) -> bool:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id)).first() is not None


def edges(store: Store) -> set[tuple[int, int]]:
    with store.engine.connect() as conn:
        return {(int(r.job_id), int(r.parent_id)) for r in conn.execute(sa.select(job_deps))}


def task_views(store: Store, job_id: int) -> list[object]:
    return [t for s in store.get_job(job_id).stages for t in s.tasks]


def kinds(store: Store, job_id: int) -> list[str]:
    return [e.kind for e in store.list_events(job_id=job_id)]


# ------------------------------------------------------------------ retention


def test_retention_keeps_a_failed_parent_while_a_held_child_waits(store: Store) -> None:
    a = agent(store)
    parent, _ = store.submit_job(job(tasks(1), name="parent"))
    held, _ = store.submit_job(
        job(tasks(1), name="held", depends_on=[parent.id], on_parent_failure="hold")
    )
    other, _ = store.submit_job(job(tasks(1), name="other"))
    (o1, o2) = store.claim(a, 10).offers
    by_job = {o.job_id: o for o in (o1, o2)}
    store.complete(fail(by_job[parent.id]))
    store.complete(fail(by_job[other.id]))
    assert store.get_job(parent.id).state == "failed"
    assert store.get_job(held.id).state == "waiting"
    backdate(store, [parent.id, other.id], days=30)

    report = store.prune("m1", retention_s=14 * DAY)
    assert report is not None and report.jobs == 1  # only the job nobody waits for
    assert not exists(store, other.id)
    assert exists(store, parent.id) and (held.id, parent.id) in edges(store)
    assert store.get_job(held.id).state == "waiting"

    # What it was kept for: a retry of the parent that succeeds releases the child.
    store.retry_job(parent.id)
    (o,) = store.claim(a, 10).offers
    assert o.job_id == parent.id
    store.complete(ok(o))
    assert store.get_job(held.id).state == "queued"
    (o,) = store.claim(a, 10).offers
    store.complete(ok(o))
    assert store.get_job(held.id).state == "succeeded"
    # Nobody waits for it any more: both go once past their age.
    backdate(store, [parent.id, held.id], days=30)
    report = store.prune("m1", retention_s=14 * DAY)
    assert report is not None and report.jobs == 2
    assert not exists(store, parent.id) and not exists(store, held.id)


def test_retention_prunes_a_failed_parent_and_its_failed_child(store: Store) -> None:
    """A child that failed with its parent (on_parent_failure = fail) waits for nothing."""
    a = agent(store)
    parent, _ = store.submit_job(job(tasks(1), name="parent"))
    child, _ = store.submit_job(job(tasks(1), name="child", depends_on=[parent.id]))
    (o,) = store.claim(a, 10).offers
    store.complete(fail(o))
    assert store.get_job(child.id).state == "failed"
    backdate(store, [parent.id, child.id], days=30)
    report = store.prune("m1", retention_s=14 * DAY)
    assert report is not None and report.jobs == 2 and edges(store) == set()


def test_retention_keeps_a_grandparent_a_held_grandchild_waits_through(store: Store) -> None:
    """The failed child (fail) goes; its held child keeps the child, which keeps nothing:
    the rule is about the direct parent the waiting job's edge names."""
    a = agent(store)
    top, _ = store.submit_job(job(tasks(1), name="top"))
    mid, _ = store.submit_job(job(tasks(1), name="mid", depends_on=[top.id]))
    low, _ = store.submit_job(
        job(tasks(1), name="low", depends_on=[mid.id], on_parent_failure="hold")
    )
    (o,) = store.claim(a, 10).offers
    store.complete(fail(o))
    assert store.get_job(mid.id).state == "failed"
    assert store.get_job(low.id).state == "waiting"
    backdate(store, [top.id, mid.id], days=30)
    report = store.prune("m1", retention_s=14 * DAY)
    assert report is not None and report.jobs == 1
    assert not exists(store, top.id) and exists(store, mid.id)
    assert edges(store) == {(low.id, mid.id)}


# ------------------------------------------------------------------ control of a waiting job


def test_a_waiting_job_can_be_changed_its_blocked_tasks_take_the_change(store: Store) -> None:
    a = agent(store, tags=["gpu"], ram_mb=4096)
    parent, _ = store.submit_job(job(tasks(1), name="parent"))
    child, _ = store.submit_job(job(tasks(2), tasks(1), name="child", depends_on=[parent.id]))

    view = store.update_job(
        child.id,
        JobChanges(priority=7, tags=["gpu"], cpus=2, ram_mb=512, max_attempts=4),
    )
    assert view.state == "waiting" and view.priority == 7
    ts = task_views(store, child.id)
    assert len(ts) == 3
    for t in ts:
        assert t.state == "blocked"  # type: ignore[attr-defined]
        assert (t.tags, t.cpus, t.ram_mb, t.max_attempts) == (["gpu"], 2, 512, 4)  # type: ignore[attr-defined]
    (ev,) = [e for e in store.list_events(job_id=child.id) if e.kind == "job.update"]
    assert ev.reason is not None and "3 tasks not started" in ev.reason
    assert (ev.from_state, ev.to_state) == (None, None)  # no transition: it stays waiting
    # Still held: nothing of it is offered until its parent succeeds; then the change holds.
    (o,) = store.claim(a, 10).offers
    assert o.job_id == parent.id
    store.complete(ok(o))
    offers = store.claim(a, 10).offers
    assert {x.job_id for x in offers} == {child.id} and len(offers) == 2
    assert all((x.cpus, x.ram_mb) == (2, 512) for x in offers)


def test_pausing_a_waiting_job_is_a_clear_conflict_and_changes_nothing(store: Store) -> None:
    parent, _ = store.submit_job(job(tasks(1)))
    child, _ = store.submit_job(job(tasks(1), depends_on=[parent.id]))
    before = kinds(store, child.id)
    for kill in (False, True):
        with pytest.raises(Conflict, match="waiting for the jobs it depends on") as info:
            store.pause_job(child.id, kill=kill)
        assert info.value.detail == {"job_id": child.id, "state": "waiting"}
    with pytest.raises(Conflict, match="is waiting"):
        store.resume_job(child.id)
    assert store.get_job(child.id).state == "waiting"
    assert kinds(store, child.id) == before


def test_cancelling_a_waiting_job_cancels_its_blocked_tasks(store: Store) -> None:
    a = agent(store)
    parent, _ = store.submit_job(job(tasks(1)))
    child, _ = store.submit_job(job(tasks(2), tasks(1), depends_on=[parent.id]))
    view = store.cancel_job(child.id)
    assert view.state == "cancelled" and view.finished_at is not None
    assert {t.state for t in task_views(store, child.id)} == {"cancelled"}  # type: ignore[attr-defined]
    ev = [e for e in store.list_events(job_id=child.id) if e.kind == "job.cancel"]
    assert len(ev) == 1 and (ev[0].from_state, ev[0].to_state) == ("waiting", "cancelled")
    # Its parent's success releases nothing: the child stays cancelled.
    (o,) = store.claim(a, 10).offers
    store.complete(ok(o))
    assert store.get_job(child.id).state == "cancelled"
    assert store.claim(a, 10).offers == []


def test_changing_a_finished_job_is_still_a_conflict(store: Store) -> None:
    a = agent(store)
    j, _ = store.submit_job(job(tasks(1)))
    (o,) = store.claim(a, 10).offers
    store.complete(ok(o))
    with pytest.raises(Conflict, match="is succeeded: cannot change it"):
        store.update_job(j.id, JobChanges(priority=3))


# ------------------------------------------------------------------ retry and RAM raises


def memory(o: Offer, peak: int) -> Completion:
    return Completion(
        attempt_id=o.attempt_id, token=o.token, outcome="memory", peak_rss_mb=peak, error="rss"
    )


def test_user_retry_keeps_the_raised_ram_and_restarts_the_raise_count(store: Store) -> None:
    store.ram_retry_policy = RamRetryPolicy(factor=1.5, ceiling_mb=100_000, max_raises=1)
    a = agent(store, ram_mb=100_000)
    j, _ = store.submit_job(job(tasks(1, ram_mb=100)))

    (o,) = store.claim(a, 10).offers
    store.complete(memory(o, 120))
    (t,) = task_views(store, j.id)
    assert (t.state, t.ram_mb, t.memory_failures) == ("queued", 150, 1)  # type: ignore[attr-defined]
    (o,) = store.claim(a, 10).offers
    assert o.ram_mb == 150
    store.complete(memory(o, 160))  # its one raise is spent: it fails for good
    (t,) = task_views(store, j.id)
    assert (t.state, t.ram_mb, t.memory_failures) == ("failed", 150, 2)  # type: ignore[attr-defined]
    assert store.get_job(j.id).state == "failed"

    store.retry_job(j.id)
    (t,) = task_views(store, j.id)
    # The RAM it was raised to stays (it needed it); the count starts over.
    assert (t.state, t.ram_mb, t.memory_failures, t.failures) == ("queued", 150, 0, 0)  # type: ignore[attr-defined]
    (ev,) = [e for e in store.list_events(job_id=j.id) if e.kind == "task.retry"]
    assert ev.reason is not None and "RAM-raise" in ev.reason
    (o,) = store.claim(a, 10).offers
    assert o.ram_mb == 150
    store.complete(memory(o, 170))  # it gets its raise again
    (t,) = task_views(store, j.id)
    assert (t.state, t.ram_mb, t.memory_failures) == ("queued", 225, 1)  # type: ignore[attr-defined]
    (o,) = store.claim(a, 10).offers
    store.complete(ok(o))
    assert store.get_job(j.id).state == "succeeded"


# ------------------------------------------------------------------ rejected tasks as results

REASON = "pool render: owner bob not allowed"


def test_a_rejected_task_is_a_result_of_the_follow_stream_with_its_reason(store: Store) -> None:
    bob = store.submit(job(tasks(2), owner="bob", pool="render"))
    a = agent(store)
    store.set_pool_acl("render", ["alice"])
    assert store.claim(a, 10).offers == []
    page = store.follow_page(bob.id)
    assert page.state == "failed"
    assert sorted(r.task_id for r in page.results) == sorted(bob.task_ids)
    for r in page.results:
        assert (r.state, r.error, r.exit_code, r.attempt_id) == ("rejected", REASON, None, None)
    assert [r.task_id for r in store.task_results(bob.task_ids)] == bob.task_ids
