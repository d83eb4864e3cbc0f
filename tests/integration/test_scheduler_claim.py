"""The claim runs the scheduler (herder.core.schedule) over the database, on SQLite and PostgreSQL.

Free capacity, negated tags, GPUs, the agent's own limits (set at
registration and changed at run time), fair share between owners by weight,
and, with hypothesis, the claim's picks equal the pure reference over the
same snapshot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herder.api_models import AgentLimits, AgentRegister, Heartbeat, ResourceUsage, TaskSpec
from herder.core.schedule import AgentSnapshot, Candidate, Shares, schedule
from herder.store import Store
from storekit import job, make_store, ok, tasks


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = make_store(db_url)
    try:
        yield s
    finally:
        s.close()


def _agent(store: Store, name: str, **kw: Any) -> str:
    kw.setdefault("slots", 2)
    view, _ = store.register_agent(AgentRegister(name=name, hostname="host", **kw))
    return view.id


def _task_ids(store: Store, agent: str, n: int) -> list[int]:
    return [o.task_id for o in store.claim(agent, n).offers]


def test_two_big_tasks_are_never_offered_together(store: Store) -> None:
    a = _agent(store, "a", slots=2, cpus=2, ram_mb=4096)
    store.submit(job(tasks(2, ram_mb=3072), tasks(1)))
    first = store.claim(a, 2).offers
    assert len(first) == 1 and first[0].ram_mb == 3072  # the second 3 GB does not fit beside it
    assert store.claim(a, 1).offers == []
    store.claim(a, 0, completions=[ok(first[0])])
    second = store.claim(a, 2).offers
    assert len(second) == 1 and second[0].task_id != first[0].task_id


def test_small_tasks_fill_the_room_a_big_one_leaves(store: Store) -> None:
    a = _agent(store, "a", slots=3, cpus=3, ram_mb=4096)
    store.submit(job([TaskSpec(command="big", ram_mb=3000), TaskSpec(command="big2", ram_mb=3000)]))
    store.submit(job([TaskSpec(command="small", ram_mb=500)]))
    got = store.claim(a, 3).offers
    assert sorted(o.ram_mb for o in got) == [500, 3000]


def test_cpus_and_gpus_are_reserved(store: Store) -> None:
    a = _agent(store, "a", slots=4, cpus=4, gpus=1)
    store.submit(job(tasks(2, gpus=1), tasks(1)))
    assert len(store.claim(a, 4).offers) == 1  # one GPU
    b = _agent(store, "b", slots=4, cpus=4)
    assert store.claim(b, 4).offers == []  # no GPU at all
    store.submit(job(tasks(3, cpus=2)))
    assert len(store.claim(b, 4).offers) == 2  # 4 cpus: two tasks of 2


def test_negated_tags(store: Store) -> None:
    gpu = _agent(store, "gpu", tags=["gpu", "linux"])
    plain = _agent(store, "plain", tags=["linux"])
    store.submit(job([TaskSpec(command="no gpu please", tags=["!gpu", "linux"])]))
    assert store.claim(gpu, 2).offers == []
    assert len(store.claim(plain, 2).offers) == 1


def test_agent_limits_at_registration_and_at_run_time(store: Store) -> None:
    a = _agent(store, "a", slots=2, cpus=2, ram_mb=8000, max_ram_mb=2000)
    store.submit(job(tasks(1, ram_mb=3000)))
    assert store.claim(a, 2).offers == []
    view = store.set_agent_limits(a, AgentLimits(max_ram_mb=None))
    assert view.max_ram_mb is None
    assert len(store.claim(a, 2).offers) == 1
    events = [e for e in store.list_events() if e.kind == "agent.limits"]
    assert events and "max_ram_mb=none" in (events[-1].reason or "")
    # Registering again without the flag keeps the limit set at run time.
    store.set_agent_limits(a, AgentLimits(max_ram_mb=1000))
    _agent(store, "a", agent_id=a, slots=2, cpus=2, ram_mb=8000)
    assert store.get_agent(a).max_ram_mb == 1000


def test_max_load_stops_new_work(store: Store) -> None:
    a = _agent(store, "a", max_load=2.0)
    store.submit(job(tasks(2)))
    store.heartbeat(a, Heartbeat(running=[], usage=ResourceUsage(load_1m=3.5)))
    assert store.claim(a, 2).offers == []
    store.heartbeat(a, Heartbeat(running=[], usage=ResourceUsage(load_1m=0.5)))
    assert len(store.claim(a, 2).offers) == 2


def test_fair_share_follows_weights(store: Store) -> None:
    store.set_owner_weight("ann", 2.0)
    a = _agent(store, "a", slots=3, cpus=3)
    store.submit(job(tasks(60), owner="bob", name="bob"))  # bob first: his ids are older
    store.submit(job(tasks(60), owner="ann", name="ann"))
    with store.engine.connect() as conn:
        owner_of = dict(
            conn.exec_driver_sql(
                "SELECT tasks.id, jobs.owner FROM tasks JOIN jobs ON jobs.id = tasks.job_id"
            ).all()
        )
    got: Counter[str] = Counter()
    for _ in range(15):
        offers = store.claim(a, 3).offers
        got.update(owner_of[o.task_id] for o in offers)
        store.claim(a, 0, completions=[ok(o) for o in offers])
    assert got["ann"] + got["bob"] == 45
    assert 28 <= got["ann"] <= 32, got  # 2:1 of 45 is 30:15


def test_owner_weights_listed_and_refused(store: Store) -> None:
    share = store.set_owner_weight("ann", 3.0)
    assert share.weight == 3.0
    with pytest.raises(ValueError, match="weight"):
        store.set_owner_weight("ann", 0.0)
    with pytest.raises(ValueError, match="weight"):
        store.set_owner_weight("ann", float("nan"))
    assert {s.owner: s.weight for s in store.owner_shares()}["ann"] == 3.0


@st.composite
def farm(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 8))
    specs = []
    for _ in range(n):
        specs.append(
            {
                "owner": draw(st.sampled_from(["ann", "bob"])),
                "priority": draw(st.sampled_from([0, 5])),
                "cpus": draw(st.integers(0, 3)),
                "ram_mb": draw(st.sampled_from([0, 1000, 2500])),
                "gpus": draw(st.sampled_from([0, 0, 1])),
                "tags": draw(st.sampled_from([[], ["linux"], ["!gpu"], ["gpu"]])),
            }
        )
    agent = {
        "slots": draw(st.integers(1, 4)),
        "cpus": draw(st.integers(1, 4)),
        "ram_mb": draw(st.sampled_from([0, 3000, 6000])),
        "gpus": draw(st.integers(0, 1)),
        "tags": draw(st.sampled_from([[], ["linux"], ["linux", "gpu"]])),
    }
    return {"specs": specs, "agent": agent, "n": draw(st.integers(1, 6))}


@settings(
    max_examples=40,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=farm())
def test_claim_equals_the_pure_scheduler(
    tmp_path_factory: pytest.TempPathFactory, case: Any
) -> None:
    """The SQL window plus the scheduler pick what the scheduler picks over the whole table."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sched')}/farm.db"
    s = make_store(url)
    try:
        spec_of: dict[int, dict[str, Any]] = {}
        for i, spec in enumerate(case["specs"]):
            t = TaskSpec(
                command=f"t{i}",
                cpus=spec["cpus"],
                ram_mb=spec["ram_mb"],
                gpus=spec["gpus"],
                tags=spec["tags"],
            )
            view = s.submit_job(job([t], owner=spec["owner"], priority=spec["priority"]))[0]
            with s.engine.connect() as conn:
                (tid,) = conn.exec_driver_sql(
                    f"SELECT id FROM tasks WHERE job_id = {view.id}"
                ).one()
            spec_of[tid] = spec
        ag = case["agent"]
        agent_id = _agent(s, "a", **ag)
        with s.engine.connect() as conn:
            keys = dict(conn.exec_driver_sql("SELECT id, share_key FROM tasks").all())
        cands = [
            Candidate(
                id=tid,
                job_id=0,
                priority=spec["priority"],
                owner=spec["owner"],
                share_key=keys[tid],
                cpus=spec["cpus"],
                ram_mb=spec["ram_mb"],
                gpus=spec["gpus"],
                tags=tuple(spec["tags"]),
            )
            for tid, spec in spec_of.items()
        ]
        snap = AgentSnapshot(
            slots=ag["slots"],
            cpus=ag["cpus"],
            ram_mb=ag["ram_mb"],
            gpus=ag["gpus"],
            tags=frozenset(ag["tags"]),
        )
        # Nothing has run yet: every owner's slot-seconds are 0.
        want = [c.id for c in schedule(cands, snap, Shares(), case["n"])]
        assert _task_ids(s, agent_id, case["n"]) == want
    finally:
        s.close()


