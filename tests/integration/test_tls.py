"""TLS on every listener, with real processes on loopback (issue 11, DESIGN §11).

A farm CA made by `herder certs init`; a master serving HTTPS; agents that verify it and
serve their talkback endpoint over HTTPS; `herder submit --wait` through it; a client with
the wrong CA (one line, non-zero, nothing submitted); a talkback cancel over HTTPS and a
talkback endpoint whose certificate comes from another CA, which the master refuses; the
direct listener over TLS with `herder run --direct`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from herder.localfarm import Proc, free_port
from herder.tlsconf import client_context
from waiting import wait_for


def herder(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    for name in ("HERDER_MASTER", "HERDER_CA", "HERDER_TLS_CERT", "HERDER_TLS_KEY"):
        full.pop(name, None)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "herder", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
        stdin=subprocess.DEVNULL,
    )


def certs_init(root: Path, name: str) -> Path:
    r = herder("certs", "init", str(root / name), cwd=root)
    assert r.returncode == 0, r.stderr
    return root / name


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HERDER_MASTER", "HERDER_CA", "HERDER_TLS_CERT", "HERDER_TLS_KEY"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sleeps_under(pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if p.name() == "sleep" and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@dataclass
class TlsFarm:
    """A master over HTTPS (certificate from ``ca``) and agents, each a real process."""

    root: Path
    ca: Path  # the farm's `herder certs init` directory
    port: int = field(default_factory=free_port)
    master: Proc | None = None
    agents: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def http(self) -> httpx.Client:
        return httpx.Client(verify=client_context(self.ca / "ca.crt"), timeout=10)

    def start_master(self, from_env: bool = False) -> None:
        """``from_env``: certificate, key and CA from HERDER_TLS_CERT, HERDER_TLS_KEY, HERDER_CA."""
        argv = [sys.executable, "-m", "herder", "master", "--insecure-no-auth"]
        argv += ["--db", f"sqlite:///{self.root / 'herder.db'}"]
        argv += ["--listen", f"127.0.0.1:{self.port}", "--log-level", "info"]
        env = _env()
        tls = {
            "HERDER_TLS_CERT": str(self.ca / "server.crt"),
            "HERDER_TLS_KEY": str(self.ca / "server.key"),
            "HERDER_CA": str(self.ca / "ca.crt"),  # verifies the agents' talkback endpoints
        }
        if from_env:
            env.update(tls)
        else:
            argv += ["--tls-cert", tls["HERDER_TLS_CERT"], "--tls-key", tls["HERDER_TLS_KEY"]]
            argv += ["--ca", tls["HERDER_CA"]]
        self.master = Proc(argv, self.root / "master.log", env)
        self.master.start()

        def healthy() -> bool:
            assert self.master is not None
            if not self.master.alive():
                raise AssertionError(f"master exited:\n{self.master.log_text()}")
            try:
                with self.http() as http:
                    return http.get(f"{self.url}/api/v1/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 30, "master over https", self.logs)

    def start_agent(self, name: str, certs: Path, *extra: str) -> Proc:
        """An agent verifying the master with the farm CA; its talkback serves ``certs``."""
        argv = [sys.executable, "-m", "herder", "agent", "--master", self.url, "--name", name]
        argv += ["--slots", "1", "--state-dir", str(self.root / f"state-{name}")]
        argv += ["--log-level", "info", "--ca", str(self.ca / "ca.crt")]
        argv += ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key")]
        proc = Proc([*argv, *extra], self.root / f"{name}.log", _env())
        proc.start()
        self.agents.append(proc)
        return proc

    def agent_views(self) -> dict[str, dict[str, Any]]:
        with self.http() as http:
            agents = http.get(f"{self.url}/api/v1/agents").json()["agents"]
        return {a["name"]: a for a in agents}

    def logs(self) -> str:
        procs = [p for p in (self.master, *self.agents) if p is not None]
        return "\n".join(f"--- {p.log_path.name}\n{p.log_text()[-3000:]}" for p in procs)

    def stop(self) -> None:
        for p in self.agents:
            p.stop()
        if self.master is not None:
            self.master.stop()


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    """The farm's CA and certificates, and another CA's."""
    return certs_init(tmp_path, "farm"), certs_init(tmp_path, "other")


@pytest.fixture
def farm(tmp_path: Path, certs: tuple[Path, Path]) -> Iterator[TlsFarm]:
    f = TlsFarm(tmp_path, certs[0])
    try:
        f.start_master()
        yield f
    finally:
        f.stop()


@pytest.fixture
def env_farm(tmp_path: Path, certs: tuple[Path, Path]) -> Iterator[TlsFarm]:
    """The same, its master's TLS settings given in the environment."""
    f = TlsFarm(tmp_path, certs[0])
    try:
        f.start_master(from_env=True)
        yield f
    finally:
        f.stop()


