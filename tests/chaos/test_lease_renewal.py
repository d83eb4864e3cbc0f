"""An agent renews the leases of the tasks it runs from its first minute on.

Regression test of a bug the chaos partition test found: the agent learns
the master's lease length from its first claim, but its heartbeat thread
computed its first wait from the default lease (30 s → 10 s) before that.
With a master lease of 2 s, a task longer than the lease that started right
after the agent lost its lease before the first heartbeat, was requeued and
ran again.

Here the lease is 5 s (heartbeats every 1.7 s: a loaded machine's stall does
not outlast it) and the task, submitted before the agent starts, runs 12 s,
past that first wait of 10 s: the bug would still lose the lease about 5 s in.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from chaoslib import ChaosFarm, fetch_events, summary_line, wait_job

from herder.api_models import JobSubmit
from herder.client import HerderClient
from herder.localfarm import LocalFarm


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_first_heartbeat_comes_within_the_masters_lease(tmp_path: Path) -> None:
    started = time.monotonic()
    cf = ChaosFarm(
        LocalFarm(workdir=tmp_path / "farm", lease_s=5.0, ack_timeout_s=5.0, log_level="info")
    )
    try:
        cf.start_master()
        with HerderClient(cf.url, timeout=10) as client:
            spec = JobSubmit.model_validate(
                {"name": "long", "stages": [{"name": "s", "tasks": [{"command": "sleep 12"}]}]}
            )
            job_id = client.submit_job(spec).id
            # Waiting already: the agent's first claim takes it, as early as the
            # bug's first heartbeat could be late, however slowly the agent starts.
            cf.start_agent("a", slots=1)
            cf.farm.wait_agents(1)
            job = wait_job(client, job_id, timeout=60)
            events = fetch_events(client, job.id)
    finally:
        cf.stop()
    task = job.stages[0].tasks[0]
    requeues = [
        (e.kind, e.reason)
        for e in events
        if e.kind.startswith("task.") and e.to_state == "queued" and e.from_state != "blocked"
    ]
    print()
    print(
        summary_line(
            "lease-renewal",
            "sqlite",
            attempts=len(task.attempts),
            requeues=requeues,
            duration=f"{time.monotonic() - started:.1f}s",
        )
    )
    assert job.state == "succeeded"
    assert requeues == [], f"a 12 s task under a 5 s lease lost its lease: {requeues}"
    assert len(task.attempts) == 1
