"""Job control in the store (issue 13): pause, resume, retry, change, on SQLite and PostgreSQL.

Each operation is one transaction guarded by the job's state (409 otherwise,
nothing changed); a paused job is never offered nor counted as work; a
pause with kill requeues running tasks without counting a failure and
announces their cancelled attempts; retry gives failed tasks a fresh budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from herder.api_models import AgentRegister, Heartbeat, RunningAttempt, TaskSpec
from herder.errors import Conflict, NotFound
from herder.store import Store
from herder.store.control import JobChanges
from herder.store.stops import CancelledAttempt
from storekit import fail, job, make_store, ok


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = make_store(db_url, lease_s=10.0, ack_timeout_s=5.0, heartbeat_grace_s=2.0)
    try:
        yield s
    finally:
        s.close()


def agent(store: Store, name: str = "a1", tags: Sequence[str] = ()) -> str:
    view, _ = store.register_agent(
        AgentRegister(name=name, hostname="host", slots=8, tags=list(tags), cpus=4)
    )
    return view.id


def heard(store: Store) -> list[CancelledAttempt]:
    got: list[CancelledAttempt] = []
    store.add_cancel_listener(got.extend)
    return got


def states(store: Store, job_id: int) -> dict[int, str]:
    return {t.id: t.state for s in store.get_job(job_id).stages for t in s.tasks}


def kinds(store: Store, job_id: int) -> list[str]:
    return [e.kind for e in store.list_events(job_id=job_id)]


def test_pause_offers_nothing_running_tasks_finish_resume_runs_the_rest(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command=f"t{i}") for i in range(3)]))
    a = agent(store)
    (first,) = store.claim(a, 1).offers
    store.ack(first.attempt_id, first.token)

    paused = store.pause_job(view.id)
    assert paused.state == "paused"
    assert not store.has_claimable_work()
    assert store.claim(a, 8).offers == []
    # the running task finishes normally
    r, _ = store.complete(ok(first))
    assert (r.result, r.task_state) == ("accepted", "succeeded")
    assert store.get_job(view.id).state == "paused"

    with pytest.raises(Conflict, match="is paused: cannot pause"):
        store.pause_job(view.id)
    assert store.resume_job(view.id).state == "running"
    with pytest.raises(Conflict, match="is running: cannot resume"):
        store.resume_job(view.id)
    assert store.has_claimable_work()
    rest = store.claim(a, 8).offers
    assert len(rest) == 2
    for o in rest:
        store.complete(ok(o))
    assert store.get_job(view.id).state == "succeeded"
    ks = kinds(store, view.id)
    assert ks.count("job.pause") == 1 and ks.count("job.resume") == 1


def test_pause_kill_requeues_without_a_failure_and_announces_attempts(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command=f"t{i}", max_attempts=1) for i in range(3)]))
    a = agent(store)
    got = heard(store)
    offers = store.claim(a, 2).offers
    store.ack(offers[0].attempt_id, offers[0].token)  # one running, one only offered

    store.pause_job(view.id, kill=True)
    assert set(states(store, view.id).values()) == {"queued"}
    assert sorted(c.attempt_id for c in got) == sorted(o.attempt_id for o in offers)
    assert all(c.reason == "job paused" for c in got)
    for s in store.get_job(view.id).stages:
        for t in s.tasks:
            assert t.failures == 0 and t.infra_failures == 0
            assert all(att.state == "cancelled" for att in t.attempts)
    # the agent hears it at its heartbeat too; its late completion is fenced
    hb = store.heartbeat(
        a,
        Heartbeat(running=[RunningAttempt(attempt_id=o.attempt_id, token=o.token) for o in offers]),
    )
    assert sorted(hb.cancel) == sorted(o.attempt_id for o in offers)
    r, _ = store.complete(fail(offers[0]))
    assert r.result == "stale"
    assert set(states(store, view.id).values()) == {"queued"}
    preempts = [e for e in store.list_events(job_id=view.id) if e.kind == "task.preempt"]
    assert len(preempts) == 2 and all(e.attempt_id for e in preempts)

    # max_attempts=1, yet the killed tasks run again after resume and succeed
    store.resume_job(view.id)
    again = store.claim(a, 8).offers
    assert len(again) == 3
    for o in again:
        store.complete(ok(o))
    assert store.get_job(view.id).state == "succeeded"


def test_pause_racing_a_completion_keeps_the_completed_result(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command="t0"), TaskSpec(command="t1")]))
    a = agent(store)
    o0, o1 = store.claim(a, 2).offers
    store.complete(ok(o0))  # lands first
    store.pause_job(view.id, kill=True)
    st = states(store, view.id)
    assert st[o0.task_id] == "succeeded" and st[o1.task_id] == "queued"


def test_last_task_finishing_while_paused_ends_the_job(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command="t0")]))
    a = agent(store)
    (o,) = store.claim(a, 1).offers
    store.pause_job(view.id)
    store.complete(ok(o))
    assert store.get_job(view.id).state == "succeeded"


def test_retry_requeues_failed_and_cancelled_tasks_with_fresh_budgets(store: Store) -> None:
    view, _ = store.submit_job(
        job(
            [TaskSpec(command="boom", max_attempts=1), TaskSpec(command="ok", max_attempts=1)],
            [TaskSpec(command="later")],
        )
    )
    a = agent(store)
    boom, good = store.claim(a, 2).offers
    store.complete(ok(good))
    store.complete(fail(boom))
    assert store.get_job(view.id).state == "failed"
    with pytest.raises(Conflict, match="is failed: cannot resume"):
        store.resume_job(view.id)

    again = store.retry_job(view.id)
    assert again.state == "running"
    by_stage = {t.id: (t.stage, t.state, t.failures) for s in again.stages for t in s.tasks}
    assert by_stage[boom.task_id] == (0, "queued", 0)
    assert by_stage[good.task_id][1] == "succeeded"  # a success is kept
    assert [v[1] for v in by_stage.values() if v[0] == 1] == ["blocked"]
    ks = kinds(store, view.id)
    assert ks.count("job.retry") == 1 and "task.retry" in ks and "task.retry_blocked" in ks

    (o,) = store.claim(a, 8).offers
    assert o.task_id == boom.task_id
    store.complete(ok(o))
    (last,) = store.claim(a, 8).offers
    store.complete(ok(last))
    assert store.get_job(view.id).state == "succeeded"
    with pytest.raises(Conflict, match="is succeeded: cannot retry"):
        store.retry_job(view.id)


def test_retry_of_a_cancelled_job_and_of_a_live_job(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command="t0")]))
    with pytest.raises(Conflict, match="is queued: cannot retry"):
        store.retry_job(view.id)
    store.cancel_job(view.id)
    assert store.retry_job(view.id).counts == {"queued": 1}


def test_unknown_job_is_not_found(store: Store) -> None:
    for op in (store.pause_job, store.resume_job, store.retry_job):
        with pytest.raises(NotFound):
            op(999)
    with pytest.raises(NotFound):
        store.update_job(999, JobChanges(priority=1))


def test_update_changes_tasks_not_started_and_max_attempts_of_live_ones(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command=f"t{i}", tags=["x"]) for i in range(3)]))
    a = agent(store, tags=["x"])
    (running,) = store.claim(a, 1).offers
    store.ack(running.attempt_id, running.token)

    done = store.update_job(
        view.id, JobChanges(priority=7, tags=["gpu", "big"], ram_mb=512, cpus=2, max_attempts=4)
    )
    assert done.priority == 7
    for s in done.stages:
        for t in s.tasks:
            assert t.max_attempts == 4
            if t.id == running.task_id:
                assert (t.tags, t.ram_mb, t.cpus) == (["x"], 0, 1)  # already started
            else:
                assert (t.tags, t.ram_mb, t.cpus) == (["big", "gpu"], 512, 2)
    (ev,) = [e for e in store.list_events(job_id=view.id) if e.kind == "job.update"]
    assert ev.reason is not None and "priority=7" in ev.reason and "tags=big,gpu" in ev.reason
    # no agent offers gpu: the tasks stay queued
    assert store.claim(a, 8).offers == []
    store.update_job(view.id, JobChanges(tags=[]))  # cleared: any agent will do
    assert len(store.claim(a, 8).offers) == 2


def test_update_of_a_finished_job_is_a_conflict_and_changes_nothing(store: Store) -> None:
    view, _ = store.submit_job(job([TaskSpec(command="t0")]))
    store.cancel_job(view.id)
    before = kinds(store, view.id)
    with pytest.raises(Conflict, match="is cancelled: cannot change"):
        store.update_job(view.id, JobChanges(priority=5))
    assert store.get_job(view.id).priority == 0
    assert kinds(store, view.id) == before


def test_agent_state_is_the_views_state_and_unknown_agents_are_not_found(store: Store) -> None:
    # The idle claim's one read (master.service.claim_once): the same answer as the view.
    a = agent(store)
    assert store.agent_state(a) == store.get_agent(a).state
    store.set_drain(a, True)
    assert store.agent_state(a) == store.get_agent(a).state == "draining"
    store.set_drain(a, False)
    assert store.agent_state(a) != "draining"
    with pytest.raises(NotFound):
        store.agent_state("nobody")
