"""Helpers of the chaos tests: a farm whose processes a test kills and restarts.

``ChaosFarm`` wraps :class:`herder.localfarm.LocalFarm` (the same way a user's
farm starts) and adds what a chaos test needs: agents addressed by name that
restart with the same state dir (so the same agent id), agents pointed at
another URL (a fault proxy) or given their own environment, ``kill -9`` of
either role, and every wait bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from herder.api_models import EventView, JobView
from herder.client import HerderClient
from herder.localfarm import LocalFarm, Proc

T = TypeVar("T")

FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(
    pred: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``pred`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # the master may be down: keep polling
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def fetch_events(client: HerderClient, job_id: int, page: int = 5000) -> list[EventView]:
    """Every event of a job, in id order (paged through ``after``)."""
    out: list[EventView] = []
    after = 0
    while True:
        batch = client.job_events(job_id, after=after, limit=page)
        out.extend(batch)
        if len(batch) < page:
            return out
        after = batch[-1].id


def job_counts(url: str, job_id: int) -> dict[str, int] | None:
    """The job's task counts by state, cheaply (the job list), or None if unreachable."""
    try:
        r = httpx.get(f"{url}/api/v1/jobs", params={"limit": 1000}, timeout=2.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    for j in r.json()["jobs"]:
        if j["id"] == job_id:
            return dict(j["counts"])
    return None


def wait_job(client: HerderClient, job_id: int, timeout: float) -> JobView:
    """Wait for a final job state, riding out master restarts."""

    def final() -> JobView | None:
        job = client.get_job(job_id)
        return job if job.state in FINAL_JOB_STATES else None

    return wait_until(final, timeout, f"job {job_id} to finish", interval=0.2)


@dataclass
class ChaosFarm:
    """A master and named agents as real processes; kill -9 and restart either."""

    farm: LocalFarm
    agent_procs: dict[str, Proc] = field(default_factory=dict)
    agent_kills: int = 0
    master_kills: int = 0
    # (pid, exit status) of masters that exited on their own: always a bug.
    master_crashes: list[tuple[int, int | None]] = field(default_factory=list)
    _killed: set[int] = field(default_factory=set)
    master_start_s: list[float] = field(default_factory=list)  # start → healthy, each start

    @property
    def url(self) -> str:
        return self.farm.url

    @property
    def workdir(self) -> Path:
        assert self.farm.workdir is not None
        return self.farm.workdir

    def state_dir(self, name: str) -> Path:
        return self.workdir / f"state-{name}"

    def start_master(self) -> Proc:
        t0 = time.monotonic()
        proc = self.farm.start_master(wait=60)
        self.master_start_s.append(round(time.monotonic() - t0, 1))
        return proc

    def check_master(self) -> None:
        """Record it if the master exited without being killed (a crash)."""
        m = self.farm.master
        if m is not None and m.popen is not None and m.pid not in self._killed and not m.alive():
            key = (m.pid, m.popen.returncode)
            if key not in self.master_crashes:
                self.master_crashes.append(key)

    def kill_master(self) -> None:
        assert self.farm.master is not None
        self.check_master()
        self._killed.add(self.farm.master.pid)
        self.farm.master.kill9()
        self.master_kills += 1

    def start_agent(
        self,
        name: str,
        *,
        slots: int = 1,
        master_url: str | None = None,
        env: dict[str, str] | None = None,
        tags: list[str] | None = None,
    ) -> Proc:
        """Start (or restart: same name → same state dir, so the same agent id) an agent."""
        old = self.agent_procs.get(name)
        if old is not None and old.alive():
            raise RuntimeError(f"agent {name} is still running")
        f = self.farm
        argv = [
            sys.executable,
            "-m",
            "herder",
            "agent",
            "--master",
            master_url or f.url,
            "--slots",
            str(slots),
            "--name",
            name,
            "--state-dir",
            str(self.state_dir(name)),
            "--log-level",
            f.log_level,
            "--drain-timeout",
            "2",
        ]
        if tags:
            argv += ["--tags", ",".join(tags)]
        proc_env = f._env()
        proc_env.update(env or {})
        proc = Proc(argv, self.workdir / f"{name}.log", proc_env)
        proc.start()
        f.agents.append(proc)  # so LocalFarm.stop() stops it too
        self.agent_procs[name] = proc
        return proc

    def kill_agent(self, name: str) -> None:
        self.agent_procs[name].kill9()
        self.agent_kills += 1

    def agent_log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def master_log(self) -> str:
        return (self.workdir / "master.log").read_text(errors="replace")

    def _traceback_lines(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in sorted(self.workdir.glob("*.log")):
            for line in p.read_text(errors="replace").splitlines():
                if "Traceback" in line:
                    out.setdefault(p.name, []).append(line)
        return out

    def tracebacks(self) -> dict[str, int]:
        """Log file name → number of tracebacks in it (every process, every incarnation)."""
        return {k: len(v) for k, v in self._traceback_lines().items()}

    def traceback_excerpts(self, chars: int = 3000) -> str:
        """The first traceback of every log that has one (for an assertion message)."""
        return "\n".join(
            f"----- {name} -----\n{lines[0][:chars]}"
            for name, lines in self._traceback_lines().items()
        )

    def log_tails(self, chars: int = 3000) -> str:
        parts = []
        for p in sorted(self.workdir.glob("*.log")):
            text = p.read_text(errors="replace")
            parts.append(f"----- {p.name} (last {chars} chars) -----\n{text[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.farm.stop()


def summary_line(test: str, db: str, **fields: object) -> str:
    body = " ".join(f"{k}={v}" for k, v in fields.items())
    return f"[chaos] {test} db={db} {body}"
