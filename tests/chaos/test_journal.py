"""Chaos 4: an agent killed while its result waits in its journal (DESIGN §5).

The lease is long (60 s), so the original attempt stays current throughout.
Agent J runs one task (sleep, then write ``out.txt`` from its input, then
touch a marker outside the sandbox). While it runs, the master is killed
(SIGKILL): when the task ends, J cannot upload or deliver, so it keeps the
result in its journal (``<state_dir>/journal/``). Then J is killed (SIGKILL)
too. The master restarts, then J restarts with the same state dir: the
journaled completion must be delivered, once:

* the task succeeded on its *original* attempt (number 1, J's): it was not
  re-run, and no requeue happened;
* exactly one succeeded attempt, one ``task.succeed`` event, legal paths;
* the output's bytes are right (the journal kept the output until uploaded);
* killing and restarting J once more changes nothing (the entry is gone,
  or a replay is refused as stale).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from chaoslib import fetch_events, sha, summary_line, wait_job, wait_until
from invariants import assert_no_violations, check_job, check_outputs

from conftest import MakeFarm
from herder.api_models import JobSubmit
from herder.client import HerderClient


def journal_files(state_dir: Path) -> list[Path]:
    d = state_dir / "journal"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_journaled_result_survives_agent_kill_and_is_delivered_once(
    make_farm: MakeFarm, db_name: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    marker = tmp_path / "task-done"
    cf = make_farm(lease_s=60.0, ack_timeout_s=10.0, log_level="info")
    cf.start_agent("J", slots=1)
    cf.farm.wait_agents(1)
    data = b"journal me, please\n" * 3
    with HerderClient(cf.url, timeout=10) as client:
        client.put_blob(sha(data), data)
        spec = JobSubmit.model_validate(
            {
                "name": "journal",
                "stages": [
                    {
                        "name": "s",
                        "tasks": [
                            {
                                "name": "t",
                                "command": (
                                    "sleep 4 && tr a-z A-Z < in/data.txt > out.txt && "
                                    f"touch {marker}"
                                ),
                                "requires": [{"path": "in/data.txt", "digest": sha(data)}],
                            }
                        ],
                    }
                ],
            }
        )
        job_id = client.submit_job(spec).id
        j_id = client.list_agents()[0].id

        def running() -> int | None:
            task = client.get_job(job_id).stages[0].tasks[0]
            if task.state == "running" and task.attempts:
                return task.attempts[-1].id
            return None

        original = wait_until(running, 20, "the task to run on agent J")

        # The master dies while the task runs; the task ends; J journals its result.
        cf.kill_master()
        assert not marker.exists(), "the task ended before the master died: nothing to journal"
        wait_until(marker.exists, 20, "the task to finish")
        journaled = True
        try:
            wait_until(lambda: journal_files(cf.state_dir("J")), 8, "a journal entry")
        except AssertionError:
            journaled = False  # reported below; the delivery check decides
        time.sleep(0.3)  # the entry is complete once renamed into place; be generous
        cf.kill_agent("J")
        entries = [p.name for p in journal_files(cf.state_dir("J"))]
        assert entries, (
            f"agent J kept no journal entry under {cf.state_dir('J') / 'journal'} for its "
            f"undeliverable result (journal seen before the kill: {journaled})"
        )

        cf.start_master()
        cf.start_agent("J", slots=1)
        job = wait_job(client, job_id, timeout=60)
        events = fetch_events(client, job_id)

        # Once more: a restarted agent must not deliver it again.
        wait_until(lambda: not journal_files(cf.state_dir("J")), 15, "the journal to empty")
        cf.kill_agent("J")
        cf.start_agent("J", slots=1)
        time.sleep(3.0)
        events_again = fetch_events(client, job_id)
        job_again = client.get_job(job_id)

        summary = check_job(job, events)
        task = job.stages[0].tasks[0]
        summary.violations += check_outputs(
            job, {task.id: {"out.txt": data.upper()}}, client.get_blob
        )
        ok = [a for a in task.attempts if a.state == "succeeded"]
        if [a.id for a in ok] != [original]:
            summary.violations.append(
                f"the succeeded attempt is {[(a.id, a.number, a.agent_id) for a in ok]}, want the "
                f"original attempt {original} (journaled entries at the kill: {entries or 'none'}; "
                f"task attempts: {[(a.id, a.number, a.state, a.error) for a in task.attempts]})"
            )
        if len(task.attempts) != 1:
            summary.violations.append(f"the task ran {len(task.attempts)} times, want once")
        if summary.requeue_total():
            summary.violations.append(f"requeued: {dict(summary.reasons)}")
        if task.attempts and task.attempts[0].agent_id != j_id:
            summary.violations.append("the attempt is not agent J's")
        if [e.id for e in events_again] != [e.id for e in events] or job_again != job:
            summary.violations.append("the job changed after a second restart of the agent")

    print()
    print(
        summary_line(
            "journal",
            db_name,
            tasks=summary.tasks,
            attempts=summary.attempts,
            journal_at_kill=entries or "none",
            journal_seen=journaled,
            original_attempt=original,
            requeues=dict(summary.requeues),
            tracebacks=cf.tracebacks(),
            duration=f"{time.monotonic() - started:.1f}s",
        )
    )
    assert_no_violations(summary.violations)
    assert cf.tracebacks() == {}, cf.traceback_excerpts()
