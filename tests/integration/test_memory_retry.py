"""Memory-aware retry end to end (issue 13): a real master, a real agent, a real allocation.

A task that allocates 300 MB with ``ram_mb = 100`` is killed by its agent's
watch, requeued with 150, 225, then 338 MB (factor 1.5), and succeeds under
the last limit; its events and attempts say so. With a ceiling below what it
needs it fails with the reason. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from herder.api_models import JobSubmit, JobView, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.localfarm import LocalFarm

ALLOC = "b = bytearray(300 * 2**20); import time; time.sleep(2); print('done')"


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm", log_level="info")
    try:
        f.start_master()
        f.start_agent(slots=1, name="mem")
        f.wait_agents(1)
        yield f
    finally:
        f.close(at_once=True)


def _submit(client: HerderClient, ram_mb: int) -> JobView:
    return client.submit_job(
        JobSubmit(
            name="mem",
            stages=[
                StageSpec(
                    name="s",
                    tasks=[
                        TaskSpec(name="alloc", command=[sys.executable, "-c", ALLOC], ram_mb=ram_mb)
                    ],
                )
            ],
        )
    )


def _wait_done(client: HerderClient, job_id: int, timeout: float = 90.0) -> JobView:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {client.get_job(job_id).state} after {timeout}s")


def test_killed_past_its_ram_retried_with_more_until_it_fits(farm: LocalFarm) -> None:
    with HerderClient(farm.url, timeout=10) as client:
        job = _wait_done(client, _submit(client, 100).id)
        task = job.stages[0].tasks[0]
        assert job.state == "succeeded", (task, farm.agents[0].log_text()[-3000:])
        assert task.ram_mb == 338 and task.memory_failures == 3
        assert task.failures == 0  # memory failures have their own budget (max_attempts = 1)
        states = [a.state for a in task.attempts]
        assert states == ["failed", "failed", "failed", "succeeded"]
        for a, limit in zip(task.attempts[:3], (100, 150, 225), strict=True):
            assert a.error is not None and f"exceeded its ram_mb of {limit} MB" in a.error
            assert a.peak_rss_mb is not None and a.peak_rss_mb > limit * 1.1
            assert a.exit_code == 137
        last = task.attempts[3]
        assert last.peak_rss_mb is not None and 300 <= last.peak_rss_mb <= 338 * 1.1

        events = client.job_events(job.id)
        raised = [e for e in events if e.kind == "task.ram_raised"]
        assert len(raised) == 3
        # killed before its ack went out (the agent batches acks), or after: both
        assert all(
            e.from_state in ("offered", "running") and e.to_state == "queued" for e in raised
        )
        reasons = [e.reason or "" for e in raised]
        for reason, (old, new) in zip(reasons, [(100, 150), (150, 225), (225, 338)], strict=True):
            assert reason.startswith(f"exceeded {old} MB (peak ")
            assert reason.endswith(f" MB): retrying with {new} MB")
        assert [e.kind for e in events if e.kind.startswith("task.")][-1] == "task.succeed"


@pytest.fixture
def low_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    # The farm's processes inherit it: `herder master` reads HERDER_RAM_RETRY_CEILING_MB.
    monkeypatch.setenv("HERDER_RAM_RETRY_CEILING_MB", "200")


def test_past_the_ceiling_it_fails_with_the_reason(low_ceiling: None, farm: LocalFarm) -> None:
    with HerderClient(farm.url, timeout=10) as client:
        job = _wait_done(client, _submit(client, 100).id)
        task = job.stages[0].tasks[0]
        assert job.state == "failed"
        assert task.state == "failed" and task.ram_mb == 200 and task.memory_failures == 3
        assert [a.state for a in task.attempts] == ["failed"] * 3
        assert task.error is not None
        assert task.error.startswith("exceeded 200 MB (peak ")
        assert task.error.endswith("already at the RAM retry ceiling of 200 MB, not retrying")
        events = client.job_events(job.id)
        kinds = [e.kind for e in events if e.kind.startswith("task.") and e.kind != "task.offer"]
        assert kinds.count("task.ram_raised") == 2  # 100 → 150 → 200
        fail = [e for e in events if e.kind == "task.fail"]
        assert len(fail) == 1 and fail[0].reason == task.error
