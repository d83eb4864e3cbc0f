"""Chaos 2: a network partition cuts one agent off past its lease (issue 4, DESIGN §5).

Agent A reaches the master only through a fault proxy (tests/faultproxy.py).
A takes both tasks of a job: ``finisher`` (5 s on A) and ``sleeper`` (120 s
on A; both take a fraction of a second elsewhere: the durations come from
the agent's environment). Each task writes its pids to a directory outside
its sandbox. Then the proxy blackholes A's link; agent B starts, connected
directly. A's leases expire (the master's clock), both tasks are requeued
and B runs them to success. Meanwhile A's ``finisher`` ends and its result
cannot be delivered. When the link heals:

* A's late completion of ``finisher`` is refused as stale (seen on the wire,
  in the proxy's recording of what the master told A) and changes nothing:
  the job's event log is the same before and after the heal;
* A's ``sleeper`` process (and its child) is killed: the master's answer to
  A's heartbeat says it no longer owns the attempt;
* exactly one succeeded attempt per task (B's), A's attempts are not
  succeeded, the event paths are legal and fenced, and the outputs are B's
  correct bytes.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from chaoslib import fetch_events, pid_gone, sha, summary_line, wait_until
from invariants import assert_no_violations, check_job, check_outputs

from conftest import MakeFarm
from faultproxy import FaultProxy
from herder.api_models import JobSubmit, JobView
from herder.client import HerderClient

A_ENV = {"CHAOS_FINISH_S": "5", "CHAOS_LONG_S": "120"}


def read_pids(path: Path) -> list[int] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    if not text.endswith("\n"):
        return None  # still being written
    return [int(x) for x in text.split()]


def stale_answer_seen(wire: bytes, attempt_id: int) -> bool:
    """The master answered ``stale`` for this attempt (a claim result or a 409 body)."""
    pattern = rb'"attempt_id"\s*:\s*%d\s*,\s*"result"\s*:\s*"stale"' % attempt_id
    return re.search(pattern, wire) is not None


def current_attempt(job: JobView, name: str) -> tuple[int, str | None, str] | None:
    for s in job.stages:
        for t in s.tasks:
            if t.name == name and t.attempts:
                a = max(t.attempts, key=lambda a: a.number)
                return a.id, a.agent_id, t.state
    return None


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_partition_reruns_elsewhere_and_fences_the_old_agent(
    make_farm: MakeFarm, db_name: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    pids = tmp_path / "pids"
    pids.mkdir()
    cf = make_farm(lease_s=3.0, ack_timeout_s=3.0, log_level="info")
    proxy = FaultProxy(cf.farm.port)
    try:
        cf.start_agent("A", slots=2, master_url=proxy.url, env=A_ENV)
        cf.farm.wait_agents(1)
        inputs = {"finisher": b"finish me\n", "sleeper": b"sleep on it\n"}
        commands = {
            "finisher": (
                f'echo "$$" > {pids}/finisher-$HERDER_ATTEMPT_ID; '
                "sleep ${CHAOS_FINISH_S:-0.2}; "
                "mkdir -p out && tr a-z A-Z < in/finisher.txt > out/finisher.txt"
            ),
            "sleeper": (
                "sleep ${CHAOS_LONG_S:-0.2} & "
                f'echo "$$ $!" > {pids}/sleeper-$HERDER_ATTEMPT_ID; wait; '
                "mkdir -p out && tr a-z A-Z < in/sleeper.txt > out/sleeper.txt"
            ),
        }
        with HerderClient(cf.url, timeout=10) as client:
            for data in inputs.values():
                client.put_blob(sha(data), data)
            spec = JobSubmit.model_validate(
                {
                    "name": "partition",
                    "stages": [
                        {
                            "name": "s",
                            "tasks": [
                                {
                                    "name": name,
                                    "command": commands[name],
                                    "requires": [
                                        {"path": f"in/{name}.txt", "digest": sha(inputs[name])}
                                    ],
                                }
                                for name in ("finisher", "sleeper")
                            ],
                        }
                    ],
                }
            )
            job_id = client.submit_job(spec).id
            a_id = client.list_agents()[0].id

            # 1. A runs both tasks (acknowledged, processes started).
            def both_running_on_a() -> dict[str, int] | None:
                job = client.get_job(job_id)
                out = {}
                for name in ("finisher", "sleeper"):
                    cur = current_attempt(job, name)
                    if cur is None or cur[1] != a_id or cur[2] != "running":
                        return None
                    out[name] = cur[0]
                return out

            a_attempts = wait_until(both_running_on_a, 30, "both tasks running on agent A")
            fin_pid = wait_until(
                lambda: read_pids(pids / f"finisher-{a_attempts['finisher']}"), 10, "finisher pid"
            )[0]
            sleeper_pids = wait_until(
                lambda: read_pids(pids / f"sleeper-{a_attempts['sleeper']}"), 10, "sleeper pids"
            )

            # 2. Partition A; B joins directly. A's leases run out, B re-runs both.
            proxy.cut("blackhole")
            t_cut = time.monotonic()
            cf.start_agent("B", slots=2)

            def succeeded() -> JobView | None:
                j = client.get_job(job_id)
                return j if j.state == "succeeded" else None

            job = wait_until(
                succeeded,
                60,
                "the job to succeed on agent B",
                interval=0.2,
            )
            t_rerun = time.monotonic() - t_cut
            for name in ("finisher", "sleeper"):
                cur = current_attempt(job, name)
                assert cur is not None and cur[1] != a_id, f"{name} did not re-run elsewhere"

            # A's finisher is done too (its result waits, undeliverable); the
            # sleeper still runs on A: the heal must be what stops it.
            wait_until(lambda: pid_gone(fin_pid), 20, "A's finisher process to end")
            time.sleep(0.5)  # let A try (and fail) to deliver it
            assert not any(pid_gone(p) for p in sleeper_pids), (
                "A's sleeper died before the heal: nothing left to check"
            )
            events_before = fetch_events(client, job_id)
            assert not stale_answer_seen(proxy.downstream(), a_attempts["finisher"])

            # 3. Heal: the old agent's completion is refused, its process killed.
            proxy.heal()
            t_heal = time.monotonic()
            wait_until(
                lambda: all(pid_gone(p) for p in sleeper_pids),
                20,
                f"A's sleeper processes {sleeper_pids} to be killed after the heal",
            )
            t_killed = time.monotonic() - t_heal
            wait_until(
                lambda: stale_answer_seen(proxy.downstream(), a_attempts["finisher"]),
                40,
                f"the master to refuse A's late completion of attempt {a_attempts['finisher']} "
                "as stale",
            )
            t_refused = time.monotonic() - t_heal
            time.sleep(1.0)  # anything the late delivery might (wrongly) commit lands now

            job = client.get_job(job_id)
            events = fetch_events(client, job_id)
            assert [e.id for e in events] == [e.id for e in events_before], (
                "events were recorded after the heal: "
                + "; ".join(
                    f"{e.kind} {e.from_state}->{e.to_state} attempt {e.attempt_id}"
                    for e in events[len(events_before) :]
                )
            )
            summary = check_job(job, events)
            by_name = {t.name: t for s in job.stages for t in s.tasks}
            expected = {
                by_name[n].id: {f"out/{n}.txt": inputs[n].upper()} for n in ("finisher", "sleeper")
            }
            summary.violations += check_outputs(job, expected, client.get_blob)
            for name, aid in a_attempts.items():
                a_att = next(a for a in by_name[name].attempts if a.id == aid)
                if a_att.state == "succeeded":
                    summary.violations.append(f"A's attempt {aid} of {name} is succeeded")
                requeued = [
                    e for e in events if e.attempt_id == aid and e.kind == "task.lease_expired"
                ]
                if len(requeued) != 1:
                    summary.violations.append(
                        f"A's attempt {aid} of {name}: {len(requeued)} lease_expired events"
                    )
        assert cf.agent_procs["A"].alive(), "agent A died"
    finally:
        proxy.close()

    print()
    print(
        summary_line(
            "partition",
            db_name,
            tasks=summary.tasks,
            attempts=summary.attempts,
            requeues=dict(summary.requeues),
            rerun_after_cut=f"{t_rerun:.1f}s",
            killed_after_heal=f"{t_killed:.1f}s",
            refused_after_heal=f"{t_refused:.1f}s",
            proxy=f"accepted={proxy.stats.accepted},reset={proxy.stats.reset},held={proxy.stats.held}",
            tracebacks=cf.tracebacks(),
            duration=f"{time.monotonic() - started:.1f}s",
        )
    )
    assert_no_violations(summary.violations)
    assert cf.tracebacks() == {}, cf.traceback_excerpts()
