"""The ACL at dispatch (seeds/002) and what agents accept, on SQLite and PostgreSQL.

"All pending jobs will be then checked against the ACL for the correct
permissions. If the check fails, update the status in the database and log
accordingly." An ACL changed after a job was submitted rejects its queued
tasks at the next claim: they never reach an agent, the event says why, the
job fails with the reason. An agent started with --accept-owners/--accept-pools
only ever gets those owners' and pools' tasks. Store-level tests first (two
stores on one database stand for two masters), then real master and agent
processes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from aclfarm import farm, job, stop, wait_job
from herder.api_models import AgentRegister
from herder.core.acl import PoolForbidden
from herder.store import Store
from storekit import job as store_job
from storekit import make_store, ok, tasks
from waiting import until_file, wait_for

REASON = "pool render: owner bob not allowed"


def _agent(store: Store, name: str = "a", **kw: Any) -> str:
    view, _ = store.register_agent(AgentRegister(name=name, hostname="h", slots=8, **kw))
    return view.id


def _attempts_of_job(db_url: str, job_id: int) -> list[tuple[int, str | None]]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [
                (int(r[0]), r[1])
                for r in conn.execute(
                    sa.text(
                        "SELECT attempts.task_id, attempts.agent_id FROM attempts "
                        "JOIN tasks ON tasks.id = attempts.task_id WHERE tasks.job_id = :j"
                    ),
                    {"j": job_id},
                )
            ]
    finally:
        engine.dispose()


# ------------------------------------------------------------------ store level


def test_acl_change_rejects_queued_tasks_at_the_next_claim(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = make_store(db_url), make_store(db_url)  # two masters, one database
    try:
        bob = one.submit(store_job(tasks(2), tasks(1), owner="bob", pool="render"))
        alice = one.submit(store_job(tasks(1), owner="alice", pool="render"))
        agent = _agent(one)
        two.set_pool_acl("render", ["alice"])  # written through the other master
        with caplog.at_level(logging.WARNING, logger="herder.store"):
            out = one.claim(agent, 10)
        assert [o.job_id for o in out.offers] == [alice.id]
        view = one.get_job(bob.id)
        assert view.state == "failed"
        states = {t.id: (t.state, t.error) for st in view.stages for t in st.tasks}
        first, later = bob.task_ids[:2], bob.task_ids[2]
        assert all(states[t] == ("rejected", REASON) for t in first)
        assert states[later][0] == "cancelled"  # the rest of the failed job's work
        assert _attempts_of_job(db_url, bob.id) == []  # never offered
        events = one.list_events(job_id=bob.id)
        rejects = [e for e in events if e.kind == "task.reject"]
        assert sorted(e.task_id for e in rejects) == sorted(first)
        assert {(e.from_state, e.to_state, e.reason) for e in rejects} == {
            ("queued", "rejected", REASON)
        }
        fail = [e for e in events if e.kind == "job.fail"]
        assert len(fail) == 1 and fail[0].reason == REASON
        logged = [r.getMessage() for r in caplog.records if "event=acl_reject" in r.getMessage()]
        assert len(logged) == 1 and f"job={bob.id}" in logged[0] and REASON in logged[0]
        # Nothing of it comes back: later claims offer nothing of bob's.
        assert one.claim(agent, 10, [ok(o) for o in out.offers]).offers == []
        assert one.get_job(alice.id).state == "succeeded"
    finally:
        one.close()
        two.close()


def test_the_queue_is_checked_only_when_the_acls_changed(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = make_store(db_url), make_store(db_url)
    scans: list[Store] = []
    real = Store._reject_forbidden

    def counting(self: Store, t: Any) -> int:
        scans.append(self)
        return real(self, t)

    monkeypatch.setattr(Store, "_reject_forbidden", counting)
    try:
        agent = _agent(one)
        one.claim(agent, 1)  # a fresh store checks once
        assert scans == [one]
        for _ in range(3):
            one.claim(agent, 1)
        assert scans == [one]  # nothing changed: no scan
        two.set_pool_acl("render", ["alice"])  # the version moves in the database
        one.claim(agent, 1)
        one.claim(agent, 1)
        assert scans == [one, one]
        one.claim(agent, 0)  # a claim that offers nothing checks nothing
        two.clear_pool_acl("render")
        one.claim(agent, 0)
        assert scans == [one, one]
        one.claim(agent, 1)
        assert scans == [one, one, one]
    finally:
        one.close()
        two.close()


def test_an_allowed_owner_and_other_pools_are_untouched(db_url: str) -> None:
    store = make_store(db_url)
    try:
        elsewhere = store.submit(store_job(tasks(1), owner="bob", pool="other"))
        star = store.submit(store_job(tasks(1), owner="bob", pool="open"))
        store.set_pool_acl("open", ["*"])
        store.set_pool_acl("render", ["alice"])
        got = {o.job_id for o in store.claim(_agent(store), 10).offers}
        assert got == {elsewhere.id, star.id}
    finally:
        store.close()


def test_a_retry_is_checked_against_the_acl(db_url: str) -> None:
    store = make_store(db_url)
    try:
        bob = store.submit(store_job(tasks(2), owner="bob", pool="render"))
        store.set_pool_acl("render", ["alice"])
        agent = _agent(store)
        assert store.claim(agent, 10).offers == []
        assert store.get_job(bob.id).state == "failed"
        with pytest.raises(PoolForbidden) as info:
            store.retry_job(bob.id)
        assert info.value.status == 403 and "owner bob" in info.value.message
        assert store.get_job(bob.id).state == "failed"  # the refused retry changed nothing
        store.set_pool_acl("render", ["alice", "bob"])
        assert store.retry_job(bob.id).state == "running"
        offers = store.claim(agent, 10).offers
        assert sorted(o.task_id for o in offers) == bob.task_ids  # the rejected ones run again
        store.claim(agent, 0, [ok(o) for o in offers])
        assert store.get_job(bob.id).state == "succeeded"
    finally:
        store.close()


def test_accept_lists_filter_the_offers(db_url: str) -> None:
    store = make_store(db_url)
    try:
        jobs = {
            (owner, pool): store.submit(store_job(tasks(2), owner=owner, pool=pool)).id
            for owner in ("alice", "bob", None)
            for pool in ("render", "sim")
        }
        picky = _agent(store, "picky", accept_owners=["alice"], accept_pools=["render"])
        pools = _agent(store, "pools", accept_pools=["sim", "*"])  # '*': every pool
        owners = _agent(store, "owners", accept_owners=["bob"])
        assert store.get_agent(picky).accept_owners == ["alice"]
        assert store.get_agent(pools).accept_pools == []
        got = [o.job_id for o in store.claim(picky, 50).offers]
        assert got == [jobs[("alice", "render")]] * 2
        got = sorted({o.job_id for o in store.claim(owners, 50).offers})
        assert got == sorted([jobs[("bob", "render")], jobs[("bob", "sim")]])
        got = sorted({o.job_id for o in store.claim(pools, 50).offers})
        assert got == sorted([jobs[("alice", "sim")], jobs[(None, "render")], jobs[(None, "sim")]])
    finally:
        store.close()


def test_autonomous_claims_apply_the_same_checks(db_url: str) -> None:
    """An agent claiming from the database itself (autonomous mode) goes through the
    same store claim: the ACL check and its accept lists apply there too."""
    from herder.agent.autonomous import StoreClient
    from herder.api_models import ClaimRequest

    master = make_store(db_url)
    agent = StoreClient(db_url)
    try:
        view = agent.register_agent(
            AgentRegister(name="auto", hostname="h", slots=8, accept_owners=["alice", "bob"])
        )
        bob = master.submit(store_job(tasks(1), owner="bob", pool="render"))
        carol = master.submit(store_job(tasks(1), owner="carol", pool="sim"))
        alice = master.submit(store_job(tasks(1), owner="alice", pool="render"))
        master.set_pool_acl("render", ["alice"])
        got = agent.claim(view.id, ClaimRequest(max_tasks=10))
        assert [o.job_id for o in got.offers] == [alice.id]
        assert master.get_job(bob.id).state == "failed"
        assert master.get_job(carol.id).state == "queued"  # not accepted: left for others
        assert _attempts_of_job(db_url, bob.id) == _attempts_of_job(db_url, carol.id) == []
    finally:
        agent.close()
        master.close()


# ------------------------------------------------------------------ real processes


def test_acl_rejected_task_never_reaches_a_running_agent(db_url: str, tmp_path: Path) -> None:
    with farm(db_url, tmp_path) as f, httpx.Client(timeout=10) as c:
        proc = f.agent("a1", "--slots", "1", "--claim-ahead", "0")
        agent_id = f.agent_id(c, "a1")
        # The agent's one slot is busy with alice's task while bob's job is queued:
        # the task holds it until the test lets it go, however slow the machine.
        release = tmp_path / "release"
        hold = until_file(release)
        busy = c.post(f"{f.api}/jobs", json=job("busy", "alice", "render", [hold])).json()
        wait_for(
            lambda: c.get(f"{f.api}/jobs/{busy['id']}").json()["state"] == "running",
            30,
            "alice's task started",
            f.logs,
        )
        bob = c.post(f"{f.api}/jobs", json=job("bob", "bob", "render", ["echo bob"] * 2)).json()
        r = c.put(f"{f.api}/pools/render/acl", json={"allow": ["alice"]})
        assert r.status_code == 200, r.text
        assert {
            t["state"] for t in c.get(f"{f.api}/jobs/{bob['id']}").json()["stages"][0]["tasks"]
        } == {"queued"}
        # The agent's next claim (when its slot frees) rejects bob's tasks.
        release.touch()
        assert wait_job(c, f, busy["id"])["state"] == "succeeded"
        done = wait_job(c, f, bob["id"])
        assert done["state"] == "failed"
        for t in done["stages"][0]["tasks"]:  # type: ignore[index]
            assert t["state"] == "rejected" and t["error"] == REASON and t["attempts"] == []
        assert _attempts_of_job(f.db_url, bob["id"]) == []
        events = c.get(f"{f.api}/jobs/{bob['id']}/events").json()["events"]
        rejects = [e for e in events if e["kind"] == "task.reject"]
        assert len(rejects) == 2 and {e["reason"] for e in rejects} == {REASON}
        assert all(e["agent_id"] is None for e in rejects)
        assert [e["reason"] for e in events if e["kind"] == "job.fail"] == [REASON]
        assert "event=acl_reject" in (tmp_path / "master.log").read_text()
        # The agent keeps working for alice, and never ran anything of bob's: by its own
        # count, it delivered alice's two completions and nothing else.
        again = c.post(f"{f.api}/jobs", json=job("again", "alice", "render", ["true"])).json()
        assert wait_job(c, f, again["id"])["state"] == "succeeded"
        assert {a for _, a in _attempts_of_job(f.db_url, again["id"])} == {agent_id}
        assert stop(proc) == 0
        stopped = [
            json.loads(x)["msg"]
            for x in (tmp_path / "agent-a1.log").read_text().splitlines()
            if "event=stopped" in x
        ]
        stats = json.loads(stopped[-1].split("stats=", 1)[1])
        assert stats["completed"] == 2, stats
        assert list((tmp_path / "agent-a1" / "journal").glob("*.json")) == []


def test_agent_accepting_owners_gets_only_their_tasks(db_url: str, tmp_path: Path) -> None:
    with farm(db_url, tmp_path) as f, httpx.Client(timeout=10) as c:
        f.agent("picky", "--slots", "2", "--accept-owners", "alice", "--accept-pools", "render")
        picky = f.agent_id(c, "picky")
        view = c.get(f"{f.api}/agents/{picky}").json()
        assert view["accept_owners"] == ["alice"] and view["accept_pools"] == ["render"]
        listed = f.herder("agents")
        assert listed.returncode == 0, listed.stderr
        assert "owners alice; pools render" in listed.stdout
        ids = {
            key: c.post(f"{f.api}/jobs", json=job(f"{key[0]}-{key[1]}", *key, ["true"] * 3)).json()[
                "id"
            ]
            for key in (("alice", "render"), ("bob", "render"), ("alice", "sim"))
        }
        assert wait_job(c, f, ids[("alice", "render")])["state"] == "succeeded"
        # More claims of the picky agent (each moves its last_seen_at): the others stay
        # queued, untouched by it.
        seen = {c.get(f"{f.api}/agents/{picky}").json()["last_seen_at"]}

        def claimed_again() -> bool:
            at = c.get(f"{f.api}/agents/{picky}").json()["last_seen_at"]
            fresh = at not in seen
            seen.add(at)
            return fresh

        for _ in range(2):
            wait_for(claimed_again, 30, "another claim of the picky agent", f.logs)
        for key in (("bob", "render"), ("alice", "sim")):
            assert c.get(f"{f.api}/jobs/{ids[key]}").json()["state"] == "queued"
            assert _attempts_of_job(f.db_url, ids[key]) == []
        # An agent that takes everyone's work runs them; the picky one still none of them.
        f.agent("any", "--slots", "2")
        other = f.agent_id(c, "any")
        for key in (("bob", "render"), ("alice", "sim")):
            assert wait_job(c, f, ids[key])["state"] == "succeeded"
            assert {a for _, a in _attempts_of_job(f.db_url, ids[key])} == {other}
        assert {a for _, a in _attempts_of_job(f.db_url, ids[("alice", "render")])} == {picky}
        bad = f.herder("agent", "--accept-owners", "a\x01b", "--master", f.url)
        assert bad.returncode == 2 and "--accept-owners: name contains a control" in bad.stderr
