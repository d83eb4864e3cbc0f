"""Paths never leave the job root (issue 11), with a real master and a real agent.

What a command leaves in its sandbox that points outside (a symlink to
/etc/passwd, a symlinked directory, a FIFO) brings nothing back from outside:
a declared one fails the attempt with the reason, an undeclared one is left
out, and the agent keeps serving (the next job on the same agent succeeds,
its log holds no traceback). A required path that tries ``../`` or an
absolute path is refused at submission (422) and nothing is stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from herder.localfarm import LocalFarm
from waiting import wait_for

PASSWD = Path("/etc/passwd").read_bytes()
PASSWD_DIGEST = hashlib.sha256(PASSWD).hexdigest()
FINISHED = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFarm]:
    f = LocalFarm(workdir=tmp_path_factory.mktemp("escapes"))
    f.start_master()
    f.start_agent(slots=1, name="e1")
    f.wait_agents(1)
    yield f
    f.close()


@pytest.fixture
def http(farm: LocalFarm) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=farm.url, timeout=30, trust_env=False) as c:
        yield c


def agent_log(farm: LocalFarm) -> str:
    return farm.agents[0].log_text()


def run(http: httpx.Client, farm: LocalFarm, **task: Any) -> dict[str, Any]:
    """Submit a one-task job, wait for it to finish; the task's view."""
    body = {"name": "escape", "stages": [{"name": "s", "tasks": [task]}]}
    r = http.post("/api/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    def finished() -> dict[str, Any] | None:
        j = http.get(f"/api/v1/jobs/{job_id}").json()
        return j if j["state"] in FINISHED else None

    j = wait_for(finished, 60, f"job {job_id} finished", lambda: agent_log(farm)[-4000:])
    task_view: dict[str, Any] = j["stages"][0]["tasks"][0]
    return task_view


def nothing_of_passwd(http: httpx.Client, task: dict[str, Any]) -> None:
    """No attempt lists /etc/passwd's bytes, and the master holds no such blob."""
    for att in task["attempts"]:
        assert all(o["digest"] != PASSWD_DIGEST for o in att["outputs"]), att
    assert http.get(f"/api/v1/blobs/{PASSWD_DIGEST}").status_code == 404


def still_serving(http: httpx.Client, farm: LocalFarm) -> None:
    """The same agent runs the next job, and it never printed a traceback."""
    ok = run(http, farm, command="echo fine > ok.txt", outputs=["ok.txt"])
    assert ok["state"] == "succeeded", ok
    assert [o["path"] for o in ok["attempts"][-1]["outputs"]] == ["ok.txt"]
    assert "Traceback" not in agent_log(farm)
    assert farm.agents[0].alive()


# ------------------------------------------------------------------ outputs


DECLARED = {
    # name: (command, outputs, a fragment of the attempt's error)
    "symlink-to-etc-passwd": ("ln -s /etc/passwd pw", ["pw"], "points outside the job root"),
    "relative-symlink-out": (
        "ln -s ../../../../../../../../etc/passwd pw",
        ["pw"],
        "points outside the job root",
    ),
    "symlinked-dir-out": ("ln -s /etc d", ["d"], "points outside the job root"),
    "file-in-symlinked-dir": ("ln -s /etc d", ["d/passwd"], "escapes the job root"),
    "symlink-loop-out": ("ln -s /etc d && ln -s d/passwd pw", ["pw"], "outside the job root"),
    "fifo": ("mkfifo f", ["f"], "declared output is a FIFO"),
    "fifo-kept-open": (
        # a writer that outlives the command holds the FIFO open: still no hang
        "mkfifo f && (sleep 30 > f &) ; true",
        ["f"],
        "declared output is a FIFO",
    ),
    "device": ("mknod dev c 1 3", ["dev"], "declared output is a character device"),
    "symlink-to-device": ("ln -s /dev/zero z", ["z"], "points outside the job root"),
}


@pytest.mark.parametrize("case", list(DECLARED))
def test_declared_output_escaping_fails_the_attempt_with_the_reason(
    farm: LocalFarm, http: httpx.Client, case: str
) -> None:
    command, outputs, fragment = DECLARED[case]
    task = run(http, farm, command=command, outputs=outputs)
    assert task["state"] == "failed", task
    att = task["attempts"][-1]
    # the command itself was fine: no exit status 0 (it would read as success), said so
    assert att["exit_code"] is None, att
    assert fragment in (att["error"] or "") and "(the command exited 0)" in att["error"], att
    assert "Traceback" not in (att["error"] or "")
    assert att["outputs"] == [], att
    nothing_of_passwd(http, task)
    still_serving(http, farm)


def test_undeclared_escapes_are_left_out_and_the_rest_comes_back(
    farm: LocalFarm, http: httpx.Client
) -> None:
    command = (
        "echo mine > mine.txt && ln -s /etc/passwd pw && ln -s /etc etc && mkfifo f"
        " && mkdir sub && ln -s ../mine.txt sub/inside && ln -s /etc/shadow sub/shadow"
    )
    task = run(http, farm, command=command)  # outputs null: every new file
    assert task["state"] == "succeeded", task
    att = task["attempts"][-1]
    got = {o["path"]: o["digest"] for o in att["outputs"]}
    mine = hashlib.sha256(b"mine\n").hexdigest()
    # a symlink inside the sandbox to a file inside it is that file's content
    assert got == {"mine.txt": mine, "sub/inside": mine}, att
    nothing_of_passwd(http, task)
    log = agent_log(farm)
    assert "event=output_skipped" in log and "'pw: symlink points outside" in log
    still_serving(http, farm)


def test_declared_directory_with_escapes_inside(farm: LocalFarm, http: httpx.Client) -> None:
    # A declared directory brings back its files; a symlink in it leading out is left out.
    command = "mkdir out && echo a > out/a && ln -s /etc/passwd out/pw && ln -s /etc out/etc"
    task = run(http, farm, command=command, outputs=["out"])
    assert task["state"] == "succeeded", task
    assert [o["path"] for o in task["attempts"][-1]["outputs"]] == ["out/a"]
    nothing_of_passwd(http, task)
    still_serving(http, farm)


# ------------------------------------------------------------------ requires


BAD_REQUIRES = {
    "dotdot": "../x",
    "dotdot-inside": "a/../../x",
    "absolute": "/etc/passwd",
    "backslash": "..\\x",
    "nul": "a\x00b",
    "empty": "",
    "only-dots": "./.",
}


@pytest.mark.parametrize("case", list(BAD_REQUIRES))
def test_required_path_leaving_the_root_is_refused_at_submission(
    farm: LocalFarm, http: httpx.Client, case: str
) -> None:
    before = http.get("/api/v1/jobs", params={"limit": 10000}).json()["jobs"]
    task = {"command": "cat x", "requires": [{"path": BAD_REQUIRES[case], "digest": "0" * 64}]}
    r = http.post("/api/v1/jobs", json={"name": "j", "stages": [{"name": "s", "tasks": [task]}]})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] and "stages.0.tasks.0.requires.0.path" in body["message"], body
    assert http.get("/api/v1/jobs", params={"limit": 10000}).json()["jobs"] == before


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x"])
def test_output_path_leaving_the_root_is_refused_at_submission(
    http: httpx.Client, path: str
) -> None:
    task = {"command": "true", "outputs": [path]}
    r = http.post("/api/v1/jobs", json={"name": "j", "stages": [{"name": "s", "tasks": [task]}]})
    assert r.status_code == 422, r.text
    assert "stages.0.tasks.0.outputs" in r.json()["message"]


