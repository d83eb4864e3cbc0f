"""Chaos 3: the master dies with offers outstanding and leases running (seeds/002).

A real agent R (3 slots) runs 3 tasks of an 8-task job; a fake agent (this
test, through ``HerderClient``) claims 4 more and acknowledges only 2, so at
the kill there are unacknowledged offers (the fake's 2), running leases
nobody renews (the fake's 2), running leases R renews (R's 3; on a very slow
machine one may still be an unacknowledged offer, and is then expected back
as one, or as a lease if its ack reached the master just before the kill)
and 1 queued task. R's tasks wait on a file the test creates only after the
kill, so they still run then, however slow the machine. The master is killed
with SIGKILL and restarted only after every ack deadline and lease has
passed. On start, before serving any claim, it must requeue:

* the unacknowledged offers (``task.offer_expired``, "offer not
  acknowledged in time"),
* the expired leases, the fake's and R's (``task.lease_expired``, "lease
  expired"),

so every such requeue event comes after the kill and before the first offer
the restarted master makes (the fake agent claims the moment the master
answers: a master that served claims before recovering would offer it the
queued task first; the fake then runs what it got properly: ack, upload,
complete). The fake's late ack and completion are refused (409 stale), so are
R's results of its requeued attempts, and every task succeeds exactly once
with the right output.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from chaoslib import fetch_events, sha, summary_line, wait_job, wait_until
from invariants import assert_no_violations, check_job, check_outputs

from conftest import MakeFarm
from herder.api_models import AgentRegister, ClaimRequest, Completion, JobSubmit, OutputFile
from herder.client import HerderClient, StaleAttemptError
from waiting import until_file

N_TASKS = 8
# Long enough that a loaded machine kills the master before the fake's offers
# and leases run out (the fake acks, the test looks at R's states, then kills).
LEASE_S = 6.0
ACK_S = 6.0


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_master_restart_requeues_offers_and_expired_leases_on_start(
    make_farm: MakeFarm, db_name: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    fast = tmp_path / "fast"
    cf = make_farm(lease_s=LEASE_S, ack_timeout_s=ACK_S, log_level="info")
    cf.start_agent("R", slots=3)
    cf.farm.wait_agents(1)
    inputs = {i: f"restart input {i}\n".encode() * (i + 1) for i in range(N_TASKS)}
    with HerderClient(cf.url, timeout=10) as client:
        r_id = client.list_agents()[0].id
        fake = client.register_agent(
            AgentRegister(name="fake", hostname=socket.gethostname(), slots=4)
        )
        for data in inputs.values():
            client.put_blob(sha(data), data)
        spec = JobSubmit.model_validate(
            {
                "name": "master-restart",
                "stages": [
                    {
                        "name": "s",
                        "tasks": [
                            {
                                "name": f"t{i}",
                                # Held until after the kill (R's tasks must still run
                                # then), fast after the restart (the re-runs).
                                "command": (
                                    f"{until_file(fast)} && tr a-z A-Z < in/{i}.txt > out{i}.txt"
                                ),
                                "requires": [{"path": f"in/{i}.txt", "digest": sha(inputs[i])}],
                            }
                            for i in range(N_TASKS)
                        ],
                    }
                ],
            }
        )
        job_id = client.submit_job(spec).id

        # R (long-polling) takes 3 at once; the fake claims 4 and acks 2.
        def r_has_three() -> bool:
            job = client.get_job(job_id)
            mine = [
                t
                for t in job.stages[0].tasks
                if t.attempts
                and t.attempts[-1].agent_id == r_id
                and t.state in ("offered", "running")
            ]
            return len(mine) == 3

        wait_until(r_has_three, 15, "agent R to take 3 tasks")
        offers = client.claim(fake.id, ClaimRequest(max_tasks=4)).offers
        t_claim = time.monotonic()
        assert len(offers) == 4, f"the fake agent got {len(offers)} offers, want 4"
        acked, unacked = offers[:2], offers[2:]
        for o in acked:
            client.ack(o.attempt_id, o.token)

        # Kill once R's tasks run (acknowledged), well before any deadline of
        # the fake's attempts; under heavy load an R task may still be offered.
        def r_states() -> dict[int, str]:
            job = client.get_job(job_id)
            return {
                t.attempts[-1].id: t.state
                for t in job.stages[0].tasks
                if t.attempts
                and t.attempts[-1].agent_id == r_id
                and t.state in ("offered", "running")
            }

        deadline = t_claim + ACK_S - 1.2
        r_at_kill = r_states()
        while time.monotonic() < deadline and set(r_at_kill.values()) != {"running"}:
            time.sleep(0.05)
            r_at_kill = r_states()
        assert len(r_at_kill) == 3, f"R holds {r_at_kill}, want 3 attempts"
        last_before = fetch_events(client, job_id)[-1].id
        cf.kill_master()
        t_kill = time.monotonic()
        assert t_kill - t_claim < ACK_S - 0.5, (
            "too slow: the offers may have expired before the kill"
        )

        # Down until every ack deadline and lease (renewed at the latest at the kill) passed.
        time.sleep(max(ACK_S, LEASE_S) + 1.5)
        fast.touch()
        cf.start_master()
        t_up = time.monotonic()
        # Claim at once, as an agent that never stopped polling would: a master
        # that served claims before recovering would offer the queued task
        # before requeueing anything. The fake then runs it properly.
        late = client.claim(fake.id, ClaimRequest(max_tasks=3)).offers
        assert late, "the restarted master offered nothing"
        for o in late:
            client.ack(o.attempt_id, o.token)
            i = int(o.requires[0].path.removeprefix("in/").removesuffix(".txt"))
            out = inputs[i].upper()
            client.put_blob(sha(out), out)
            result = client.complete(
                Completion(
                    attempt_id=o.attempt_id,
                    token=o.token,
                    outcome="exited",
                    exit_code=0,
                    outputs=[OutputFile(path=f"out{i}.txt", digest=sha(out), size=len(out))],
                )
            )
            assert result.result == "accepted" and result.task_state == "succeeded", result

        # The fake's late ack and completion are refused.
        refused: list[str] = []
        try:
            client.ack(unacked[0].attempt_id, unacked[0].token)
            refused.append(f"the expired offer {unacked[0].attempt_id} was acknowledged")
        except StaleAttemptError:
            pass
        try:
            client.complete(
                Completion(
                    attempt_id=acked[0].attempt_id,
                    token=acked[0].token,
                    outcome="exited",
                    exit_code=0,
                )
            )
            refused.append(f"the expired lease {acked[0].attempt_id} completed")
        except StaleAttemptError:
            pass

        job = wait_job(client, job_id, timeout=90)
        t_done = time.monotonic()
        events = fetch_events(client, job_id)
        summary = check_job(job, events)
        summary.violations += refused
        by_name = {t.name: t for t in job.stages[0].tasks}
        expected = {by_name[f"t{i}"].id: {f"out{i}.txt": inputs[i].upper()} for i in range(N_TASKS)}
        summary.violations += check_outputs(job, expected, client.get_blob)

    after = [e for e in events if e.id > last_before]
    post_offers = [e.id for e in after if e.kind == "task.offer"]
    first_offer = min(post_offers) if post_offers else None
    offer_expired = ("task.offer_expired", "offer not acknowledged in time")
    lease_expired = ("task.lease_expired", "lease expired")
    want: dict[int, list[tuple[str, str]]] = {
        **{o.attempt_id: [offer_expired] for o in unacked},
        **{o.attempt_id: [lease_expired] for o in acked},
        # An R attempt last seen offered may have been acknowledged between
        # that look and the kill: then its lease expired instead.
        **{
            aid: [lease_expired] if state == "running" else [offer_expired, lease_expired]
            for aid, state in r_at_kill.items()
        },
    }
    for aid, kinds in want.items():
        kind = " or ".join(k for k, _r in kinds)
        evs = [
            e
            for e in events
            if e.attempt_id == aid and e.kind in ("task.offer_expired", "task.lease_expired")
        ]
        if len(evs) != 1:
            summary.violations.append(f"attempt {aid}: {len(evs)} requeue events, want 1 {kind}")
            continue
        e = evs[0]
        if (e.kind, e.reason) not in kinds:
            summary.violations.append(
                f"attempt {aid}: requeued by {e.kind} ({e.reason!r}), want {kinds}"
            )
        if e.id <= last_before:
            summary.violations.append(f"attempt {aid}: requeued before the kill (event {e.id})")
        if first_offer is None or e.id > first_offer:
            summary.violations.append(
                f"attempt {aid}: requeued (event {e.id}) after the restarted master's first "
                f"offer (event {first_offer}): recovery did not run before serving claims"
            )
    # Every requeued task then ran once more, and R's late results were refused.
    for aid in want:
        task = next(t for t in job.stages[0].tasks if any(a.id == aid for a in t.attempts))
        att = next(a for a in task.attempts if a.id == aid)
        if att.state == "succeeded":
            summary.violations.append(f"requeued attempt {aid} is succeeded")

    print()
    print(
        summary_line(
            "master-restart",
            db_name,
            tasks=summary.tasks,
            attempts=summary.attempts,
            requeued_on_start=len(want),
            r_at_kill=sorted(r_at_kill.values()),
            requeues=dict(summary.requeues),
            master_kills=cf.master_kills,
            setup=f"{t_claim - started:.1f}s",
            down=f"{t_up - t_kill:.1f}s",
            finish_after_restart=f"{t_done - t_up:.1f}s",
            tracebacks=cf.tracebacks(),
            duration=f"{time.monotonic() - started:.1f}s",
        )
    )
    assert_no_violations(summary.violations)
    assert cf.tracebacks() == {}, cf.traceback_excerpts()
