"""Helpers the tests share: waiting for a condition (or an agent's registration),
holding a task until the test lets it go, reading a master's ``/metrics``, and
one port free on several loopback addresses (several "hosts" on one machine)."""

from __future__ import annotations

import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from herder.localfarm import LocalFarm, Proc, free_port


def wait_for(
    pred: Callable[[], Any],
    timeout: float,
    what: str,
    logs: Callable[[], str] = str,
    poll_s: float = 0.05,
) -> Any:
    """The first truthy value of ``pred()`` within ``timeout`` seconds.

    Fails naming ``what``, with the tail of ``logs()`` (process logs) attached.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout}s\n{logs()[-6000:]}")


def wait_registered(farm: LocalFarm, agent: Proc, count: int = 1) -> None:
    """``agent`` has its registration's answer, not just a row in the directory.

    Killing the master between the row's commit and the answer leaves an orphan
    row, and the agent registers again under a new id once it is autonomous:
    a test that kills the master reads the agent's id only after this.
    """
    farm.wait_agents(count)
    wait_for(lambda: "event=registered" in agent.log_text(), 20, "registered", agent.log_text)


def until_file(path: Path) -> str:
    """A shell command that returns once ``path`` exists: a task holds at it until
    the test creates the file (a fixed sleep could end before the test acts)."""
    return f"while [ ! -e {shlex.quote(str(path))} ]; do sleep 0.05; done"


def metric(url: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in a master's ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name} in {url}/metrics")


def timed_wait(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``pred()`` held (fails after ``timeout``)."""
    start = time.monotonic()
    wait_for(pred, timeout, what)
    return time.monotonic() - start


def port_free_on(hosts: list[str]) -> int:
    """A TCP port that is free on every one of ``hosts`` (loopback addresses)."""

    def free_everywhere(port: int) -> bool:
        for host in hosts:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    return False
        return True

    for _ in range(50):
        port = free_port(hosts[0])
        if free_everywhere(port):
            return port
    raise RuntimeError(f"no port free on all of {hosts}")
