"""Helpers of the chaos tests: a farm whose processes a test kills and restarts.

``ChaosFarm`` wraps :class:`herder.localfarm.LocalFarm` (the same way a user's
farm starts) and adds what a chaos test needs: agents addressed by name that
restart with the same state dir (so the same agent id), agents pointed at
another URL (a fault proxy) or given their own environment, ``kill -9`` of
either role, and every wait bounded.

Several masters on one database (PostgreSQL): :meth:`ChaosFarm.add_master`
starts another on its own port; :meth:`ChaosFarm.kill_master` then kills them
in turn and :meth:`ChaosFarm.start_master` restarts the one it killed last, so
a killer written for one master drives several unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import threading
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
    peers: list[LocalFarm] = field(default_factory=list)  # more masters on the same database
    agent_masters: str | None = None  # --master of agents started without one (default: url)
    _turn: int = 0  # the master kill_master() kills next, in turn
    _down: int | None = None  # the master kill_master() killed last, until restarted

    @property
    def url(self) -> str:
        return self.farm.url

    @property
    def masters(self) -> list[LocalFarm]:
        return [self.farm, *self.peers]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.masters]

    def add_master(self) -> LocalFarm:
        """Start one more master on the same database (on its own port and log)."""
        f = self.farm
        peer = LocalFarm(
            db_url=f.db_url,
            workdir=self.workdir / f"master{len(self.peers) + 1}",
            lease_s=f.lease_s,
            ack_timeout_s=f.ack_timeout_s,
            log_level=f.log_level,
        )
        self.peers.append(peer)
        self._start(peer)
        return peer

    @property
    def workdir(self) -> Path:
        assert self.farm.workdir is not None
        return self.farm.workdir

    def state_dir(self, name: str) -> Path:
        return self.workdir / f"state-{name}"

    def start_master(self, index: int | None = None) -> Proc:
        """Start the master (with peers: ``index``, else the one :meth:`kill_master` killed last)."""
        if index is None:
            index, self._down = (self._down or 0), None
        return self._start(self.masters[index])

    def _start(self, farm: LocalFarm) -> Proc:
        t0 = time.monotonic()
        proc = farm.start_master(wait=60)
        self.master_start_s.append(round(time.monotonic() - t0, 1))
        return proc

    def check_master(self) -> None:
        """Record it if a master exited without being killed (a crash)."""
        for farm in self.masters:
            m = farm.master
            if m is None or m.popen is None or m.pid in self._killed or m.alive():
                continue
            key = (m.pid, m.popen.returncode)
            if key not in self.master_crashes:
                self.master_crashes.append(key)

    def next_master(self) -> int:
        """The index of the master :meth:`kill_master` kills next."""
        return self._turn % len(self.masters)

    def kill_master(self) -> int:
        """kill -9 the master (with peers: each in turn); returns which one."""
        index = self.next_master()
        self._turn += 1
        master = self.masters[index].master
        assert master is not None
        self.check_master()
        self._killed.add(master.pid)
        master.kill9()
        self._down = index
        self.master_kills += 1
        return index

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
            master_url or self.agent_masters or f.url,
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

    def _log_files(self) -> list[Path]:
        peers = [p.workdir / "master.log" for p in self.peers if p.workdir is not None]
        return [*sorted(self.workdir.glob("*.log")), *(p for p in peers if p.is_file())]

    def _traceback_lines(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self._log_files():
            for line in p.read_text(errors="replace").splitlines():
                if "Traceback" in line:
                    out.setdefault(str(p.relative_to(self.workdir)), []).append(line)
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
        for p in self._log_files():
            text = p.read_text(errors="replace")
            name = p.relative_to(self.workdir)
            parts.append(f"----- {name} (last {chars} chars) -----\n{text[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.farm.stop()
        for peer in self.peers:
            with contextlib.suppress(Exception):
                peer.stop()


class Killer(threading.Thread):
    """kill -9 of agents and masters on a schedule tied to a job's progress.

    ``agent_kills`` + ``master_kills`` blows, the masters' at random places
    (never first, second or last); blow k lands once about k/kills of 80 % of
    the job's ``n_tasks`` are done (the first at once). A killed agent (one of
    ``agents``, at random) restarts with ``slots`` and the same state dir. A
    killed master restarts on the same port; ``restart_in_background``: while
    the killer goes on (for a farm whose other masters carry the load, or not
    when the next blow finds them restarting), a master's next blow waiting
    for its own restart.
    """

    def __init__(
        self,
        cf: ChaosFarm,
        job_id: int,
        rng: random.Random,
        *,
        n_tasks: int,
        agents: tuple[str, ...],
        slots: int,
        agent_kills: int,
        master_kills: int,
        restart_in_background: bool = False,
    ) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.cf = cf
        self.job_id = job_id
        self.rng = rng
        self.agents = agents
        self.slots = slots
        self.restart_in_background = restart_in_background
        kills = agent_kills + master_kills
        masters = set(rng.sample(range(2, kills - 1), master_kills))
        self.schedule = ["master" if k in masters else "agent" for k in range(kills)]
        self.thresholds = [int(n_tasks * 0.80 * k / kills) for k in range(kills)]
        self.stop_flag = threading.Event()
        self.log: list[str] = []
        self.error: BaseException | None = None
        self._restarts: dict[int, threading.Thread] = {}

    def done(self) -> int | None:
        for url in self.cf.urls:
            counts = job_counts(url, self.job_id)
            if counts is not None:
                return sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
        return None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            for th in self._restarts.values():
                th.join(90)

    def _run(self) -> None:
        t0 = time.monotonic()
        for k, what in enumerate(self.schedule):
            while not self.stop_flag.is_set():
                self.cf.check_master()
                done = self.done()
                if done is not None and done >= self.thresholds[k]:
                    break
                time.sleep(0.05)
            if self.stop_flag.is_set():
                return
            self.log.append(f"{time.monotonic() - t0:.1f}s:{what}@{done}")
            if what == "master":
                previous = self._restarts.pop(self.cf.next_master(), None)
                if previous is not None:
                    previous.join(90)  # that master is up again before it is killed again
                index = self.cf.kill_master()
                time.sleep(self.rng.uniform(0.0, 0.5))
                if self.restart_in_background:
                    th = threading.Thread(target=self._restart_master, args=(index,), daemon=True)
                    self._restarts[index] = th
                    th.start()
                else:
                    self.cf.start_master(index)
            else:
                name = self.rng.choice(self.agents)
                self.cf.kill_agent(name)
                time.sleep(self.rng.uniform(0.0, 0.5))
                self.cf.start_agent(name, slots=self.slots)
                self.log[-1] = self.log[-1].replace("agent", name)
            # Let the farm move a little before the next blow.
            time.sleep(self.rng.uniform(0.2, 0.6))

    def _restart_master(self, index: int) -> None:
        try:
            self.cf.start_master(index)
        except BaseException as exc:
            self.error = exc


def summary_line(test: str, db: str, **fields: object) -> str:
    body = " ".join(f"{k}={v}" for k, v in fields.items())
    return f"[chaos] {test} db={db} {body}"