def job_file(root: Path, *commands: str) -> Path:
    path = root / "job.json"
    tasks = [{"command": c} for c in commands]
    path.write_text(json.dumps({"name": "tls", "stages": [{"name": "s", "tasks": tasks}]}))
    return path


@pytest.mark.timeout(120)
def test_submit_wait_through_a_tls_master(farm: TlsFarm, tmp_path: Path) -> None:
    farm.start_agent("a1", farm.ca)
    wait_for(lambda: "a1" in farm.agent_views(), 30, "agent registered over https", farm.logs)
    # the agent serves its talkback over https too, and the master learnt that URL
    assert farm.agent_views()["a1"]["talkback_url"].startswith("https://127.0.0.1:")
    job = job_file(tmp_path, "echo over-tls")
    r = herder(
        "submit",
        str(job),
        "--master",
        farm.url,
        "--ca",
        str(farm.ca / "ca.crt"),
        "--wait",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr + farm.logs()
    # HERDER_CA instead of --ca; the job's log came back over https
    r = herder(
        "logs", "1", "--master", farm.url, cwd=tmp_path, env={"HERDER_CA": str(farm.ca / "ca.crt")}
    )
    assert r.returncode == 0 and "over-tls" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(120)
def test_a_client_with_the_wrong_ca_gets_one_line_and_submits_nothing(
    farm: TlsFarm, tmp_path: Path, certs: tuple[Path, Path]
) -> None:
    _, other = certs
    job = job_file(tmp_path, "echo never")
    prefix = f"error: TLS: certificate verify failed for {farm.url}: "
    for args, env in (
        (["submit", str(job), "--wait", "--ca", str(other / "ca.crt")], {}),
        (["status"], {"HERDER_CA": str(other / "ca.crt")}),
        (["status"], {}),  # the system trust store does not know the farm CA either
    ):
        t0 = time.monotonic()
        # the default master timeout is 5 minutes: a wrong certificate is not waited for
        r = herder(*args, "--master", farm.url, cwd=tmp_path, env=env)
        assert time.monotonic() - t0 < 30
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(prefix), (args, r.stderr)
        assert "Traceback" not in r.stderr
    with farm.http() as http:
        assert http.get(f"{farm.url}/api/v1/jobs").json()["jobs"] == []
    bad = herder("status", "--master", farm.url, "--ca", str(tmp_path / "nope.crt"), cwd=tmp_path)
    assert bad.returncode == 2 and "TLS: CA bundle" in bad.stderr and "no such file" in bad.stderr


@pytest.mark.timeout(150)
def test_talkback_cancel_over_https_and_a_foreign_certificate_is_refused(
    env_farm: TlsFarm, tmp_path: Path, certs: tuple[Path, Path]
) -> None:
    farm, (_, other) = env_farm, certs
    good = farm.start_agent("good", farm.ca)
    # trusts the master, but its talkback endpoint's certificate comes from another CA
    foreign = farm.start_agent("foreign", other)
    wait_for(lambda: len(farm.agent_views()) == 2, 30, "both agents registered", farm.logs)
    job = job_file(tmp_path, "sleep 60", "sleep 60")
    r = herder(
        "submit", str(job), "--master", farm.url, "--ca", str(farm.ca / "ca.crt"), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    wait_for(
        lambda: len(sleeps_under(good.pid)) == 1 and len(sleeps_under(foreign.pid)) == 1,
        30,
        "one sleep on each agent",
        farm.logs,
    )
    with farm.http() as http:
        wait_for(
            lambda: http.get(f"{farm.url}/api/v1/jobs/1").json()["counts"] == {"running": 2},
            30,
            "both tasks acknowledged",
            farm.logs,
        )
        t0 = time.monotonic()
        assert http.post(f"{farm.url}/api/v1/jobs/1/cancel").status_code == 200
    # lease 30 s: heartbeats every 10 s; the reasons below tell which way each was told
    wait_for(lambda: not sleeps_under(good.pid), 8, "talkback cancel over https", farm.logs)
    assert time.monotonic() - t0 < 8.0
    wait_for(lambda: not sleeps_under(foreign.pid), 20, "heartbeat cancel", farm.logs)
    assert "reason='cancelled by user'" in good.log_text()
    assert "reason='cancelled by the master'" in foreign.log_text()  # not through talkback
    foreign_url = farm.agent_views()["foreign"]["talkback_url"]
    assert farm.master is not None
    refused = [
        json.loads(line)
        for line in farm.master.log_text().splitlines()
        if "talkback_cancel_tls_failed" in line
    ]
    assert refused and refused[0]["level"] == "warning", farm.master.log_text()[-3000:]
    assert f"TLS: certificate verify failed for {foreign_url}: " in refused[0]["msg"]


@pytest.mark.timeout(120)
def test_direct_listener_over_tls_with_run_direct(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    farm_ca, other = certs
    port = free_port()
    state = tmp_path / "direct-agent"
    argv = [sys.executable, "-m", "herder", "agent", "--direct-listen", f"127.0.0.1:{port}"]
    argv += ["--slots", "1", "--state-dir", str(state), "--drain-timeout", "1"]
    argv += ["--tls-cert", str(farm_ca / "server.crt"), "--tls-key", str(farm_ca / "server.key")]
    state.mkdir()
    agent = Proc(argv, tmp_path / "direct.log", _env())
    agent.start()
    try:
        with httpx.Client(verify=client_context(farm_ca / "ca.crt"), timeout=2) as http:

            def up() -> bool:
                try:
                    return http.get(f"https://127.0.0.1:{port}/direct/cost").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, 30, "direct listener over https", agent.log_text)
        work = tmp_path / "work"
        work.mkdir()
        (work / "in.txt").write_text("tls direct\n")
        (work / "Rakefile").write_text(
            f"HOSTS = 127.0.0.1:{port}\n\nup:\n\tremote-tr a-z A-Z < in.txt > out.txt\n\t\trequires in.txt\n"
        )
        ca_env = {"HERDER_CA": str(farm_ca / "ca.crt")}
        r = herder(
            "run",
            "--direct",
            "--plain",
            "--hosts",
            f"https://127.0.0.1:{port}",
            cwd=work,
            env=ca_env,
        )
        assert r.returncode == 0, r.stdout + r.stderr + agent.log_text()
        assert (work / "out.txt").read_text() == "TLS DIRECT\n"
        (work / "out.txt").unlink()
        # the Rakefile's HOSTS (no scheme) over https: HERDER_DIRECT_TLS
        r = herder("run", "--direct", "--plain", cwd=work, env={**ca_env, "HERDER_DIRECT_TLS": "1"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert (work / "out.txt").read_text() == "TLS DIRECT\n"
        (work / "out.txt").unlink()
        # another CA: one line, exit 2, nothing run
        r = herder(
            "run",
            "--direct",
            "--plain",
            "--hosts",
            f"https://127.0.0.1:{port}",
            cwd=work,
            env={"HERDER_CA": str(other / "ca.crt")},
        )
        assert r.returncode == 2, r.stdout + r.stderr
        line = f"herder: TLS: certificate verify failed for https://127.0.0.1:{port}: "
        assert next(x for x in r.stderr.splitlines() if x.startswith("herder:")).startswith(line)
        assert "Traceback" not in r.stderr and not (work / "out.txt").exists()
        # plain http to the TLS listener is told what is wrong
        with httpx.Client(timeout=5) as plain:
            answer = plain.get(f"http://127.0.0.1:{port}/direct/cost")
        assert answer.status_code == 400 and answer.json()["error"] == "tls_required"
    finally:
        agent.stop()


def test_unusable_tls_files_are_one_line_errors_at_start(
    tmp_path: Path, certs: tuple[Path, Path]
) -> None:
    farm_ca, other = certs
    cert, key = str(farm_ca / "server.crt"), str(farm_ca / "server.key")
    missing = str(tmp_path / "nope.crt")
    db = ["--db", f"sqlite:///{tmp_path / 'x.db'}", "--insecure-no-auth"]
    state = ["--state-dir", str(tmp_path / "s")]
    cases = [
        (["master", *db, "--tls-cert", cert], "--tls-cert and --tls-key go together"),
        (["master", *db, "--tls-cert", missing, "--tls-key", key], f"certificate {missing}: no"),
        (["agent", *state, "--tls-cert", cert, "--tls-key", str(other / "server.key")], "cannot"),
        (["agent", *state, "--tls-key", key], "--tls-cert is missing"),
    ]
    for args, text in cases:
        r = herder(*args, cwd=tmp_path, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: TLS") and text in lines[0], lines
    assert not (tmp_path / "x.db").exists()  # refused before the database was touched