# ------------------------------------------------------------------ logs


SWAPS = {
    "symlink": "ln -s /etc/passwd",
    "fifo": "mkfifo",  # an open for reading would wait for a writer forever
    "device": "mknod -m 666 {} c 1 5",  # /dev/zero: a read would never end
}


@pytest.mark.parametrize("swap", list(SWAPS))
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_log_file_swapped_by_the_command_is_never_followed(
    farm: LocalFarm, http: httpx.Client, stream: str, swap: str
) -> None:
    # The agent's log files sit next to the work directory: a command can
    # replace one. A progress pattern makes the agent's watcher read them too.
    make = SWAPS[swap]
    make = make.format(f"../{stream}") if "{}" in make else f"{make} ../{stream}"
    command = f"echo 50%; rm -f ../{stream} && {make}; echo 60%; sleep 1; echo 70%"
    task = run(http, farm, command=command, timeout_s=20, progress_pattern=r"(\d+)%")
    assert task["state"] == "succeeded", task
    att = task["attempts"][-1]
    log = http.get(f"{att['log_href']}", params={"stream": stream}).json()
    first_line = PASSWD.decode().splitlines()[0]
    assert first_line not in log["data"], log
    assert "\0\0\0\0" not in log["data"]
    nothing_of_passwd(http, task)
    still_serving(http, farm)
