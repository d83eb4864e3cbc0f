"""Chaos 6: an agent killed (SIGKILL) while it holds offers it claimed ahead (DESIGN §5, §10).

Short tasks open an agent's claim-ahead window: it holds offers beyond its
slots, waiting in its ready queue. Agent A (2 slots, the default window) runs
a job of short tasks until it holds more of them than it has slots, and is
then killed with SIGKILL: the offers it claimed ahead die with it, unstarted.
Agent B then joins. The claimed-ahead offers are leased and fenced like any
other: the master takes them back when their ack deadline or lease runs out,
B runs them, and every invariant of ``invariants.py`` holds: every task
succeeded exactly once, with the right output bytes, along a legal path of
events, no completion accepted from a non-current attempt.

That the kill did hit claimed-ahead offers is checked from the outcome, not
assumed: A's attempts cut by the kill (neither succeeded nor released) must
outnumber its slots, since at most ``slots`` of them were running.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from chaoslib import fetch_events, sha, summary_line, wait_job, wait_until
from invariants import assert_no_violations, check_job, check_outputs

from conftest import MakeFarm
from herder.api_models import JobSubmit
from herder.client import HerderClient

N_TASKS = 120
SLOTS = 2


def held_by(client: HerderClient, job_id: int, agent_id: str) -> int:
    """Tasks of the job offered to or running on ``agent_id`` right now."""
    job = client.get_job(job_id)
    return sum(
        1
        for s in job.stages
        for t in s.tasks
        if t.state in ("offered", "running")
        and t.attempts
        and t.attempts[-1].agent_id == agent_id
        and t.attempts[-1].state in ("offered", "running")
    )


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_an_agent_killed_with_claimed_ahead_offers_loses_none(
    make_farm: MakeFarm, db_name: str
) -> None:
    started = time.monotonic()
    cf = make_farm(lease_s=3.0, ack_timeout_s=3.0, log_level="info")
    cf.start_agent("A", slots=SLOTS)
    cf.farm.wait_agents(1)
    with HerderClient(cf.url, timeout=10) as client:
        a_id = client.list_agents()[0].id
        spec = JobSubmit.model_validate(
            {
                "name": "claim-ahead-kill",
                "stages": [
                    {
                        "name": "s",
                        "tasks": [
                            {"name": f"t{i}", "command": f"sleep 0.05 && echo {i} > out.txt"}
                            for i in range(N_TASKS)
                        ],
                    }
                ],
            }
        )
        job_id = client.submit_job(spec).id

        # The window opens once A's recent tasks are short; then it holds more
        # than it runs. (The job lasts about 3 s on A alone.)
        def beyond_slots() -> int | None:
            n = held_by(client, job_id, a_id)
            return n if n > SLOTS + 1 else None

        peak = wait_until(
            beyond_slots,
            30,
            "agent A to hold offers claimed ahead beyond its slots",
            interval=0.02,
        )
        cf.kill_agent("A")
        cf.start_agent("B", slots=SLOTS)
        job = wait_job(client, job_id, timeout=90)
        events = fetch_events(client, job_id)

    summary = check_job(job, events)
    tasks = [t for s in job.stages for t in s.tasks]
    summary.violations += check_outputs(
        job,
        {t.id: {"out.txt": f"{t.name[1:]}\n".encode()} for t in tasks},
        lambda digest: _blob(cf.url, digest),
    )
    # An attempt A released before the kill (its window closed under load) was
    # not cut: its task was requeued while A lived, and A may have run it.
    cut = [
        (t.id, a)
        for t in tasks
        for a in t.attempts
        if a.agent_id == a_id and a.state not in ("succeeded", "released")
    ]
    if len(cut) <= SLOTS:
        summary.violations.append(
            f"the kill cut {len(cut)} of A's attempts, not more than its {SLOTS} slots: "
            "it held no offer claimed ahead when it died"
        )
    rerun = {task_id for task_id, _a in cut}
    b_ok = {
        t.id
        for t in tasks
        for a in t.attempts
        if a.state == "succeeded" and a.agent_id != a_id and t.id in rerun
    }
    if b_ok != rerun:
        summary.violations.append(
            f"tasks whose attempt on A was cut but that B did not run to success: "
            f"{sorted(rerun - b_ok)}"
        )

    print()
    print(
        summary_line(
            "claim-ahead-kill",
            db_name,
            tasks=summary.tasks,
            attempts=summary.attempts,
            held_at_kill=peak,
            cut=len(cut),
            cut_states=dict(Counter(a.state for _t, a in cut)),
            requeues=dict(summary.requeues),
            tracebacks=cf.tracebacks(),
            duration=f"{time.monotonic() - started:.1f}s",
        )
    )
    assert_no_violations(summary.violations)
    assert cf.tracebacks() == {}, cf.traceback_excerpts()


def _blob(url: str, digest: str) -> bytes:
    with HerderClient(url, timeout=10) as client:
        data = client.get_blob(digest)
    assert sha(data) == digest
    return data
