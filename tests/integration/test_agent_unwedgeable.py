"""No result, file name or journal entry can wedge an agent; one agent per state dir.

Real master and agent processes (``herder.localfarm``) on loopback, on SQLite
and PostgreSQL:

* tasks that leave outputs no store can hold (a name that is not UTF-8, a
  newline or a backslash in a name, a path longer than PATH_MAX, a declared
  FIFO, a declared symlink to a device outside the sandbox) fail alone, each
  with its reason, while a good job on the same agent succeeds; SIGTERM then
  stops the agent at once (it used to retry the bad completion for 33 s);
* journal entries an earlier run left that cannot be read (corrupt JSON, a
  completion with a non-UTF-8 name: what the bug wrote) are quarantined, one
  the master refuses (a lying inline blob) is delivered as a minimal failure
  without blocking the good entry sharing its request, and the agent serves
  new work;
* a second agent on the same ``--state-dir`` exits at once (status 2) with
  one clear line, while the first keeps working.
"""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from herder.api_models import AgentRegister, ClaimRequest, JobSubmit, JobView, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.localfarm import LocalFarm, Proc
from waiting import wait_for

FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm", log_level="info")
    try:
        f.start_master()
        yield f
    finally:
        f.close(at_once=True)


def _logs(farm: LocalFarm) -> str:
    assert farm.workdir is not None
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted(farm.workdir.glob("*.log"))
    )


def _submit(
    c: HerderClient, name: str, command: str | list[str], outputs: list[str] | None = None
) -> int:
    task = TaskSpec(command=command, outputs=outputs)
    return c.submit_job(JobSubmit(name=name, stages=[StageSpec(name="s", tasks=[task])])).id


def _finished(
    c: HerderClient, farm: LocalFarm, job_ids: list[int], timeout: float
) -> list[JobView]:
    def done() -> list[JobView] | None:
        jobs = [c.get_job(j) for j in job_ids]
        return jobs if all(j.state in FINAL for j in jobs) else None

    result: list[JobView] = wait_for(done, timeout, "the jobs to finish", lambda: _logs(farm))
    return result


def _stop_timed(proc: Proc, timeout: float = 20.0) -> tuple[int | None, float]:
    t0 = time.monotonic()
    proc.signal(signal.SIGTERM)
    rc = proc.wait(timeout)
    return rc, time.monotonic() - t0


# Each command leaves one thing that can never come back; (command, outputs, reason).
ATTACKS: dict[str, tuple[str | list[str], list[str] | None, str]] = {
    "not-utf8": (
        "mkdir out && touch \"out/$(printf '\\377')\"",
        None,
        "output name is not valid UTF-8: 'out/\\udcff' (bytes b'out/\\xff')",
    ),
    "newline": ("touch \"$(printf 'a\\nb')\"", None, "control character '\\n'"),
    "backslash": ("touch 'a\\b'", None, "output name contains a backslash"),
    "too-deep": (
        # 18 directories of 250 bytes: deeper than PATH_MAX (a shell's cd refuses that)
        [
            sys.executable,
            "-c",
            "import os\nfor _ in range(18): os.mkdir('d' * 250); "
            "os.chdir('d' * 250)\nopen('f', 'w').close()",
        ],
        None,
        "File name too long",
    ),
    "fifo": ("mkfifo pipe", ["pipe"], "pipe: declared output is a FIFO"),
    "device": ("ln -s /dev/zero zero", ["zero"], "path 'zero' is a symlink that points outside"),
}


@pytest.mark.timeout(180)
def test_bad_outputs_fail_their_own_task_and_the_agent_stops_at_once(farm: LocalFarm) -> None:
    agent = farm.start_agent(slots=2)
    farm.wait_agents(1)
    with HerderClient(farm.url, timeout=10) as c:
        bad = {name: _submit(c, name, cmd, outs) for name, (cmd, outs, _r) in ATTACKS.items()}
        # Undeclared FIFOs and devices are no outputs at all: skipped, never opened.
        good = _submit(c, "good", "mkfifo p && ln -s /dev/zero z && echo ok > good.txt")
        jobs = dict(zip([*bad, "good"], _finished(c, farm, [*bad.values(), good], 90), strict=True))

        for name, (_cmd, _outs, reason) in ATTACKS.items():
            job = jobs[name]
            task = job.stages[0].tasks[0]
            assert job.state == "failed", (name, task)
            assert reason in (task.error or ""), (name, task.error)
            assert task.attempts[-1].outputs == []
            # a command failure (retries count), and the command itself did exit 0
            assert task.failures == 1 and task.infra_failures == 0, (name, task)
            assert "(the command exited 0)" in (task.error or ""), (name, task.error)
        ok = jobs["good"]
        assert ok.state == "succeeded", ok
        outs = ok.stages[0].tasks[0].attempts[-1].outputs
        assert [o.path for o in outs] == ["good.txt"]
        assert c.get_blob(outs[0].digest) == b"ok\n"

    rc, took = _stop_timed(agent)
    assert rc == 0, _logs(farm)
    assert took < 10, f"the agent took {took:.1f}s to stop\n{_logs(farm)}"
    assert farm.workdir is not None
    journal = farm.workdir / "state-agent0" / "journal"
    assert list(journal.iterdir()) == []
    assert "Traceback" not in agent.log_text()


