"""A failed or cancelled job stops all its work at once (issue 9), on SQLite and PostgreSQL.

The store side: every live task of a job that leaves for a terminal state is
cancelled in the same transaction (offered and running ones with their
attempts), the cancelled attempts are announced after the commit, nothing of
a terminal job is queued, offered or counted as claimable work again, late
completions change nothing, and a database from before (a failed job with
live tasks) heals instead of looping.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa

from herder.api_models import AgentRegister, Completion, Heartbeat, RunningAttempt, TaskSpec
from herder.store import Store
from herder.store.schema import attempts, jobs, tasks
from herder.store.stops import CancelledAttempt
from storekit import fail, job, make_store, ok


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = make_store(db_url, lease_s=10.0, ack_timeout_s=5.0, heartbeat_grace_s=2.0)
    try:
        yield s
    finally:
        s.close()


def agent(store: Store, name: str = "a1", url: str | None = None) -> str:
    view, _ = store.register_agent(
        AgentRegister(
            name=name,
            hostname="host",
            slots=8,
            talkback_url=url,
            talkback_token=f"token-of-{name}-0123456789" if url else None,
        )
    )
    return view.id


def heard(store: Store) -> list[CancelledAttempt]:
    got: list[CancelledAttempt] = []

    def listener(items: Sequence[CancelledAttempt]) -> None:
        got.extend(items)

    store.add_cancel_listener(listener)
    return got


def states(store: Store, job_id: int) -> dict[int, str]:
    return {t.id: t.state for s in store.get_job(job_id).stages for t in s.tasks}


def _set_job_state(store: Store, job_id: int, state: str) -> None:
    """A database from before this change: a terminal job whose tasks were left live."""
    with store.engine.begin() as conn:
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(state=state))


def test_failure_cancels_every_live_task_and_announces_attempts(store: Store) -> None:
    spec = job(
        [
            TaskSpec(command="boom", max_attempts=1),
            TaskSpec(command="run-a", max_attempts=3),
            TaskSpec(command="run-b", max_attempts=3),
            TaskSpec(command="offered", max_attempts=3),
            TaskSpec(command="queued", max_attempts=3),
        ],
        [TaskSpec(command="later")],
    )
    view, _ = store.submit_job(spec)
    a = agent(store, "a1", "http://127.0.0.1:9/")
    b = agent(store, "b1")  # no talkback endpoint: only its heartbeat tells it
    got = heard(store)
    oa = store.claim(a, 3).offers  # boom, run-a, run-b
    (ob,) = store.claim(b, 1).offers  # offered (never acked)
    by_cmd = {o.command: o for o in [*oa, ob]}
    for name in ("run-a", "run-b"):
        store.ack(by_cmd[name].attempt_id, by_cmd[name].token)

    r, _ = store.complete(fail(by_cmd["boom"], 3))
    assert (r.result, r.task_state) == ("accepted", "failed")

    done = store.get_job(view.id)
    assert done.state == "failed"
    assert done.counts == {"failed": 1, "cancelled": 5}
    for t in (t for s in done.stages for t in s.tasks if t.state == "cancelled"):
        assert all(att.state == "cancelled" for att in t.attempts)
    # the three attempts that were offered or running, each with its agent's endpoint
    assert sorted((c.agent_id, c.attempt_id) for c in got) == sorted(
        [
            (a, by_cmd["run-a"].attempt_id),
            (a, by_cmd["run-b"].attempt_id),
            (b, ob.attempt_id),
        ]
    )
    for c in got:
        assert c.job_id == view.id and "job failed" in c.reason
        if c.agent_id == a:
            assert (c.talkback_url, c.talkback_token) == (
                "http://127.0.0.1:9/",
                "token-of-a1-0123456789",
            )
        else:
            assert c.talkback_url is None
    events = [e for e in store.list_events(job_id=view.id) if e.kind == "task.cancel"]
    assert len(events) == 5  # one per task, with where it came from and why
    assert {e.from_state for e in events} == {"running", "offered", "queued", "blocked"}
    assert all(e.reason and "job failed" in e.reason for e in events)
    assert all(e.attempt_id is not None for e in events if e.from_state in ("running", "offered"))

    # nothing of the job is work any more; its agents are told at their heartbeat
    assert not store.has_claimable_work()
    assert store.claim(a, 8).offers == []
    listed = [RunningAttempt(attempt_id=o.attempt_id, token=o.token) for o in oa[1:]]
    hb = store.heartbeat(a, Heartbeat(running=listed))
    assert sorted(hb.cancel) == sorted(o.attempt_id for o in oa[1:])
    hb = store.heartbeat(
        b, Heartbeat(running=[RunningAttempt(attempt_id=ob.attempt_id, token=ob.token)])
    )
    assert hb.cancel == [ob.attempt_id]
    assert store.get_job(view.id).counts == {"failed": 1, "cancelled": 5}


def test_late_completions_of_cancelled_attempts_change_nothing(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command=f"t{i}", max_attempts=3) for i in range(4)]))
    a = agent(store)
    offers = store.claim(a, 4).offers
    for o in offers:
        store.ack(o.attempt_id, o.token)
    store.cancel_job(view.id, "not needed")
    before = states(store, view.id)
    o_ok, o_fail, o_cancelled, o_released = offers
    assert store.complete(ok(o_ok))[0].result == "stale"
    assert store.complete(fail(o_fail, 1))[0].result == "stale"  # would retry: it must not
    rel = Completion(attempt_id=o_released.attempt_id, token=o_released.token, outcome="released")
    assert store.claim(a, 4, completions=[rel]).results[0].result == "stale"
    # the agent reporting its kill is recorded on the attempt; the task stays cancelled
    c = Completion(
        attempt_id=o_cancelled.attempt_id,
        token=o_cancelled.token,
        outcome="cancelled",
        exit_code=-15,
    )
    r, _ = store.complete(c)
    assert (r.result, r.task_state) == ("accepted", "cancelled")
    assert states(store, view.id) == before
    assert store.get_job(view.id).state == "cancelled"
    assert not store.has_claimable_work()


def test_failure_in_a_claim_batch_makes_the_siblings_completions_stale(store: Store) -> None:
    view, _ = store.submit_job(
        job(
            [
                TaskSpec(command="boom", max_attempts=1),
                *[TaskSpec(command=f"ok{i}") for i in range(2)],
            ]
        )
    )
    a = agent(store)
    offers = store.claim(a, 3).offers
    boom = next(o for o in offers if o.command == "boom")
    rest = [o for o in offers if o.command != "boom"]
    out = store.claim(a, 3, completions=[fail(boom, 3), *(ok(o) for o in rest)])
    assert [r.result for r in out.results] == ["accepted", "stale", "stale"]
    assert out.offers == []
    assert store.get_job(view.id).counts == {"failed": 1, "cancelled": 2}


def test_cancel_of_a_failed_job_with_live_tasks_cancels_them(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command=f"t{i}") for i in range(3)]))
    a = agent(store, "a1", "http://127.0.0.1:9/")
    got = heard(store)
    o1, o2 = store.claim(a, 2).offers
    store.ack(o1.attempt_id, o1.token)
    _set_job_state(store, view.id, "failed")
    # a terminal job's queued task is not claimable work (no idle poll writes for it)
    assert not store.has_claimable_work()
    assert store.claim(a, 8).offers == []
    done = store.cancel_job(view.id, "clean up")
    assert done.state == "failed"  # a terminal job keeps its state
    assert done.counts == {"cancelled": 3}
    assert sorted(c.attempt_id for c in got) == sorted([o1.attempt_id, o2.attempt_id])
    assert all(c.reason == "job already failed: clean up" for c in got)
    # idempotent: nothing left to cancel, nothing announced, no event
    n_events = len(store.list_events(job_id=view.id))
    store.cancel_job(view.id)
    assert len(store.list_events(job_id=view.id)) == n_events
    assert len(got) == 2


@pytest.mark.parametrize("path", ["lease_lost", "offer_expired", "retryable_failure", "release"])
def test_requeue_paths_never_requeue_a_task_of_a_terminal_job(store: Store, path: str) -> None:
    view, _ = store.submit_job(job([TaskSpec(command="t", max_attempts=3)]))
    a = agent(store)
    (o,) = store.claim(a, 1).offers
    if path != "offer_expired":
        store.ack(o.attempt_id, o.token)
    _set_job_state(store, view.id, "cancelled")
    if path == "lease_lost":
        store.advance_clock(11)  # past the lease: the reaper would requeue it
        store.reap()
    elif path == "offer_expired":
        store.advance_clock(6)  # past the ack deadline
        store.reap()
    elif path == "retryable_failure":
        assert store.complete(fail(o, 1))[0].result == "stale"
    else:
        rel = Completion(attempt_id=o.attempt_id, token=o.token, outcome="released")
        assert store.claim(a, 0, completions=[rel]).results[0].result == "stale"
    # the refused requeue healed the job instead: its task is cancelled, not queued
    t = store.get_task(o.task_id)
    assert t.state == "cancelled"
    assert t.attempts[-1].state == "cancelled"
    assert store.get_job(view.id).state == "cancelled"
    assert not store.has_claimable_work()
    with store.engine.connect() as conn:
        active = conn.execute(
            sa.select(sa.func.count())
            .select_from(attempts)
            .where(attempts.c.state.in_(["offered", "running"]))
        ).scalar_one()
        queued = conn.execute(
            sa.select(sa.func.count()).select_from(tasks).where(tasks.c.state == "queued")
        ).scalar_one()
    assert (active, queued) == (0, 0)


def test_claim_never_offers_a_task_of_a_paused_or_terminal_job(store: Store) -> None:
    ids: dict[str, Any] = {}
    for state in ("paused", "failed", "cancelled", "succeeded"):
        view, _ = store.submit_job(job([TaskSpec(command=state)]))
        _set_job_state(store, view.id, state)
        ids[state] = view.id
    a = agent(store)
    assert not store.has_claimable_work()
    assert store.claim(a, 8).offers == []
    live, _ = store.submit_job(job([TaskSpec(command="live")]))
    assert store.has_claimable_work()
    (o,) = store.claim(a, 8).offers
    assert o.job_id == live.id


def test_requeues_of_a_live_job_still_work_next_to_a_terminal_job(store: Store) -> None:
    over, _ = store.submit_job(job([TaskSpec(command="over")]))
    store.cancel_job(over.id)
    live, _ = store.submit_job(job([TaskSpec(command=f"t{i}", max_attempts=3) for i in range(2)]))
    a = agent(store)
    o1, o2 = store.claim(a, 2).offers
    store.ack(o1.attempt_id, o1.token)
    store.ack(o2.attempt_id, o2.token)
    r, _ = store.complete(fail(o1, 1))
    assert (r.result, r.task_state) == ("accepted", "queued")  # a retry
    store.advance_clock(11)  # o2's lease runs out
    store.reap()
    assert store.get_task(o2.task_id).state == "queued"
    assert store.get_job(live.id).state == "running"
    assert store.has_claimable_work()
    assert len(store.claim(a, 2).offers) == 2


def _at_once(*fns: Any) -> None:
    """Run ``fns`` in threads released together; re-raise what any of them raised."""
    go = threading.Barrier(len(fns))
    errors: list[BaseException] = []

    def run(fn: Any) -> None:
        try:
            go.wait()
            fn()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_a_failure_racing_the_reaper_leaves_nothing_of_the_job_live(db_url: str) -> None:
    """Two stores (two masters) on one database: one fails the job while the other
    requeues its tasks whose leases ran out. Whatever the interleaving, the
    failed job ends with no queued or running task (PostgreSQL: the cancel locks
    the live tasks first, so a requeue in flight is waited for and cancelled)."""
    failer = make_store(db_url, lease_s=10.0)
    reaper = make_store(db_url, lease_s=10.0, heartbeat_grace_s=60.0)
    try:
        for _ in range(6):
            view, _ = failer.submit_job(
                job(
                    [TaskSpec(command="boom", max_attempts=1)]
                    + [TaskSpec(command="t", max_attempts=5)] * 30
                )
            )
            a = agent(failer, f"a-{view.id}")
            offers = failer.claim(a, 31).offers
            for o in offers:
                failer.ack(o.attempt_id, o.token)
            boom = next(o for o in offers if o.command == "boom")
            reaper.advance_clock(11)  # every lease has run out, as the reaper sees it...
            listed = [RunningAttempt(attempt_id=boom.attempt_id, token=boom.token)]
            reaper.heartbeat(a, Heartbeat(running=listed))  # ...but boom's, renewed
            _at_once(reaper.reap, lambda boom=boom: failer.complete(fail(boom, 3)))
            done = failer.get_job(view.id)
            assert done.state == "failed"
            assert set(done.counts) <= {"failed", "cancelled"}, done.counts
            assert not failer.has_claimable_work()
    finally:
        failer.close()
        reaper.close()
