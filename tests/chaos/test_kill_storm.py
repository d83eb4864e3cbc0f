"""Chaos 1: a 300-task job under a storm of kill -9 (issue 4, DESIGN §5).

Three agents x two slots run 300 tasks; each task sleeps a pseudo-random
200-600 ms (drawn from a seed, so a run can be replayed with CHAOS_SEED) and
writes ``out/i.txt`` = the sha256 of its own input blob ``in/i.txt``. A killer
thread sends SIGKILL to a random agent 20 times (restarting it at once with
the same state dir, so the same agent id) and to the master 3 times
(restarting it on the same port and database). The kills are spread over the
job's progress (kill k waits until about k/23 of 80 % of the tasks are done),
and the tasks are long enough that the job outlasts the blows (each takes
about 0.8 s: a kill, a restart, a pause), so all 23 land while the job runs.

Then every invariant of ``invariants.py`` must hold: every task succeeded
exactly once with exactly one succeeded attempt, every output has the right
bytes in the blob store, and the event log is a legal path per task with no
double success and no completion accepted from a non-current attempt.
"""

from __future__ import annotations

import os
import random
import time

import chaoslib
import pytest
from chaoslib import ChaosFarm, fetch_events, sha, summary_line, wait_job
from invariants import assert_no_violations, check_job, check_outputs

from conftest import MakeFarm
from herder.api_models import JobSubmit
from herder.client import HerderClient

N_TASKS = 300
AGENTS = ("k0", "k1", "k2")
SLOTS = 2
AGENT_KILLS = 20
MASTER_KILLS = 3


def _seed() -> int:
    return int(os.environ.get("CHAOS_SEED", "20240404"))


def task_input(i: int, seed: int) -> bytes:
    return f"chaos input {i} seed {seed}\n".encode() * (1 + i % 7)


def expected_output(data: bytes) -> bytes:
    return (sha(data) + "\n").encode()


def task_command(i: int, sleep_ms: int) -> str:
    return (
        f"sleep {sleep_ms / 1000:.3f} && mkdir -p out && "
        f"sha256sum < in/{i}.txt | cut -d' ' -f1 > out/{i}.txt"
    )


class Killer(chaoslib.Killer):
    """The storm of this test: chaoslib's killer with its numbers."""

    def __init__(self, cf: ChaosFarm, job_id: int, rng: random.Random) -> None:
        super().__init__(
            cf,
            job_id,
            rng,
            n_tasks=N_TASKS,
            agents=AGENTS,
            slots=SLOTS,
            agent_kills=AGENT_KILLS,
            master_kills=MASTER_KILLS,
        )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_storm(make_farm: MakeFarm, db_name: str) -> None:
    seed = _seed()
    rng = random.Random(seed)
    started = time.monotonic()
    cf = make_farm(lease_s=3.0, ack_timeout_s=3.0, log_level="warning")
    for name in AGENTS:
        cf.start_agent(name, slots=SLOTS)
    cf.farm.wait_agents(len(AGENTS))

    inputs = {i: task_input(i, seed) for i in range(N_TASKS)}
    # Long enough that the job outlasts its storm (23 blows, about 0.8 s each).
    sleeps = {i: rng.randint(200, 600) for i in range(N_TASKS)}
    with HerderClient(cf.url, timeout=10) as client:
        for data in inputs.values():
            client.put_blob(sha(data), data)
        spec = JobSubmit.model_validate(
            {
                "name": "kill-storm",
                "idempotency_key": f"kill-storm-{seed}",
                "stages": [
                    {
                        "name": "work",
                        "tasks": [
                            {
                                "name": f"t{i}",
                                "command": task_command(i, sleeps[i]),
                                "requires": [{"path": f"in/{i}.txt", "digest": sha(inputs[i])}],
                            }
                            for i in range(N_TASKS)
                        ],
                    }
                ],
            }
        )
        job = client.submit_job(spec)
        killer = Killer(cf, job.id, rng)
        killer.start()
        try:
            job = wait_job(client, job.id, timeout=180)
        finally:
            killer.stop_flag.set()
            killer.join(timeout=60)
        run_s = time.monotonic() - started
        if killer.error is not None:
            raise killer.error
        cf.check_master()
        assert cf.master_crashes == [], f"masters exited on their own: {cf.master_crashes}"
        # All the chaos happened while the job ran.
        assert (cf.agent_kills, cf.master_kills) == (AGENT_KILLS, MASTER_KILLS), (
            "the job finished before the storm did: " + " ".join(killer.log)
        )

        # A final view from a master that is certainly up.
        job = client.get_job(job.id)
        events = fetch_events(client, job.id)
        summary = check_job(job, events)
        by_name = {t.name: t for s in job.stages for t in s.tasks}
        expected = {
            by_name[f"t{i}"].id: {f"out/{i}.txt": expected_output(inputs[i])}
            for i in range(N_TASKS)
        }
        summary.violations += check_outputs(job, expected, client.get_blob)

    print()
    print(f"[chaos] kill-storm kills (time:victim@tasks done): {' '.join(killer.log)}")
    print(
        summary_line(
            "kill-storm",
            db_name,
            seed=seed,
            tasks=summary.tasks,
            attempts=summary.attempts,
            events=summary.events,
            agent_kills=cf.agent_kills,
            master_kills=cf.master_kills,
            master_start_s=cf.master_start_s,
            requeues=summary.requeue_total(),
            by_kind=dict(summary.requeues),
            by_reason=dict(summary.reasons),
            tracebacks=cf.tracebacks(),
            duration=f"{run_s:.1f}s",
        )
    )
    assert_no_violations(summary.violations)
    assert cf.tracebacks() == {}, cf.traceback_excerpts()
    assert summary.tasks == N_TASKS
    # Killing agents mid-task must have cost some attempts: otherwise nothing was tested.
    assert summary.requeue_total() > 0, "the kills caused no requeue at all"
