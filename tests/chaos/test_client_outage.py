"""Chaos: `herder run --master` rides out master outages (issue 9).

``test_run_survives_a_kill_storm``: the public CLI (the ``herder`` console
script, as a subprocess) follows a 300-action Rakefile — each action sleeps a
seeded random 0-300 ms and writes ``out/i.txt`` = the sha256 of its input
``in/i.txt``, as in test_kill_storm.py — while the storm of test_kill_storm.py
(chaoslib's ``Killer``, with 5 master kills instead of 3) kills agents 20 times and
masters 5 times. On SQLite one master is killed and restarted on the same
database; on PostgreSQL two masters share the database, both in the client's
``--master`` list and the agents', and are killed in turn. The run must exit
0 with every output byte-correct in the working directory, and every task
committed exactly once (invariants.py).

``test_run_gives_up_after_the_master_timeout``: no master for longer than
``--master-timeout 3s`` → the documented message and exit status 75, nothing
cancelled: once a master is back the job runs to the end in the farm.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from chaoslib import Killer, fetch_events, job_counts, summary_line, wait_job, wait_until
from invariants import assert_no_violations, check_job, check_outputs
from test_kill_storm import (
    AGENT_KILLS,
    AGENTS,
    N_TASKS,
    SLOTS,
    _seed,
    expected_output,
    task_command,
    task_input,
)

from conftest import MakeFarm
from herder.client import HerderClient
from waiting import until_file

MASTER_KILLS = 5
HERDER = Path(sys.executable).parent / "herder"  # the console script a user runs


def write_build(root: Path, seed: int, rng: random.Random) -> dict[int, bytes]:
    """The Rakefile and its inputs; returns each action's input bytes."""
    (root / "in").mkdir(parents=True)
    inputs = {i: task_input(i, seed) for i in range(N_TASKS)}
    lines = ["work:"]
    for i, data in inputs.items():
        (root / "in" / f"{i}.txt").write_bytes(data)
        lines.append(f"\tremote-{task_command(i, rng.randint(0, 300))}")
        lines.append(f"\t\trequires in/{i}.txt")
    (root / "Rakefile").write_text("\n".join(lines) + "\n")
    return inputs


