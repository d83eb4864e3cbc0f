"""A real master and a real agent in subprocesses, driven through the client."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from herder.api_models import JobSubmit, JobView, RequiredFile, StageSpec, TaskSpec
from herder.client import HerderClient

HERDER = [sys.executable, "-m", "herder"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.fixture
def master(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "master.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *HERDER,
            "master",
            "--db",
            f"sqlite:///{tmp_path / 'h.db'}",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with HerderClient(url, timeout=2) as c:
            deadline = time.monotonic() + 60  # a cold start on a loaded machine
            while True:
                try:
                    c.health()
                    break
                except Exception:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.1)
        yield url
    finally:
        _stop(proc)
        log.close()


@pytest.fixture
def start_agent(master: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str, name: str = "a1") -> subprocess.Popen[bytes]:
        state = tmp_path / f"agent-{name}"
        log = open(tmp_path / f"agent-{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                *HERDER,
                "agent",
                "--master",
                master,
                "--name",
                name,
                "--state-dir",
                str(state),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        _stop(p)


def _wait_job(c: HerderClient, job_id: int, timeout: float = 60) -> JobView:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get_job(job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {c.get_job(job_id)}")


def test_two_stage_job_with_files(
    master: str, start_agent: Callable[..., subprocess.Popen[bytes]]
) -> None:
    start_agent("--slots", "2")
    data = b"line one\nline two\n"
    digest = hashlib.sha256(data).hexdigest()
    with HerderClient(master) as c:
        c.put_blob(digest, data)
        job = c.submit_job(
            JobSubmit(
                name="e2e",
                stages=[
                    StageSpec(
                        name="gen",
                        tasks=[
                            TaskSpec(
                                command=f"mkdir -p out && wc -l < src/in.txt > out/n{i} && echo made {i}",
                                requires=[RequiredFile(path="./src/in.txt", digest=digest)],
                            )
                            for i in range(6)
                        ],
                    ),
                    StageSpec(
                        name="bin",
                        tasks=[TaskSpec(command=["sh", "-c", "printf '\\000\\377' > b.bin"])],
                    ),
                ],
            )
        )
        done = _wait_job(c, job.id)
        assert done.state == "succeeded", done
        t0 = done.stages[0].tasks[0]
        att = t0.attempts[-1]
        assert [o.path for o in att.outputs] == ["out/n0"]
        assert c.get_blob(att.outputs[0].digest) == b"2\n"
        assert c.read_full_log(att.id) == "made 0\n"
        binary = done.stages[1].tasks[0].attempts[-1].outputs
        assert c.get_blob(binary[0].digest) == b"\x00\xff"
        agents = c.list_agents()
        assert len(agents) == 1


def test_failure_timeout_and_missing_program(
    master: str, start_agent: Callable[..., subprocess.Popen[bytes]]
) -> None:
    start_agent("--slots", "3")
    with HerderClient(master) as c:
        jobs = [
            c.submit_job(
                JobSubmit(
                    name="fail",
                    stages=[StageSpec(name="s", tasks=[TaskSpec(command="echo bad >&2; exit 3")])],
                )
            ),
            c.submit_job(
                JobSubmit(
                    name="slow",
                    stages=[
                        StageSpec(
                            name="s",
                            tasks=[TaskSpec(command="sleep 100 & sleep 100", timeout_s=0.5)],
                        )
                    ],
                )
            ),
            c.submit_job(
                JobSubmit(
                    name="nope",
                    stages=[StageSpec(name="s", tasks=[TaskSpec(command="no-such-program-e2e")])],
                )
            ),
        ]
        fail, slow, nope = (_wait_job(c, j.id) for j in jobs)
        assert fail.state == "failed"
        t = fail.stages[0].tasks[0]
        assert t.exit_code == 3
        assert c.read_full_log(t.attempts[-1].id, "stderr") == "bad\n"
        assert slow.state == "failed"
        assert "timed out" in (slow.stages[0].tasks[0].error or "")
        assert nope.state == "failed" and nope.stages[0].tasks[0].exit_code == 127


def test_agent_restart_keeps_id_and_sigterm_releases(
    master: str, start_agent: Callable[..., subprocess.Popen[bytes]]
) -> None:
    a = start_agent("--slots", "1", "--drain-timeout", "0.5")
    with HerderClient(master) as c:
        job = c.submit_job(
            JobSubmit(
                name="long", stages=[StageSpec(name="s", tasks=[TaskSpec(command="sleep 100")])]
            )
        )
        deadline = time.monotonic() + 60
        while c.get_job(job.id).stages[0].tasks[0].state != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first_id = c.list_agents()[0].id
        t0 = time.monotonic()
        assert _stop(a) == 0
        assert time.monotonic() - t0 < 10
        task = c.get_job(job.id).stages[0].tasks[0]
        assert task.state == "queued", task
        assert task.failures == 0
        # a restarted agent keeps its id and picks the task up again
        start_agent("--slots", "1", "--drain-timeout", "0.5", name="a1")
        deadline = time.monotonic() + 60
        while c.get_job(job.id).stages[0].tasks[0].state != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [ag.id for ag in c.list_agents()] == [first_id]
        c.cancel_job(job.id)


if os.name != "posix":  # pragma: no cover
    pytestmark = pytest.mark.skip("POSIX only")
