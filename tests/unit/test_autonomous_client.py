"""herder.agent.autonomous without processes: policy parsing, backoff rounds, store routing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from herder.agent.autonomous import ModalClient, ReturnPolicy
from herder.api_models import AgentRegister, ClaimRequest, Heartbeat, JobSubmit, StageSpec, TaskSpec
from herder.client import NoMasterAvailable
from herder.localfarm import free_port
from herder.store import Store


def test_return_policy_parse() -> None:
    assert ReturnPolicy.parse("per-task") == ReturnPolicy("per-task")
    assert ReturnPolicy.parse("never") == ReturnPolicy("never")
    assert ReturnPolicy.parse("interval:2.5") == ReturnPolicy("interval", 2.5)
    assert str(ReturnPolicy.parse("interval:3")) == "interval:3"
    for bad in ("interval:0", "interval:x", "sometimes", ""):
        with pytest.raises(ValueError):
            ReturnPolicy.parse(bad)


def _dead_master() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_all_down_rounds_gate_every_thread(caplog: pytest.LogCaptureFixture) -> None:
    client = ModalClient([_dead_master()], timeout=1, backoff_base_s=0.5, backoff_max_s=2)
    try:
        with caplog.at_level(logging.WARNING, "herder.agent"):
            with pytest.raises(NoMasterAvailable):
                client.heartbeat("a", Heartbeat())
            # Within the round's wait: refused at once, with the rest of the wait.
            with pytest.raises(NoMasterAvailable) as info:
                client.claim("a", ClaimRequest(max_tasks=1))
            assert info.value.attempts == []
            assert info.value.retry_after is not None and info.value.retry_after <= 0.5
        lines = [r.getMessage() for r in caplog.records if "all_masters_down" in r.getMessage()]
        assert len(lines) == 1 and "ceiling_s=0.500" in lines[0] and "round=1" in lines[0]
        assert client.mode == "master"
        assert client.backoff.ceiling() == 1.0  # the next round's ceiling doubled
    finally:
        client.close()


def test_self_assign_claims_from_the_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    store = Store.open(url)
    job, _ = store.submit_job(
        JobSubmit(name="j", stages=[StageSpec(name="s", tasks=[TaskSpec(command="true")])])
    )
    changes: list[str] = []
    client = ModalClient(
        [_dead_master()],
        timeout=1,
        self_assign=True,
        db_url=url,
        return_policy="never",
        on_mode_change=changes.append,
    )
    try:
        view = client.register_agent(AgentRegister(name="a", hostname="h", slots=1))
        assert client.mode == "autonomous" and changes == ["autonomous"]
        assert view.mode == "autonomous"
        resp = client.claim(view.id, ClaimRequest(max_tasks=1))
        assert [o.task_id for o in resp.offers] == [job.stages[0].tasks[0].id]
        hb = client.heartbeat(view.id, Heartbeat())
        assert hb.lease_s > 0
        assert store.get_agent(view.id).mode == "autonomous"
        client.request_master_mode()
        assert client.mode == "master"
    finally:
        client.close()
        store.close()
