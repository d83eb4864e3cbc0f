"""Job dependencies (issue 13) in the store, on SQLite and PostgreSQL.

A child job (``depends_on``) is ``waiting`` with its tasks ``blocked`` until
every parent succeeded: the claim offers nothing of it, and the event log
shows its first offer after its parent's success. A failed or cancelled
parent fails the child (and the child's own fail-children) or holds it; a
retry of the parent that succeeds releases a held child. Bad ``depends_on``
is a 422 that writes nothing. Frame order: ids follow dispatch order, names
and ``task_ids`` keep submission order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from herder.api_models import AgentRegister, Offer, TaskSpec
from herder.errors import Conflict, InvalidRequest
from herder.store import Store
from storekit import fail, job, make_store, ok, tasks


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = make_store(db_url)
    try:
        yield s
    finally:
        s.close()


def agent(store: Store, name: str = "a1") -> str:
    view, _ = store.register_agent(
        AgentRegister(name=name, hostname="host", slots=64, tags=[], cpus=64)
    )
    return view.id


def run_all(store: Store, agent_id: str, job_id: int | None = None) -> list[Offer]:
    """Claim everything claimable and succeed it; the offers."""
    offers = store.claim(agent_id, 100).offers
    if job_id is not None:
        assert {o.job_id for o in offers} <= {job_id}
    for o in offers:
        store.complete(ok(o))
    return offers


def task_states(store: Store, job_id: int) -> list[str]:
    return [t.state for s in store.get_job(job_id).stages for t in s.tasks]


def events(store: Store, job_id: int, kind: str | None = None) -> list[object]:
    return [e for e in store.list_events(job_id=job_id) if kind is None or e.kind == kind]


def counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {
            t: int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one())
            for t in ("jobs", "tasks", "events", "job_deps", "stages")
        }


# ------------------------------------------------------------------ release


def test_child_starts_only_after_its_parent_succeeded(store: Store) -> None:
    a = agent(store)
    parent, _ = store.submit_job(job(tasks(2), name="parent"))
    child, created = store.submit_job(job(tasks(3), tasks(1), name="child", depends_on=[parent.id]))
    assert created and child.state == "waiting"
    assert set(task_states(store, child.id)) == {"blocked"}
    assert [(j.id, j.href, j.state) for j in child.depends_on] == [
        (parent.id, f"/api/v1/jobs/{parent.id}", "queued")
    ]
    assert [j.id for j in store.get_job(parent.id).dependents] == [child.id]
    assert [j.id for j in store.list_jobs(state="waiting")] == [child.id]

    first = store.claim(a, 100).offers
    assert sorted(o.job_id for o in first) == [parent.id, parent.id]  # nothing of the child
    store.complete(ok(first[0]))
    assert store.claim(a, 100).offers == []
    assert not store.has_claimable_work()
    assert store.get_job(child.id).state == "waiting"

    result, woke = store.complete(ok(first[1]))  # the parent's last task
    assert result.result == "accepted" and woke
    view = store.get_job(child.id)
    assert view.state == "queued"
    assert [s.state for s in view.stages] == ["queued", "blocked"]
    assert view.depends_on[0].state == "succeeded"
    run_all(store, a, child.id)
    run_all(store, a, child.id)
    assert store.get_job(child.id).state == "succeeded"

    # The event log: the parent's success, then the child's release, then its first offer.
    (succeed,) = events(store, parent.id, "job.succeed")
    (release,) = events(store, child.id, "job.release")
    offers = events(store, child.id, "task.offer")
    assert release.from_state == "waiting" and release.to_state == "queued"  # type: ignore[attr-defined]
    assert f"job {parent.id}" in (release.reason or "")  # type: ignore[attr-defined]
    assert succeed.id < release.id < min(e.id for e in offers)  # type: ignore[attr-defined]
    assert succeed.at <= release.at <= min(e.at for e in offers)  # type: ignore[attr-defined]
    unblocked = events(store, child.id, "task.unblock")
    assert len(unblocked) == 4  # stage 0 on release (3), stage 1 after stage 0 (1)


def test_child_of_two_parents_is_released_by_the_last(store: Store) -> None:
    a = agent(store)
    p1, _ = store.submit_job(job(tasks(1), name="p1"))
    p2, _ = store.submit_job(job(tasks(1), name="p2"))
    child, _ = store.submit_job(job(tasks(1), name="child", depends_on=[p2.id, p1.id, p2.id]))
    assert sorted(j.id for j in child.depends_on) == [p1.id, p2.id]  # repeats count once
    o1, o2 = sorted(store.claim(a, 10).offers, key=lambda o: o.job_id)
    store.complete(ok(o2))
    assert store.get_job(child.id).state == "waiting"
    store.complete(ok(o1))
    assert store.get_job(child.id).state == "queued"
    (release,) = events(store, child.id, "job.release")
    assert f"job {p1.id}" in (release.reason or "")  # type: ignore[attr-defined]


def test_parent_already_succeeded_child_starts_queued(store: Store) -> None:
    a = agent(store)
    parent, _ = store.submit_job(job(tasks(1)))
    run_all(store, a)
    child, _ = store.submit_job(job(tasks(2), depends_on=[parent.id]))
    assert child.state == "queued" and set(task_states(store, child.id)) == {"queued"}
    assert len(run_all(store, a, child.id)) == 2


# ------------------------------------------------------------------ failure


def test_failed_parent_fails_its_children_and_holds_a_hold_child(store: Store) -> None:
    a = agent(store)
    parent, _ = store.submit_job(job(tasks(1), name="parent"))
    child, _ = store.submit_job(job(tasks(2), tasks(1), name="child", depends_on=[parent.id]))
    grandchild, _ = store.submit_job(job(tasks(1), name="gc", depends_on=[child.id]))
    held, _ = store.submit_job(
        job(tasks(1), name="held", depends_on=[child.id], on_parent_failure="hold")
    )
    (o,) = store.claim(a, 10).offers
    store.complete(fail(o))

    assert store.get_job(parent.id).state == "failed"
    for failed in (child, grandchild):
        view = store.get_job(failed.id)
        assert view.state == "failed" and view.finished_at is not None
        assert set(task_states(store, failed.id)) == {"cancelled"}
    (ev,) = events(store, child.id, "job.fail")
    assert (ev.from_state, ev.to_state) == ("waiting", "failed")  # type: ignore[attr-defined]
    assert f"job {parent.id}" in (ev.reason or "")  # type: ignore[attr-defined]
    assert len(events(store, child.id, "task.cancel")) == 3
    (gev,) = events(store, grandchild.id, "job.fail")
    assert f"job {child.id}" in (gev.reason or "")  # type: ignore[attr-defined]

    view = store.get_job(held.id)
    assert view.state == "waiting" and set(task_states(store, held.id)) == {"blocked"}
    (hold,) = events(store, held.id, "job.hold")
    assert f"job {child.id}" in (hold.reason or "") and "retried" in (hold.reason or "")  # type: ignore[attr-defined]
    assert store.claim(a, 10).offers == []


def test_retry_of_a_held_childs_parent_releases_it(store: Store) -> None:
    a = agent(store)
    parent, _ = store.submit_job(job(tasks(2), name="parent"))
    child, _ = store.submit_job(
        job(tasks(1), name="child", depends_on=[parent.id], on_parent_failure="hold")
    )
    o1, o2 = store.claim(a, 10).offers
    store.complete(ok(o1))
    store.complete(fail(o2))
    assert store.get_job(parent.id).state == "failed"
    assert store.get_job(child.id).state == "waiting"
    assert len(events(store, child.id, "job.hold")) == 1

    store.retry_job(parent.id)
    assert store.get_job(child.id).state == "waiting"  # a retried parent is not a succeeded one
    (again,) = store.claim(a, 10).offers
    assert again.job_id == parent.id
    store.complete(ok(again))
    assert store.get_job(parent.id).state == "succeeded"
    assert store.get_job(child.id).state == "queued"
    (retry,) = events(store, parent.id, "job.retry")
    (release,) = events(store, child.id, "job.release")
    assert retry.id < release.id  # type: ignore[attr-defined]
    run_all(store, a, child.id)
    assert store.get_job(child.id).state == "succeeded"


def test_cancelled_parent_fails_a_fail_child_cancelling_a_waiting_child_is_quiet(
    store: Store,
) -> None:
    a = agent(store)
    p1, _ = store.submit_job(job(tasks(1)))
    c1, _ = store.submit_job(job(tasks(1), depends_on=[p1.id]))
    store.cancel_job(p1.id)
    assert store.get_job(c1.id).state == "failed"
    (ev,) = events(store, c1.id, "job.fail")
    assert "cancelled" in (ev.reason or "")  # type: ignore[attr-defined]

    p2, _ = store.submit_job(job(tasks(1)))
    c2, _ = store.submit_job(job(tasks(1), depends_on=[p2.id]))
    assert store.cancel_job(c2.id).state == "cancelled"
    assert set(task_states(store, c2.id)) == {"cancelled"}
    run_all(store, a, p2.id)
    assert store.get_job(p2.id).state == "succeeded"
    assert store.get_job(c2.id).state == "cancelled"  # not released: it is over
    assert events(store, c2.id, "job.release") == []


def test_a_failed_child_cannot_be_retried_before_its_parents_succeeded(store: Store) -> None:
    a = agent(store)
    parent, _ = store.submit_job(job(tasks(1)))
    child, _ = store.submit_job(job(tasks(1), depends_on=[parent.id]))
    (o,) = store.claim(a, 10).offers
    store.complete(fail(o))
    assert store.get_job(child.id).state == "failed"
    before = counts(store)
    with pytest.raises(Conflict, match=f"depends on job {parent.id}, not succeeded"):
        store.retry_job(child.id)
    assert counts(store) == before and store.get_job(child.id).state == "failed"
    store.retry_job(parent.id)
    run_all(store, a, parent.id)
    assert store.get_job(child.id).state == "failed"  # failed stays failed: retry it now
    assert store.retry_job(child.id).state == "running"
    run_all(store, a, child.id)
    assert store.get_job(child.id).state == "succeeded"


def test_pause_and_change_of_a_waiting_job_are_conflicts(store: Store) -> None:
    parent, _ = store.submit_job(job(tasks(1)))
    child, _ = store.submit_job(job(tasks(1), depends_on=[parent.id]))
    with pytest.raises(Conflict, match="is waiting"):
        store.pause_job(child.id)
    assert store.get_job(child.id).state == "waiting"


# ------------------------------------------------------------------ at the door


def test_bad_depends_on_is_refused_and_writes_nothing(store: Store) -> None:
    a = agent(store)
    parent, _ = store.submit_job(job(tasks(1)))
    before = counts(store)
    with pytest.raises(InvalidRequest, match="no job 424242, 525252") as info:
        store.submit(job(tasks(1), depends_on=[parent.id, 424242, 525252]))
    assert info.value.status == 422
    assert info.value.detail == {"field": "depends_on", "unknown": [424242, 525252]}
    assert counts(store) == before

    (o,) = store.claim(a, 1).offers
    store.complete(fail(o))
    before = counts(store)
    with pytest.raises(InvalidRequest, match=f"job {parent.id} \\(failed\\) did not succeed"):
        store.submit(job(tasks(1), depends_on=[parent.id], idempotency_key="k-fail"))
    assert counts(store) == before

    # "hold": accepted, waiting, held from the start; the parent's retry releases it
    held, _ = store.submit_job(job(tasks(1), depends_on=[parent.id], on_parent_failure="hold"))
    assert held.state == "waiting"
    (hold,) = events(store, held.id, "job.hold")
    assert f"job {parent.id} it depends on failed" in (hold.reason or "")  # type: ignore[attr-defined]
    store.retry_job(parent.id)
    run_all(store, a, parent.id)
    assert store.get_job(held.id).state == "queued"


def test_idempotent_submission_with_depends_on_and_self_reference(store: Store) -> None:
    parent, _ = store.submit_job(job(tasks(1)))
    spec = job(tasks(2), depends_on=[parent.id], idempotency_key="child-1")
    first = store.submit(spec)
    again = store.submit(spec)
    assert first.created and not again.created
    assert (again.id, again.task_ids) == (first.id, first.task_ids)
    with store.engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM job_deps")).scalar_one()
    assert n == 1

    before = counts(store)
    selfish = job(tasks(2), depends_on=[parent.id, first.id], idempotency_key="child-1")
    with pytest.raises(InvalidRequest, match="cannot depend on itself"):
        store.submit(selfish)
    assert counts(store) == before


# ------------------------------------------------------------------ concurrency


def in_threads(*fns: Callable[[], object]) -> None:
    """Run ``fns`` at once, one thread each, released together; re-raise what they raised."""
    go = threading.Barrier(len(fns))
    errors: list[BaseException] = []

    def run(fn: Callable[[], object]) -> None:
        try:
            go.wait(5)
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors


def test_parents_finishing_at_once_release_their_child_exactly_once(store: Store) -> None:
    """Two parents succeed in two concurrent transactions: the child is released once
    (on PostgreSQL the child's row lock orders them; neither misses the other)."""
    agents = [agent(store, "a1"), agent(store, "a2")]
    for _ in range(12):
        p1, _ = store.submit_job(job(tasks(1)))
        p2, _ = store.submit_job(job(tasks(1)))
        child, _ = store.submit_job(job(tasks(1), depends_on=[p1.id, p2.id]))
        (o1,) = store.claim(agents[0], 1).offers
        (o2,) = store.claim(agents[1], 1).offers
        in_threads(lambda o=o1: store.complete(ok(o)), lambda o=o2: store.complete(ok(o)))
        assert store.get_job(child.id).state == "queued"
        assert len(events(store, child.id, "job.release")) == 1
        run_all(store, agents[0], child.id)


def test_children_submitted_while_their_parent_finishes_are_never_stranded(
    store: Store,
) -> None:
    """Submissions racing their parent's last completion: each child is queued either way
    (on PostgreSQL the submission's FOR SHARE on the parent orders them)."""
    a = agent(store)
    for _ in range(6):
        parent, _ = store.submit_job(job(tasks(30)))
        offers = store.claim(a, 100).offers
        children: list[int] = []

        def submit_children(parent_id: int = parent.id, out: list[int] = children) -> None:
            for _ in range(12):
                out.append(store.submit(job(tasks(1), depends_on=[parent_id])).id)

        def finish_parent(offers: list[Offer] = offers) -> None:
            for o in offers:
                store.complete(ok(o))

        in_threads(submit_children, finish_parent)
        assert len(children) == 12
        assert store.get_job(parent.id).state == "succeeded"
        assert {store.get_job(c).state for c in children} == {"queued"}
        run_all(store, a)


# ------------------------------------------------------------------ frame order


def names_in_claim_order(store: Store, agent_id: str, n: int) -> list[str | None]:
    out = []
    for _ in range(n):
        (o,) = store.claim(agent_id, 1).offers
        out.append(store.get_task(o.task_id).name)
        store.complete(ok(o))
    return out


def test_first_last_middle_dispatches_in_that_order_names_stay_right(store: Store) -> None:
    a = agent(store)
    frames = [TaskSpec(name=f"f[{i}]", command=f"render {i}") for i in range(9)]
    spec = job(
        [TaskSpec(name="prep", command="prep")],
        frames,
        frame_order="first-last-middle",
        idempotency_key="frames-1",
    )
    sub = store.submit(spec)
    # task_ids stay in submission order: the i-th id is the i-th task's
    assert [store.get_task(t).name for t in sub.task_ids] == ["prep"] + [t.name for t in frames]
    assert [store.get_task(t).command for t in sub.task_ids[1:]] == [
        f"render {i}" for i in range(9)
    ]
    assert store.submit(spec).task_ids == sub.task_ids  # the idempotent answer too
    assert store.get_job(sub.id).frame_order == "first-last-middle"
    assert names_in_claim_order(store, a, 10) == [
        "prep", "f[0]", "f[8]", "f[4]", "f[2]", "f[6]", "f[1]", "f[3]", "f[5]", "f[7]",
    ]  # fmt: skip


def test_sequential_frame_order_is_submission_order(store: Store) -> None:
    a = agent(store)
    sub = store.submit(job([TaskSpec(name=f"f{i}", command="x") for i in range(5)]))
    assert sub.task_ids == sorted(sub.task_ids)
    assert names_in_claim_order(store, a, 5) == [f"f{i}" for i in range(5)]
