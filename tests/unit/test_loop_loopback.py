"""The seeds/004 loop over real TCP: tiny HTTP servers on 127.0.0.x answer fixed deferrals.

Each server is a thread serving scripted answers (busy, no-service,
continuation, plain) on its own loopback address, so the client's real
transport (httpx over sockets), the ``herder`` console script and its
``--no-wait`` option are exercised end to end. A dead master is an address
with a port nothing listens on (connection refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from herder.client import HerderClient, NoMasterAvailable

HERDER = Path(sys.executable).parent / "herder"

Answer = tuple[int, Any, dict[str, str]]
Script = Callable[[str, str, bool], Answer]  # (method, path, priority) → answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    script: Script
    calls: list[tuple[str, str, str, bool]]
    lock: threading.Lock


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        priority = self.headers.get("Herder-Priority") == "1"
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.calls.append((self.server.server_address[0], self.command, path, priority))
        status, body, headers = self.server.script(self.command, path, priority)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        ctype = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _serve


class Farm:
    """Scripted masters on 127.0.0.2, 127.0.0.3, …; every request in one list."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, bool]] = []
        self.lock = threading.Lock()
        self._servers: list[_Server] = []
        self._next_host = 2

    def _host(self) -> str:
        host = f"127.0.0.{self._next_host}"
        self._next_host += 1
        return host

    def master(self, script: Script) -> str:
        srv = _Server((self._host(), 0), _Handler)
        srv.script, srv.calls, srv.lock = script, self.calls, self.lock
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        self._servers.append(srv)
        host, port = srv.server_address[:2]
        return f"http://{host}:{port}"

    def dead(self) -> str:
        """An address where nothing listens: bound, then closed (connection refused)."""
        with socket.socket() as s:
            s.bind((self._host(), 0))
            host, port = s.getsockname()
        return f"http://{host}:{port}"

    def close(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()

    def seen(self) -> list[tuple[str, str, bool]]:
        """(host, path, priority) of every request but directory lookups."""
        with self.lock:
            return [(h, p, f) for h, _, p, f in self.calls if p != "/api/v1/masters"]


@pytest.fixture
def farm() -> Iterator[Farm]:
    f = Farm()
    try:
        yield f
    finally:
        f.close()


def host(url: str) -> str:
    return url.removeprefix("http://").rsplit(":", 1)[0]


def busy_unless_priority(alternates: list[str], ok_body: Any) -> Script:
    def script(method: str, path: str, priority: bool) -> Answer:
        if path == "/api/v1/masters":
            return 404, {"error": "not_found", "message": "no directory"}, {}
        if priority:
            return 200, ok_body, {}
        body = {
            "error": "busy",
            "message": "admission queue full",
            "alternates": alternates,
            "queued": {"requests": 12, "estimate_s": 1.5},
        }
        return 503, body, {"Retry-After": "1"}

    return script


def no_service(alternates: list[str]) -> Script:
    def script(method: str, path: str, priority: bool) -> Answer:
        if path == "/api/v1/masters":
            return 404, {"error": "not_found", "message": "no directory"}, {}
        body = {"error": "no_service", "message": "read-only master", "alternates": alternates}
        return 421, body, {}

    return script


def test_no_service_dead_busy_then_priority_over_real_sockets(farm: Farm) -> None:
    dead = farm.dead()
    b = farm.master(busy_unless_priority([], {"status": "ok", "who": "b"}))
    a = farm.master(no_service([b, dead]))
    with HerderClient([a], timeout=5) as client:
        assert client.health() == {"status": "ok", "who": "b"}
    assert farm.seen() == [
        (host(a), "/api/v1/health", False),
        (host(b), "/api/v1/health", False),
        # the dead master was tried between these; a (no-service) is not asked again
        (host(b), "/api/v1/health", True),
    ]


def test_everything_refused_names_each_master_over_real_sockets(farm: Farm) -> None:
    dead = farm.dead()
    a = farm.master(no_service([dead]))
    with HerderClient([a], timeout=5) as client, pytest.raises(NoMasterAvailable) as info:
        client._request("POST", "/jobs", json={}, idempotent=False)
    assert str(info.value) == (
        f"no master could handle POST /api/v1/jobs: {a} no_service (read-only master), "
        f"{dead} dead (connection refused)"
    )


def test_continuation_hands_a_blob_download_to_another_master(farm: Farm, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()

    def reader(method: str, path: str, priority: bool) -> Answer:
        assert path == f"/api/v1/blobs/{digest}"
        return 200, data, {}

    ro = farm.master(reader)

    def writer(method: str, path: str, priority: bool) -> Answer:
        body = {
            "continuation": {"method": "GET", "path": path, "params": {"handoff": "1"}},
            "alternates": [ro],
            "result": None,
        }
        return 200, body, {"Herder-Continuation": "1"}

    rw = farm.master(writer)
    with HerderClient([rw], timeout=5) as client:
        assert client.get_blob(digest) == data
    with HerderClient([rw], timeout=5) as client:
        # Streamed: the deferral's body is read, the blob's streamed into the file.
        assert client.download_blob(digest, tmp_path / "blob") == len(data)
    assert (tmp_path / "blob").read_bytes() == data
    handed = [
        (host(rw), f"/api/v1/blobs/{digest}", False),
        (host(ro), f"/api/v1/blobs/{digest}", False),
    ]
    assert farm.seen() == handed * 2


# ------------------------------------------------------ the console script


def herder(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    run_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HERDER_MASTER") and k != "HERDER_NO_WAIT"
    }
    run_env.update(env or {})
    return subprocess.run(
        [str(HERDER), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=run_env,
        stdin=subprocess.DEVNULL,
    )


def test_cli_says_every_master_is_busy_and_waits_with_priority(farm: Farm) -> None:
    b = farm.master(busy_unless_priority([], {"agents": []}))
    a = farm.master(busy_unless_priority([b], {"agents": []}))
    r = herder("agents", "--json", "--master", a)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    busy = "busy (admission queue full; 12 queued, ~1.5s of work)"
    assert r.stderr == (
        f"herder: every master is busy ({a} {busy}, {b} {busy}); waiting with priority\n"
    )
    assert farm.seen() == [
        (host(a), "/api/v1/agents", False),
        (host(b), "/api/v1/agents", False),
        (host(a), "/api/v1/agents", True),
    ]


@pytest.mark.parametrize("how", ["option", "environment"])
def test_cli_no_wait_gives_up_with_one_line_and_75(farm: Farm, how: str) -> None:
    a = farm.master(busy_unless_priority([], {"agents": []}))
    dead = farm.dead()
    if how == "option":
        r = herder("--no-wait", "agents", "--master", f"{a},{dead}")
    else:
        r = herder("agents", "--master", f"{a},{dead}", env={"HERDER_NO_WAIT": "1"})
    assert r.returncode == 75, r.stderr
    assert r.stdout == ""
    assert r.stderr == (
        f"herder: every master is busy ({a} busy (admission queue full; 12 queued, ~1.5s of "
        f"work), {dead} dead (connection refused)); not waiting (--no-wait)\n"
    )
    assert all(not prio for _, _, prio in farm.seen())  # nothing was sent with priority


def test_cli_no_master_can_handle_names_each_and_what_it_said(farm: Farm) -> None:
    dead = farm.dead()
    a = farm.master(no_service([dead]))
    r = herder("drain", "ag-1", "--master", a, "--master-timeout", "0")
    assert r.returncode == 75, r.stderr
    assert r.stderr == (
        f"herder: no master could handle POST /api/v1/agents/ag-1/drain: "
        f"{a} no_service (read-only master), {dead} dead (connection refused)\n"
    )


def test_cli_no_service_everywhere_fails_at_once(farm: Farm) -> None:
    b = farm.master(no_service([]))
    a = farm.master(no_service([b]))
    # The default master timeout is minutes: it must not be waited out, since every
    # master answered and none serves the request.
    r = herder("cancel", "7", "--master", a)
    assert r.returncode == 75, r.stderr
    assert r.stderr == (
        f"herder: no master could handle POST /api/v1/jobs/7/cancel: "
        f"{a} no_service (read-only master), {b} no_service (read-only master); "
        f"job 7 goes on in the farm — follow it with 'herder status 7 --master {a}'\n"
    )


# ------------------------------------------- the agent and the Python API


def test_agent_and_python_api_ride_the_same_loop(farm: Farm, tmp_path: Path) -> None:
    from herder import Client
    from herder.agent.autonomous import ModalClient

    data = b"an input file\n"
    digest = hashlib.sha256(data).hexdigest()

    def rw(method: str, path: str, priority: bool) -> Answer:
        if path == "/api/v1/masters":
            return 404, {"error": "not_found", "message": "no directory"}, {}
        if path == "/api/v1/blobs/missing":
            if not priority:
                return 503, {"error": "busy", "message": "full", "alternates": []}, {}
            return 200, {"missing": [digest]}, {}
        return 200, data, {}

    b = farm.master(rw)
    a = farm.master(no_service([b]))
    agent = ModalClient([a], timeout=5)
    try:
        assert agent.missing_blobs([digest]) == [digest]
        assert agent.download_blob(digest, tmp_path / "in.txt") == len(data)
    finally:
        agent.close()
    with Client([a], timeout=5) as api:
        assert api.missing_blobs([digest]) == [digest]
    missing = [(host(a), "/api/v1/blobs/missing", False), (host(b), "/api/v1/blobs/missing", False)]
    missing.append((host(b), "/api/v1/blobs/missing", True))
    blob = f"/api/v1/blobs/{digest}"
    # The agent's client keeps b as its preferred master after the first answer.
    assert farm.seen() == [*missing, (host(b), blob, False), *missing]


def test_cli_busy_even_with_priority_says_so_once_then_gives_up(farm: Farm) -> None:
    # A master that breaks the MUST NOT (or a database restart: every answer is busy):
    # the CLI waits it out like an outage and says "every master is busy" once.
    def always_busy(method: str, path: str, priority: bool) -> Answer:
        if path == "/api/v1/masters":
            return 404, {"error": "not_found", "message": "no directory"}, {}
        return 503, {"error": "busy", "message": "database unavailable"}, {"Retry-After": "1"}

    a = farm.master(always_busy)
    r = herder("agents", "--master", a, "--master-timeout", "1.5s")
    assert r.returncode == 75, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == (
        f"herder: every master is busy ({a} busy (database unavailable)); waiting with priority"
    )
    assert lines[1].startswith(f"herder: lost the master at {a} (busy); waiting up to 1.5s")
    assert lines[2:] == [
        f"herder: no master could handle GET /api/v1/agents: {a} busy with priority "
        "(database unavailable) (waited 1.5s)"
    ]
    rounds = [prio for _, _, prio in farm.seen()]
    assert rounds[:2] == [False, True] and len(rounds) >= 4  # a second round, silently
