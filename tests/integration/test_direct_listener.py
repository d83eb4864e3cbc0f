"""The agent's direct listener (herder.agent.direct) over real loopback HTTP: its
checks refuse bad input with JSON errors and run nothing; and a farm agent can
serve direct work beside its farm work."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.agent.direct import DirectConfig, DirectServer, parse_allow
from herder.agent.executor import Executor
from herder.localfarm import LocalFarm, free_port
from waiting import wait_for


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[DirectServer, str]]:
    ex = Executor(tmp_path / "work", tmp_path / "blobs", subreaper=False)
    srv = DirectServer(ex, DirectConfig(bind="127.0.0.1:0", slots=2, surcharge=0.25))
    addr = srv.start()
    yield srv, f"http://{addr}/direct"
    srv.stop()


def test_cost_counts_handling_over_slots_plus_surcharge(server: tuple[DirectServer, str]) -> None:
    _, url = server
    assert httpx.get(f"{url}/cost").json() == {
        "running": 0,
        "slots": 2,
        "cost": 0.25,
        "executed": 0,
    }


def test_execute_with_required_file_returns_outputs(server: tuple[DirectServer, str]) -> None:
    _, url = server
    data = b"hello\n"
    digest = hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{url}/blobs/missing", json={"digests": [digest]}).json() == {
        "missing": [digest]
    }
    bad = httpx.put(f"{url}/blobs/{digest}", content=b"other")
    assert bad.status_code == 422 and bad.json()["error"] == "digest_mismatch"
    assert httpx.put(f"{url}/blobs/{digest}", content=data).status_code == 200
    assert httpx.post(f"{url}/blobs/missing", json={"digests": [digest]}).json() == {"missing": []}
    big = "head -c 300000 /dev/zero > big.bin; tr a-z A-Z < src/in.txt > up.txt"
    r = httpx.post(
        f"{url}/execute",
        json={"command": big, "requires": [{"path": "src/in.txt", "digest": digest}]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["outcome"] == "exited" and body["exit_code"] == 0
    outs = {o["path"]: o for o in body["outputs"]}
    assert set(outs) == {"big.bin", "up.txt"}  # the staged input is not an output
    assert "data" in outs["up.txt"] and "data" not in outs["big.bin"]  # too big to inline
    blob = httpx.get(f"{url}/blobs/{outs['big.bin']['digest']}")
    assert blob.content == b"\0" * 300000


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (
            {"command": "touch x", "requires": [{"path": "../x", "digest": "0" * 64}]},
            422,
            "invalid",
        ),
        (
            {"command": "touch x", "requires": [{"path": "/etc/x", "digest": "0" * 64}]},
            422,
            "invalid",
        ),
        ({"command": ""}, 422, "invalid"),
        (
            {"command": "touch x", "requires": [{"path": "a", "digest": "f" * 64}]},
            409,
            "missing_blobs",
        ),
    ],
)
def test_bad_execute_is_refused_and_runs_nothing(
    server: tuple[DirectServer, str], body: dict[str, object], status: int, code: str
) -> None:
    srv, url = server
    r = httpx.post(f"{url}/execute", json=body)
    assert (r.status_code, r.json()["error"]) == (status, code), r.text
    assert r.json()["message"]
    assert srv.executed == 0


def test_malformed_and_oversized_requests(server: tuple[DirectServer, str]) -> None:
    _, url = server
    r = httpx.post(f"{url}/execute", content=b"{not json")
    assert (r.status_code, r.json()["error"]) == (400, "malformed_json")
    r = httpx.post(f"{url}/blobs/missing", json={"digests": ["nothex"]})
    assert r.status_code == 422
    r = httpx.get(f"{url}/blobs/{'a' * 64}")
    assert r.status_code == 404
    r = httpx.get(f"{url}/execute")
    assert r.status_code == 405
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # a body never sent
        sock.sendall(
            b"POST /direct/execute HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
        )
        answer = b""
        while b"too_large" not in answer:  # headers and body may come in two segments
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    head = answer.decode()
    assert head.startswith("HTTP/1.1 413") and "too_large" in head


def test_allow_list_parsing() -> None:
    assert [str(n) for n in parse_allow("127.0.0.0/8, ::1")] == ["127.0.0.0/8", "::1/128"]
    with pytest.raises(ValueError, match="not an address"):
        parse_allow("localhost")


def test_bad_direct_options_are_one_line_errors(tmp_path: Path) -> None:
    for args, text in (
        (["--direct-listen", "nope"], "--direct-listen"),
        (["--direct-listen", "127.0.0.1:0", "--direct-allow", "x/y"], "--direct-allow"),
        (["--direct-listen", "127.0.0.1:0", "--direct-token", "short"], "--direct-token"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "herder", "agent", "--state-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2 and text in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_farm_agent_serves_direct_work_too(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    with LocalFarm(workdir=tmp_path / "farm") as farm:
        farm.start_master()
        agent = farm.start_agent(slots=1, extra=["--direct-listen", f"127.0.0.1:{port}"])
        farm.wait_agents(1)
        url = f"http://127.0.0.1:{port}/direct"

        def answers() -> bool:
            try:
                return httpx.get(f"{url}/cost", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 30, "direct listener of a farm agent", agent.log_text)
        r = httpx.post(f"{url}/execute", json={"command": "echo direct"}, timeout=30)
        assert r.json()["stdout"] == "direct\n"