def start_run(
    build: Path, masters: list[str], *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    run_env = dict(os.environ)
    for name in ("HERDER_MASTER", "HERDER_MASTER_TIMEOUT"):
        run_env.pop(name, None)
    run_env.update(env or {})
    argv = [str(HERDER), "run", "--master", ",".join(masters), "--chdir", str(build), *extra]
    with open(build.parent / "run.out", "wb") as out, open(build.parent / "run.err", "wb") as err:
        return subprocess.Popen(
            [*argv, "Rakefile"], stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=run_env
        )


def run_output(build: Path) -> tuple[str, str]:
    out = (build.parent / "run.out").read_text(errors="replace")
    err = (build.parent / "run.err").read_text(errors="replace")
    return out, err


def the_job(urls: list[str]) -> int | None:
    """The id of the farm's only job (the build's), from any master that answers."""
    for url in urls:
        try:
            r = httpx.get(f"{url}/api/v1/jobs", timeout=2.0)
        except httpx.HTTPError:
            continue
        if r.status_code == 200 and r.json()["jobs"]:
            return int(r.json()["jobs"][0]["id"])
    return None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_survives_a_kill_storm(make_farm: MakeFarm, db_name: str, tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    started = time.monotonic()
    cf = make_farm(lease_s=3.0, ack_timeout_s=3.0, log_level="warning")
    slots = SLOTS
    if db_name == "postgresql":
        cf.add_master()  # killed in turn with the first
        # The other master carries the farm through each kill, so nothing stalls:
        # one slot per agent keeps the build running longer than the storm.
        slots = 1
    cf.agent_masters = ",".join(cf.urls)
    for name in AGENTS:
        cf.start_agent(name, slots=slots)
    cf.farm.wait_agents(len(AGENTS))

    build = tmp_path / "build"
    inputs = write_build(build, seed, rng)
    proc = start_run(build, cf.urls)
    killer: Killer | None = None
    try:
        job_id = wait_until(lambda: the_job(cf.urls), 60, "the build's job to be submitted")
        killer = Killer(
            cf,
            job_id,
            rng,
            n_tasks=N_TASKS,
            agents=AGENTS,
            slots=slots,
            agent_kills=AGENT_KILLS,
            master_kills=MASTER_KILLS,
            # With two masters the other one carries the farm meanwhile.
            restart_in_background=len(cf.masters) > 1,
        )
        killer.start()
        rc = proc.wait(timeout=180)
    finally:
        if killer is not None:
            killer.stop_flag.set()
            killer.join(timeout=60)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    run_s = time.monotonic() - started
    out, err = run_output(build)
    assert rc == 0, (
        f"herder run exited {rc}\n--- stderr ---\n{err[-4000:]}\n--- stdout ---\n{out[-3000:]}"
    )
    assert killer.error is None, killer.error
    cf.check_master()
    assert cf.master_crashes == [], f"masters exited on their own: {cf.master_crashes}"
    assert (cf.agent_kills, cf.master_kills) == (AGENT_KILLS, MASTER_KILLS), (
        "the build finished before the storm did: " + " ".join(killer.log)
    )
    # Every output reached the working directory, byte for byte.
    wrong = [
        i
        for i, data in inputs.items()
        if not (build / "out" / f"{i}.txt").is_file()
        or (build / "out" / f"{i}.txt").read_bytes() != expected_output(data)
    ]
    assert wrong == [], f"{len(wrong)} outputs missing or wrong, e.g. out/{wrong[0]}.txt"
    assert f"build succeeded: {N_TASKS} action(s)" in out
    lost = [line for line in err.splitlines() if line.startswith("herder: lost the master at")]
    back = [line for line in err.splitlines() if line.startswith("herder: master ")]
    assert len(lost) == len(back), err  # each outage announced once, and its end
    assert "Traceback" not in err

    with HerderClient(cf.urls, timeout=10) as client:
        job = client.get_job(job_id)
        events = fetch_events(client, job_id)
        summary = check_job(job, events)
        by_name = {t.name: t for s in job.stages for t in s.tasks}
        expected = {
            by_name[f"work[{i}]"].id: {f"out/{i}.txt": expected_output(inputs[i])}
            for i in range(N_TASKS)
        }
        summary.violations += check_outputs(job, expected, client.get_blob)

    print()
    print(f"[chaos] client-outage kills (time:victim@tasks done): {' '.join(killer.log)}")
    print(
        summary_line(
            "client-outage",
            db_name,
            seed=seed,
            masters=len(cf.masters),
            tasks=summary.tasks,
            attempts=summary.attempts,
            agent_kills=cf.agent_kills,
            master_kills=cf.master_kills,
            client_outages=len(lost),
            master_start_s=cf.master_start_s,
            requeues=summary.requeue_total(),
            tracebacks=cf.tracebacks(),
            duration=f"{run_s:.1f}s",
        )
    )
    assert_no_violations(summary.violations)
    assert cf.tracebacks() == {}, cf.traceback_excerpts()
    assert summary.tasks == N_TASKS
    if len(cf.masters) == 1:
        # With one master every kill is an outage the client must have waited out.
        assert lost, "the client never saw the master go"


@pytest.mark.timeout(120)
def test_run_gives_up_after_the_master_timeout(
    make_farm: MakeFarm, db_name: str, tmp_path: Path
) -> None:
    cf = make_farm(lease_s=10.0, ack_timeout_s=10.0, log_level="warning")
    cf.start_agent("d0", slots=2)
    cf.farm.wait_agents(1)
    build = tmp_path / "build"
    build.mkdir()
    (build / "Rakefile").write_text(
        "work:\n" + "".join(f"\tremote-sleep 1.5 && echo {i} > out{i}.txt\n" for i in range(4))
    )
    proc = start_run(build, [cf.url], "--master-timeout", "3s")
    try:
        job_id = wait_until(lambda: the_job([cf.url]), 30, "the build's job to be submitted")
        wait_until(lambda: (job_counts(cf.url, job_id) or {}).get("running"), 30, "a task to start")
        cf.kill_master()
        killed = time.monotonic()
        rc = proc.wait(timeout=60)
        waited = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out, err = run_output(build)
    assert rc == 75, f"exit {rc}\n--- stderr ---\n{err}\n--- stdout ---\n{out[-2000:]}"
    assert 3.0 <= waited < 20, waited
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2, err
    # How the master was lost: a refused connection, or the long-poll it cut.
    assert re.fullmatch(
        rf"herder: lost the master at {re.escape(cf.url)} "
        r"\(connection (refused|reset|closed)\); waiting up to 3s for a master…",
        lines[0],
    ), lines[0]
    assert lines[1] == (
        f"herder: no master answered for 3s (tried: {cf.url} refused); job {job_id} goes on "
        f"in the farm — follow it with 'herder status {job_id} --master {cf.url}'"
    )

    # Nothing was cancelled: with a master back, the job runs to the end.
    cf.start_master()
    with HerderClient(cf.url, timeout=10) as client:
        job = wait_job(client, job_id, timeout=60)
        summary = check_job(job, fetch_events(client, job_id))
    assert_no_violations(summary.violations)
    print(summary_line("client-deadline", db_name, waited=f"{waited:.1f}s", state=job.state))


@pytest.mark.timeout(120)
def test_submit_wait_and_logs_follow_ride_a_master_restart(
    make_farm: MakeFarm, db_name: str, tmp_path: Path
) -> None:
    """`herder submit --wait` and `herder logs -f` wait for the master and resume where they were."""
    cf = make_farm(lease_s=10.0, ack_timeout_s=10.0, log_level="warning")
    cf.start_agent("w0", slots=2)
    cf.farm.wait_agents(1)
    # The tasks finish only once the master is back: the job must still run
    # at the kill, however long the clients took to start following it.
    gate = tmp_path / "gate"
    spec = {
        "name": "ride",
        "stages": [
            {
                "name": "s",
                "tasks": [
                    {
                        "name": f"t{i}",
                        "command": f"echo start-{i}; {until_file(gate)}; echo done-{i}",
                    }
                    for i in range(4)
                ],
            }
        ],
    }
    (tmp_path / "job.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_MASTER")}

    def herder(name: str, *args: str) -> subprocess.Popen[bytes]:
        with (
            open(tmp_path / f"{name}.out", "wb") as out,
            open(tmp_path / f"{name}.err", "wb") as err,
        ):
            return subprocess.Popen(
                [str(HERDER), *args, "--master", cf.url],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=tmp_path,
            )

    def text(name: str) -> str:
        return (tmp_path / name).read_text(errors="replace")

    submit = herder("submit", "submit", "job.json", "--wait")
    procs = [submit]
    try:
        job_id = wait_until(lambda: the_job([cf.url]), 30, "the job to be submitted")
        wait_until(lambda: (job_counts(cf.url, job_id) or {}).get("running"), 30, "a task to run")
        procs.append(herder("logs", "logs", str(job_id), "-f"))
        wait_until(lambda: "start-" in text("logs.out"), 30, "`herder logs -f` to print output")
        cf.kill_master()
        for name in ("submit", "logs"):
            wait_until(
                lambda name=name: "herder: lost the master at" in text(f"{name}.err"),  # type: ignore[misc]
                30,
                f"`herder {name}` to announce the outage",
            )
        cf.start_master()
        gate.touch()
        rcs = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert rcs == [0, 0], (text("submit.err"), text("logs.err"))
    assert f"job {job_id} succeeded" in text("submit.out")
    for name in ("submit", "logs"):
        err = [line for line in text(f"{name}.err").splitlines() if line.strip()]
        assert len(err) == 2 and err[1].startswith(f"herder: master {cf.url} is back after"), err
    with HerderClient(cf.url, timeout=10) as client:
        job = client.get_job(job_id)
        summary = check_job(job, fetch_events(client, job_id))
    assert_no_violations(summary.violations)
    # The follow resumed from its offsets: each line printed once per attempt that wrote it.
    out = text("logs.out").splitlines()
    for task in job.stages[0].tasks:
        i = task.name.removeprefix("t") if task.name else "?"
        for word in ("start", "done"):
            n = out.count(f"[{task.name}] {word}-{i}")
            assert 1 <= n <= len(task.attempts), (task.name, word, n, out)
    print(summary_line("client-submit-logs", db_name, job=job_id, attempts=summary.attempts))
