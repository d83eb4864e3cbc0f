"""Issue 12 acceptance: direct mode, `herder run --direct` against real agents serving
`--direct-listen` on 127.0.0.2-4 (no master anywhere)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.localfarm import Proc, free_port
from waiting import port_free_on, wait_for

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "examples" / "sum-of-squares" / "generate.py"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def herder(
    *args: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.pop("HERDER_MASTER", None)
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


class DirectAgent:
    def __init__(self, tmp: Path, host: str, port: int, *extra: str) -> None:
        self.addr = f"{host}:{port}"
        self.state = state = tmp / f"agent-{host}-{port}"
        state.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "herder", "agent", "--direct-listen", self.addr]
        argv += ["--slots", "1", "--state-dir", str(state), "--drain-timeout", "1", *extra]
        env = dict(os.environ)
        env.pop("HERDER_MASTER", None)
        self.proc = Proc(argv, state / "agent.log", env)
        self.proc.start()

    def cost(self) -> dict[str, int]:
        data: dict[str, int] = httpx.get(f"http://{self.addr}/direct/cost", timeout=2).json()
        return data

    def up(self) -> bool:
        try:
            return self.proc.alive() and "slots" in self.cost()
        except httpx.HTTPError:
            return False

    def wait_up(self) -> None:
        wait_for(self.up, 30, f"direct agent {self.addr}", self.proc.log_text)


def start_agents(tmp: Path, *extra: str) -> list[DirectAgent]:
    port = port_free_on(HOSTS)
    agents = [DirectAgent(tmp, h, port, *extra) for h in HOSTS]
    for a in agents:
        a.wait_up()
    return agents


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[DirectAgent]]:
    started = start_agents(tmp_path)
    yield started
    for a in started:
        a.proc.stop()


def sleepers(n: int, hosts: list[DirectAgent]) -> str:
    """A Rakefile of ``n`` one-second remote actions, each writing its own output.

    Each also brings back when it ran (``ran{i}.txt``: start and end, epoch
    seconds) and where (``where{i}.txt``: its sandbox, under its agent's state dir).
    """
    lines = ["HOSTS = " + " ".join(a.addr for a in hosts), "", "sleep:"]
    for i in range(n):
        lines.append(
            f"\tremote-date +%s.%N > ran{i}.txt; pwd > where{i}.txt; sleep 1; "
            f"echo {i} > out{i}.txt; date +%s.%N >> ran{i}.txt"
        )
    return "\n".join(lines) + "\n"


def most_at_once(work: Path, n: int) -> int:
    """The most actions of ``sleepers(n)`` that were running at the same instant."""
    edges = []
    for i in range(n):
        start, end = map(float, (work / f"ran{i}.txt").read_text().split())
        edges += [(start, 1), (end, -1)]
    running = peak = 0
    for _at, step in sorted(edges):  # an end sorts first: touching is not overlapping
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.timeout(90)
def test_thirty_one_second_actions_spread_over_three_agents(
    tmp_path: Path, agents: list[DirectAgent]
) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "Rakefile").write_text(sleepers(30, agents))
    t0 = time.monotonic()
    r = herder("run", "--direct", "--plain", cwd=work)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    counts = [a.cost()["executed"] for a in agents]
    assert sum(counts) == 30, counts
    assert all(7 <= c <= 13 for c in counts), counts
    # The three agents ran side by side. The wall clock only shows it was not
    # serial (30 s): start-up and per-action overhead stretch a loaded machine.
    assert most_at_once(work, 30) == 3
    assert 10 <= elapsed < 25, elapsed
    for i in range(30):
        assert (work / f"out{i}.txt").read_text() == f"{i}\n"


@pytest.mark.timeout(90)
def test_agent_killed_mid_run_build_still_succeeds(
    tmp_path: Path, agents: list[DirectAgent]
) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "Rakefile").write_text(sleepers(15, agents))
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    run = subprocess.Popen(
        [sys.executable, "-m", "herder", "run", "--direct", "--plain"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = agents[1]
    # Killed while it runs its second action: that action must be sent elsewhere.
    wait_for(lambda: (c := victim.cost())["executed"] >= 1 and c["running"] == 1, 30, "busy")
    victim.proc.kill9()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, out + err
    for i in range(15):
        assert (work / f"out{i}.txt").read_text() == f"{i}\n"
    # The action the victim was running never answered: it was run again elsewhere.
    # What the victim answered is counted from the outputs the client kept, not
    # from its count before the kill: that count includes an action whose answer
    # is not sent yet, and misses one answered between the look and the kill.
    answered = sum(victim.state.name in (work / f"where{i}.txt").read_text() for i in range(15))
    survivors = sum(a.cost()["executed"] for a in (agents[0], agents[2]))
    assert survivors == 15 - answered, (survivors, answered)


def test_sum_of_squares_direct_from_rakefile_hosts(
    tmp_path: Path, agents: list[DirectAgent]
) -> None:
    subprocess.run([sys.executable, str(GENERATE), "12", str(tmp_path)], check=True)
    rake = (tmp_path / "Rakefile").read_text()
    port = agents[0].addr.rsplit(":", 1)[1]
    rake = rake.replace("PORT = 6238", f"PORT = {port}")
    rake = rake.replace("HOSTS = localhost", "HOSTS = " + " ".join(HOSTS))
    (tmp_path / "Rakefile").write_text(rake)
    r = herder("run", "--direct", "--plain", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"[run[0] stdout] {sum(i * i for i in range(1, 13))}" in r.stdout
    assert sum(a.cost()["executed"] for a in agents) == 14  # 12 + program + link


def test_unreachable_host_is_skipped(tmp_path: Path, agents: list[DirectAgent]) -> None:
    dead = f"127.0.0.5:{free_port('127.0.0.5')}"
    (tmp_path / "Rakefile").write_text("s:\n\tremote-echo a > a\n\tremote-echo b > b\n")
    hosts = ",".join([dead, agents[0].addr])
    r = herder("run", "--direct", "--hosts", hosts, "--plain", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "a").read_text() == "a\n" and (tmp_path / "b").read_text() == "b\n"


def test_no_host_reachable_is_a_clear_error(tmp_path: Path) -> None:
    dead = f"127.0.0.5:{free_port('127.0.0.5')}"
    (tmp_path / "Rakefile").write_text("s:\n\tremote-true\n")
    r = herder(
        "run", "--direct", "--hosts", dead, cwd=tmp_path, env={"HERDER_DIRECT_GIVE_UP_S": "1"}
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no direct host answered for 1s" in r.stderr and dead in r.stderr
    assert "Traceback" not in r.stderr


def test_failing_action_reports_like_farm_mode(tmp_path: Path, agents: list[DirectAgent]) -> None:
    (tmp_path / "Rakefile").write_text(
        f"HOSTS = {agents[0].addr}\na:\n\tremote-echo oops >&2; exit 3\nb:\n\ttouch never\n"
    )
    r = herder("run", "--direct", "--plain", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "exit status 3" in r.stdout and "oops" in r.stdout
    assert not (tmp_path / "never").exists()


def test_client_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    agent = DirectAgent(
        tmp_path, "127.0.0.3", free_port("127.0.0.3"), "--direct-allow", "10.0.0.0/8"
    )
    try:
        wait_for(agent.proc.log_text, 30, "agent log")
        wait_for(
            lambda: "direct_listening" in agent.proc.log_text(), 30, "listener", agent.proc.log_text
        )
        (tmp_path / "Rakefile").write_text("s:\n\tremote-touch pwned\n")
        r = herder("run", "--direct", "--hosts", agent.addr, cwd=tmp_path)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.strip().splitlines()[-1] == (
            f"herder: {agent.addr} refused this client: "
            "client 127.0.0.1 is not in this agent's --direct-allow list"
        )
        assert not (tmp_path / "pwned").exists()
        assert "direct_executed" not in agent.proc.log_text()
    finally:
        agent.proc.stop()


def test_token_is_required_when_configured(tmp_path: Path) -> None:
    token = "s3cret-direct-token-0123"
    agent = DirectAgent(tmp_path, "127.0.0.2", free_port("127.0.0.2"), "--direct-token", token)
    try:
        wait_for(
            lambda: "direct_listening" in agent.proc.log_text(), 30, "listener", agent.proc.log_text
        )
        (tmp_path / "Rakefile").write_text("s:\n\tremote-echo hi > hi\n")
        r = herder("run", "--direct", "--hosts", agent.addr, cwd=tmp_path)
        assert r.returncode == 2 and "refused this client" in r.stderr, r.stdout + r.stderr
        assert "needs its direct token" in r.stderr
        r = herder(
            "run", "--direct", "--hosts", agent.addr, cwd=tmp_path,
            env={"HERDER_DIRECT_TOKEN": token},
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert (tmp_path / "hi").read_text() == "hi\n"
    finally:
        agent.proc.stop()
