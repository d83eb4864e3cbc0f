"""Start a master and agents as real processes on this machine.

Used by the acceptance and chaos tests and by the benchmarks: a networked
farm of separate processes, brought up the way a user runs one. (`herder run`
without --master runs its farm inside its own process: herder.embedded.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _herder_argv() -> list[str]:
    return [sys.executable, "-m", "herder"]


@dataclass
class Proc:
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
        return self.popen.wait(10)

    def wait(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class LocalFarm:
    """A master and agents, each a subprocess, all on loopback."""

    db_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    workdir: Path | None = None
    lease_s: float = 30.0
    ack_timeout_s: float = 30.0
    log_level: str = "warning"
    # False: the master checks no token (--insecure-no-auth). True: secure, as
    # a user runs one: an admin token (admin_token, sent as HERDER_TOKEN by the
    # farm's processes and its own probes) and a join token for its agents.
    auth: bool = False
    admin_token: str | None = None
    join_token: str | None = None
    master: Proc | None = None
    agents: list[Proc] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __post_init__(self) -> None:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="herder-farm-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.db_url is None:
            self.db_url = f"sqlite:///{self.workdir / 'herder.db'}"
        if not self.port:
            self.port = free_port(self.host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("HERDER_MASTER", None)
        env["PYTHONUNBUFFERED"] = "1"
        if self.auth:
            env.pop("HERDER_INSECURE_NO_AUTH", None)
            if self.admin_token:
                env["HERDER_TOKEN"] = self.admin_token
            if self.join_token:
                env["HERDER_JOIN_TOKEN"] = self.join_token
        return env

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def _make_tokens(self) -> None:
        """An admin and a join token in the farm's database (before its master starts)."""
        from herder.store import Store
        from herder.store.auth import AuthStore

        assert self.db_url is not None
        with Store.open(self.db_url, migrate=True) as store:
            auth = AuthStore(store)
            if not any(u.name == "admin" for u in auth.list_users()):
                auth.add_user("admin", "admin")
            _, self.admin_token = auth.create_token("user", user="admin", description="LocalFarm")
            _, self.join_token = auth.create_token("join", description="LocalFarm agents")

    def start_master(self, wait: float = 30.0) -> Proc:
        assert self.workdir is not None and self.db_url is not None
        argv = [
            *_herder_argv(),
            "master",
            "--db",
            self.db_url,
            "--listen",
            f"{self.host}:{self.port}",
            "--lease",
            str(self.lease_s),
            "--ack-timeout",
            str(self.ack_timeout_s),
            "--log-level",
            self.log_level,
        ]
        if self.auth:
            if self.admin_token is None:
                self._make_tokens()
        else:
            argv.append("--insecure-no-auth")
        self.master = Proc(argv, self.workdir / "master.log", self._env())
        self.master.start()
        self.wait_healthy(wait)
        return self.master

    def wait_healthy(self, wait: float = 30.0) -> None:
        deadline = time.monotonic() + wait
        last: Exception | None = None
        # One client for every probe: a new httpx.get builds a TLS context each time,
        # even for http://, which used to cost a second of CPU per farm start.
        with httpx.Client(timeout=2.0, trust_env=False, headers=self._headers()) as http:
            while time.monotonic() < deadline:
                if self.master is not None and not self.master.alive():
                    raise RuntimeError(f"master exited:\n{self.master.log_text()[-4000:]}")
                try:
                    r = http.get(f"{self.url}/api/v1/health")
                    if r.status_code == 200:
                        return
                except httpx.HTTPError as exc:
                    last = exc
                time.sleep(0.02)
        log = self.master.log_text()[-4000:] if self.master else ""
        raise RuntimeError(f"master at {self.url} not healthy after {wait}s ({last}):\n{log}")

    def start_agent(
        self,
        slots: int = 1,
        *,
        name: str | None = None,
        tags: list[str] | None = None,
        extra: list[str] | None = None,
        state_dir: Path | None = None,
    ) -> Proc:
        assert self.workdir is not None
        index = len(self.agents)
        name = name or f"agent{index}"
        state = state_dir or (self.workdir / f"state-{name}")
        argv = [
            *_herder_argv(),
            "agent",
            "--master",
            self.url,
            "--slots",
            str(slots),
            "--name",
            name,
            "--state-dir",
            str(state),
            "--log-level",
            self.log_level,
        ]
        if tags:
            argv += ["--tags", ",".join(tags)]
        argv += extra or []
        proc = Proc(argv, self.workdir / f"{name}.log", self._env())
        proc.start()
        self.agents.append(proc)
        return proc

    def wait_agents(self, count: int, wait: float = 30.0) -> None:
        deadline = time.monotonic() + wait
        with httpx.Client(timeout=2.0, trust_env=False, headers=self._headers()) as http:
            while time.monotonic() < deadline:
                try:
                    r = http.get(f"{self.url}/api/v1/agents")
                    if r.status_code == 200 and len(r.json()["agents"]) >= count:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
        raise RuntimeError(f"fewer than {count} agents registered after {wait}s")

    def stop(self, at_once: bool = False) -> None:
        """Stop agents (they drain), then the master.

        ``at_once``: signal the master together with the agents, for a farm
        with no work left (the end of a build). An idle agent then need not
        wait out its parked long-poll: the stopping master answers it.
        """
        for proc in self.agents:
            proc.signal(signal.SIGTERM)
        if at_once and self.master is not None:
            self.master.signal(signal.SIGTERM)
        for proc in self.agents:
            if proc.wait(20) is None:
                proc.kill9()
        if self.master is not None:
            if at_once:
                self.master.wait(15)  # a second SIGTERM would cut its shutdown short
            self.master.stop()

    def close(self, at_once: bool = False) -> None:
        self.stop(at_once)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