def _entry(attempt_id: int, token: str, **completion: object) -> dict[str, object]:
    return {
        "version": 1,
        "agent_id": None,
        "task_id": None,
        "completion": {"attempt_id": attempt_id, "token": token, **completion},
        "blobs": {},
    }


@pytest.mark.timeout(180)
def test_bad_journal_entries_are_quarantined_and_a_refused_one_blocks_nothing(
    farm: LocalFarm,
) -> None:
    assert farm.workdir is not None
    state = farm.workdir / "state-J"
    first = farm.start_agent(name="J", slots=1)
    farm.wait_agents(1)
    assert _stop_timed(first)[0] == 0
    agent_id = json.loads((state / "agent.json").read_text())["agent_id"]

    with HerderClient(farm.url, timeout=10) as c:
        # A real attempt of agent J whose result waits in J's journal (J stopped
        # before delivering it): claimed here in J's name.
        c.register_agent(AgentRegister(agent_id=agent_id, name="J", hostname="h", slots=1))
        pending = _submit(c, "pending", "true")
        (offer,) = wait_for(
            lambda: c.claim(agent_id, ClaimRequest(max_tasks=1, wait_s=1.0)).offers,
            20,
            "an offer for J",
        )
        c.ack(offer.attempt_id, offer.token)

        journal = state / "journal"
        good = _entry(offer.attempt_id, offer.token, outcome="exited", exit_code=0)
        lie = hashlib.sha256(b"promised").hexdigest()
        refused = _entry(  # the master answers 422: the inline bytes do not hash to their digest
            900_001,
            "tok",
            outcome="exited",
            exit_code=0,
            outputs=[{"path": "o", "digest": lie, "size": 5}],
            blobs={lie: base64.b64encode(b"other").decode()},
        )
        (journal / f"a{offer.attempt_id}.json").write_text(json.dumps(good))
        (journal / "a900001.json").write_text(json.dumps(refused))
        (journal / "a900002.json").write_text('{"version": 1, "completion": {')
        # what the bug journaled: a name that is not UTF-8 (json.dumps escapes it as \udcff)
        bad_name = _entry(
            900_003,
            "tok",
            outcome="exited",
            exit_code=0,
            outputs=[{"path": "out/\udcff", "digest": lie, "size": 5}],
        )
        (journal / "a900003.json").write_text(json.dumps(bad_name))

        again = farm.start_agent(name="J", slots=1)
        (job,) = _finished(c, farm, [pending], 30)
        assert job.state == "succeeded", job
        assert [a.id for a in job.stages[0].tasks[0].attempts] == [offer.attempt_id]
        wait_for(lambda: list(journal.iterdir()) == [], 20, "the journal to empty", again.log_text)
        quarantined = sorted(p.name for p in (state / "quarantine").iterdir())
        assert quarantined == ["a900002.json", "a900003.json"]
        log = again.log_text()
        assert "event=journal_quarantined attempt=900002 reason='unreadable: " in log
        assert "event=journal_quarantined attempt=900003 reason=" in log
        assert "not valid UTF-8" in log
        assert "event=completion_refused attempt=900001" in log

        # The agent goes on serving work.
        (after,) = _finished(c, farm, [_submit(c, "after", "echo fine")], 30)
        assert after.state == "succeeded", after

    rc, took = _stop_timed(again)
    assert rc == 0 and took < 10, (rc, took)
    assert "Traceback" not in again.log_text()


def test_second_agent_on_a_state_dir_is_refused(tmp_path: Path) -> None:
    with LocalFarm(workdir=tmp_path / "farm") as farm:
        farm.start_master()
        state = tmp_path / "shared-state"
        first = farm.start_agent(name="first", state_dir=state)
        farm.wait_agents(1)
        second = farm.start_agent(name="second", state_dir=state)
        assert second.wait(20) == 2, second.log_text()
        lines = [ln for ln in second.log_text().splitlines() if ln.startswith("error:")]
        assert lines == [
            f"error: state directory {state} is in use by another herder process "
            f"(pid {first.pid}; lock {state / 'lock'})"
        ]
        assert "Traceback" not in second.log_text()
        assert first.alive()
        with HerderClient(farm.url, timeout=10) as c:
            assert [a.name for a in c.list_agents()] == ["first"]
            (job,) = _finished(c, farm, [_submit(c, "still", "echo serving")], 30)
            assert job.state == "succeeded"
