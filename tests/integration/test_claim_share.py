"""Claim-ahead leaves idle agents their share (MasterService._fair_share; DESIGN §10).

A stage of short tasks that unblocks inside one agent's claim would otherwise
go whole to that agent's claim-ahead window while the other agents sit parked.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from herder.api_models import AgentRegister
from herder.master.service import MasterService
from herder.store import Store
from storekit import job, make_store, tasks


@pytest.fixture
def service(db_url: str) -> Iterator[MasterService]:
    store = make_store(db_url)
    try:
        yield MasterService(store)
    finally:
        store.close()


def _agent(store: Store, name: str) -> str:
    view, _ = store.register_agent(AgentRegister(name=name, hostname="host", slots=2))
    return view.id


def test_parked_agents_leave_each_claim_a_share(service: MasterService) -> None:
    a, b, c = (_agent(service.store, n) for n in ("a", "b", "c"))
    service.submit(job(tasks(50)))

    with service.parking(b):
        first = service.claim_once(a, 64)
        assert len(first.offers) == 32  # half: b waits for work here
        with service.parking(a), service.parking(c):
            # b's own parked claim does not count against it; a and c do.
            second = service.claim_once(b, 9)
        assert len(second.offers) == 3

    # Nobody else parked: the whole window, as the agent asked.
    rest = service.claim_once(c, 64)
    assert len(rest.offers) == 50 - 32 - 3
    offered = [o.task_id for o in first.offers + second.offers + rest.offers]
    assert len(set(offered)) == 50


def test_one_task_claims_are_never_cut(service: MasterService) -> None:
    a, b = (_agent(service.store, n) for n in ("a", "b"))
    service.submit(job(tasks(3)))
    with service.parking(b):
        assert len(service.claim_once(a, 1).offers) == 1
