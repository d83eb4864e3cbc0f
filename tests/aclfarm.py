"""A real master and real agents in subprocesses on a test database, for the ACL tests
(tests/integration/test_pool_acl.py, tests/integration/test_acl_dispatch.py).

The master runs without tokens (HERDER_INSECURE_NO_AUTH=1): these tests are
about pool ACLs and what agents accept, not about authentication.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from herder.localfarm import free_port
from waiting import wait_for

HERDER = [sys.executable, "-m", "herder"]


def env() -> dict[str, str]:
    return {**os.environ, "HERDER_INSECURE_NO_AUTH": "1", "PYTHONUNBUFFERED": "1"}


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@dataclass
class Farm:
    url: str
    db_url: str
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.tmp.glob("*.log"))
        )

    def agent(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        """``herder agent`` against this master (no talkback: claims long-poll)."""
        log = open(self.tmp / f"agent-{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                *HERDER,
                "agent",
                "--master",
                self.url,
                "--name",
                name,
                "--state-dir",
                str(self.tmp / f"agent-{name}"),
                "--log-level",
                "debug",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
        )
        self.procs.append(proc)
        return proc

    def agent_id(self, client: httpx.Client, name: str) -> str:
        def find() -> str | None:
            for a in client.get(f"{self.api}/agents").json()["agents"]:
                if a["name"] == name:
                    return str(a["id"])
            return None

        found: str = wait_for(find, 30, f"agent {name} registered", self.logs)
        return found

    def herder(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The ``herder`` command line against this master."""
        return subprocess.run(
            [*HERDER, *args],
            capture_output=True,
            text=True,
            env={**env(), "HERDER_MASTER": self.url, "COLUMNS": "400"},  # tables unwrapped
            timeout=60,
            check=False,
        )


@contextmanager
def farm(db_url: str, tmp: Path) -> Iterator[Farm]:
    """``herder master`` on ``db_url`` (migrated by the master itself), until the block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "master.log", "wb")  # noqa: SIM115
    master = subprocess.Popen(
        [*HERDER, "master", "--db", db_url, "--listen", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env(),
    )
    f = Farm(url, db_url, tmp, [master])

    def up() -> bool:
        if master.poll() is not None:
            raise AssertionError(f"the master exited\n{f.logs()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "master up", f.logs, poll_s=0.1)
        yield f
    finally:
        for p in reversed(f.procs):
            stop(p)
        log.close()


def wait_job(
    client: httpx.Client, farm: Farm, job_id: int, timeout: float = 60
) -> dict[str, object]:
    def done() -> dict[str, object] | None:
        job = client.get(f"{farm.api}/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    got: dict[str, object] = wait_for(done, timeout, f"job {job_id} finished", farm.logs, 0.1)
    return got


def job(name: str, owner: str | None, pool: str, commands: list[str]) -> dict[str, object]:
    """A one-stage job body as the API takes it."""
    body: dict[str, object] = {
        "name": name,
        "pool": pool,
        "stages": [{"name": "s", "tasks": [{"command": c} for c in commands]}],
    }
    if owner is not None:
        body["owner"] = owner
    return body