def test_the_window_is_one_walk_of_the_claim_index(store: Store) -> None:
    """On a long queue the window reads the partial index in order: no sort, no scan."""
    store.submit(job(tasks(3000), owner="ann"))
    store.submit(job(tasks(3000), owner="bob", priority=5))
    sql = store._sql
    params = {
        "tags": sql.tags_param(["linux"]),
        "negated": sql.tags_param(["!linux"]),
        "cpus": 4,
        "gpus": 0,
        "ram": 0,
        "n": 24,
        "agent_id": "a",
        "now": sql.ts(store.db_now()),
        "live_since": sql.ts(store.db_now()),
        "retry_before": sql.ts(store.db_now()),
        "any_owner": True,
        "accept_owners": sql.tags_param([]),
        "any_pool": True,
        "accept_pools": sql.tags_param([]),
    }
    raw = store.engine.raw_connection()
    try:
        cur = raw.cursor()
        if sql.is_pg:
            cur.execute("ANALYZE")
            cur.execute("EXPLAIN " + sql.offer_window, params)
        else:
            cur.execute("ANALYZE")
            cur.execute("EXPLAIN QUERY PLAN " + sql.offer_window, params)
        plan = " ".join(str(r[-1]) for r in cur.fetchall())
    finally:
        raw.close()
    assert "ix_tasks_claim" in plan, plan
    assert "Sort" not in plan and "TEMP B-TREE" not in plan, plan


def test_patching_gpus_and_negated_tags_moves_work(store: Store) -> None:
    from herder.store.control import JobChanges

    plain = _agent(store, "plain", slots=2, tags=["linux"])
    view = store.submit_job(job(tasks(2)))[0]
    store.update_job(view.id, JobChanges(gpus=1))
    assert store.claim(plain, 2).offers == []  # no GPU on it any more
    gpu = _agent(store, "gpu", slots=2, gpus=2, tags=["linux", "gpu"])
    store.update_job(view.id, JobChanges(tags=["!gpu"]))
    assert store.claim(gpu, 2).offers == []  # now it must not have one
    store.update_job(view.id, JobChanges(gpus=0))
    assert len(store.claim(plain, 2).offers) == 2
