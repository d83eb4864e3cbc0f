"""Recovery on master start (seeds/002, DESIGN §5) with a real master process.

A fake agent (the client's claim/ack/complete, so the test controls every
acknowledgement) holds offers and leases when the master is killed with
SIGKILL; the restarted master requeues them before it serves a claim, each
task is then completed exactly once, and the stale attempts get 409.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from herder.api_models import (
    AgentRegister,
    ClaimRequest,
    Completion,
    JobSubmit,
    Offer,
    StageSpec,
    TaskSpec,
)
from herder.client import HerderClient, StaleAttemptError
from herder.localfarm import LocalFarm
from herder.store import Store

# Offers and leases must outlast the claim/acks before the kill and the four
# ack-less completions after the restart (the reaper runs every second) on a
# loaded machine; the test sleeps past it once while no master runs.
LEASE_S = 4.0


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(
        db_url=db_url,
        workdir=tmp_path / "farm",
        lease_s=LEASE_S,
        ack_timeout_s=LEASE_S,
        log_level="info",
    )
    try:
        yield f
    finally:
        f.close()


def ok(o: Offer) -> Completion:
    return Completion(attempt_id=o.attempt_id, token=o.token, outcome="exited", exit_code=0)


def task_states(db_url: str, job_id: int) -> dict[int, str]:
    store = Store.open(db_url, migrate=False)
    try:
        return {t.id: t.state for s in store.get_job(job_id).stages for t in s.tasks}
    finally:
        store.close()


def test_master_restart_requeues_offers_and_expired_leases(farm: LocalFarm, db_url: str) -> None:
    farm.start_master()
    with HerderClient(farm.url, timeout=5) as client:
        job = client.submit_job(
            JobSubmit(
                name="recover",
                idempotency_key="recover-1",
                stages=[
                    StageSpec(name="s", tasks=[TaskSpec(command=f"echo {i}") for i in range(4)])
                ],
            )
        )
        client.register_agent(AgentRegister(agent_id="fake", name="fake", hostname="h", slots=4))
        offers = client.claim("fake", ClaimRequest(max_tasks=4)).offers
        assert len(offers) == 4
        running, unacked = offers[:2], offers[2:]
        for o in running:
            client.ack(o.attempt_id, o.token)

        assert farm.master is not None
        farm.master.kill9()
        # While no master runs, nothing is requeued.
        time.sleep(LEASE_S + 1.0)
        states = task_states(db_url, job.id)
        assert sorted(states.values()) == ["offered", "offered", "running", "running"]

        farm.start_master()  # returns once /health answers: recovery ran before serving
        states = task_states(db_url, job.id)
        assert set(states.values()) == {"queued"}, states
        assert farm.master is not None and "requeued=4" in farm.master.log_text()

        events = client.job_events(job.id)
        kinds = Counter(e.kind for e in events)
        assert kinds["task.offer_expired"] == 2 and kinds["task.lease_expired"] == 2
        for e in events:
            if e.kind in ("task.offer_expired", "task.lease_expired"):
                assert e.agent_id == "fake" and e.attempt_id is not None and e.to_state == "queued"
        by_attempt = {e.attempt_id: e.kind for e in events if e.kind.endswith("expired")}
        assert {by_attempt[o.attempt_id] for o in running} == {"task.lease_expired"}
        assert {by_attempt[o.attempt_id] for o in unacked} == {"task.offer_expired"}

        # The tasks are claimable again and complete exactly once.
        again = client.claim("fake", ClaimRequest(max_tasks=4)).offers
        assert sorted(o.task_id for o in again) == sorted(o.task_id for o in offers)
        for o in again:
            assert client.complete(ok(o)).result == "accepted"
        for o in offers:  # the attempts from before the crash are stale
            with pytest.raises(StaleAttemptError):
                client.complete(ok(o))
        with pytest.raises(StaleAttemptError):  # and a completion is never taken twice
            client.complete(ok(again[0]))

        done = client.get_job(job.id)
        assert done.state == "succeeded"
        for stage in done.stages:
            for t in stage.tasks:
                assert [a.state for a in t.attempts].count("succeeded") == 1
        succeeded = Counter(
            e.task_id for e in client.job_events(job.id) if e.kind == "task.succeed"
        )
        assert sorted(succeeded.values()) == [1, 1, 1, 1]


def test_graceful_stop_hands_maintenance_over(farm: LocalFarm, db_url: str) -> None:
    farm.start_master()
    # The master reaps (and so holds the lock) within a reap interval.
    store = Store.open(db_url, migrate=False)
    try:
        deadline = time.monotonic() + 10
        while (holder := store.lock_holder()) is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert holder[0].endswith(f":{farm.port}")
        assert holder[1] > store.db_now()
        assert farm.master is not None
        farm.master.stop()
        after = store.lock_holder()
        assert after is not None and after[1] <= store.db_now()  # released, not left to time out
    finally:
        store.close()
