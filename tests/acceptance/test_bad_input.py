"""Issue 11 (CLI): bad input is one ``file:line:col: message`` line, exit 2, nothing submitted.

Everything runs through the real ``herder`` console script as a subprocess,
against a separately started farm (``--master``) or the embedded one.
"""

from __future__ import annotations

import json
import os
import pty
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.localfarm import LocalFarm

ROOT = Path(__file__).resolve().parents[2]
HERDER = str(Path(sys.executable).parent / "herder")
LOCATED = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")


NO_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def herder(
    *args: str, cwd: Path, prefix: list[str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*(prefix or []), HERDER, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=kw.pop("env", env),
        stdin=subprocess.DEVNULL,
        **kw,
    )


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFarm]:
    f = LocalFarm(workdir=tmp_path_factory.mktemp("farm"))
    f.start_master()
    f.start_agent(slots=2, name="b1")
    f.wait_agents(1)
    yield f
    f.close()


def job_count(farm: LocalFarm) -> int:
    return len(httpx.get(f"{farm.url}/api/v1/jobs", params={"limit": 10000}).json()["jobs"])


def assert_refused(r: subprocess.CompletedProcess[str], file: str, fragment: str) -> re.Match[str]:
    """Exit 2 and exactly one located line on stderr, naming ``fragment``."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    m = LOCATED.match(lines[0])
    assert m is not None, lines[0]
    assert m.group("file") == file, lines[0]
    assert int(m.group("line")) >= 1 and int(m.group("col")) >= 1
    assert fragment in m.group("message"), lines[0]
    return m


# ------------------------------------------------------------------ herder run


def _make_device(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers


RUN_REQUIRES_CASES = {
    # name: (how to make "it" in the project directory, fragment of the message)
    "symlink-to-etc-passwd": (lambda p: p.symlink_to("/etc/passwd"), "outside the project"),
    "symlinked-dir-escape": (lambda p: None, "outside the project"),
    "missing": (lambda p: None, "does not exist"),
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "fifo": (lambda p: os.mkfifo(p), "FIFO"),
    "device": (_make_device, "device"),
    "dangling-symlink": (lambda p: p.symlink_to("nowhere"), "dangling symlink"),
}


@pytest.mark.parametrize("case", list(RUN_REQUIRES_CASES))
def test_run_bad_requires(farm: LocalFarm, tmp_path: Path, case: str) -> None:
    make, fragment = RUN_REQUIRES_CASES[case]
    target = "it"
    if case == "symlinked-dir-escape":
        (tmp_path / "etc").symlink_to("/etc")
        target = "etc/passwd"
    else:
        make(tmp_path / "it")
    (tmp_path / "ok.txt").write_text("ok\n")
    (tmp_path / "Rakefile").write_text(
        f"a:\n\tremote-cat ok.txt\n\t\trequires ok.txt\n\tremote-cat x\n\t\trequires  ok.txt {target}\n"
    )
    before = job_count(farm)
    r = herder("run", "-m", farm.url, cwd=tmp_path)
    m = assert_refused(r, "Rakefile", fragment)
    assert (m.group("line"), m.group("col")) == ("5", "20"), r.stderr  # the word itself
    assert repr(target) in m.group("message")
    assert job_count(farm) == before


def test_run_requires_checked_when_its_actionset_starts(farm: LocalFarm, tmp_path: Path) -> None:
    # The escaping symlink is made by the first actionset: refused before the second is sent.
    (tmp_path / "Rakefile").write_text(
        "make:\n\tln -s /etc/passwd pw\nuse:\n\tremote-cat pw\n\t\trequires pw\n"
    )
    before = job_count(farm)
    r = herder("run", "-m", farm.url, "--plain", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Rakefile:5:12: required file 'pw' resolves")
    assert "Traceback" not in r.stderr
    assert job_count(farm) == before  # the first actionset is local: nothing was submitted


def test_run_symlink_inside_the_project_is_allowed(farm: LocalFarm, tmp_path: Path) -> None:
    (tmp_path / "real.txt").write_text("inside\n")
    (tmp_path / "link.txt").symlink_to("real.txt")
    (tmp_path / "Rakefile").write_text("a:\n\tremote-cat link.txt\n\t\trequires link.txt\n")
    r = herder("run", "-m", farm.url, "--plain", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[a[0] stdout] inside" in r.stdout


def test_run_unreadable_requires(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("x\n")
    (tmp_path / "secret.txt").chmod(0)
    (tmp_path / "Rakefile").write_text("a:\n\tremote-cat secret.txt\n\t\trequires secret.txt\n")
    args = ["run", "-m", "http://127.0.0.1:9", "--master-timeout", "0"]
    if os.geteuid() == 0:
        # root reads any file: run herder as root without the capabilities that let it
        r = herder(*args, cwd=tmp_path, prefix=NO_DAC_OVERRIDE)
    else:
        r = herder(*args, cwd=tmp_path)
    m = assert_refused(r, "Rakefile", "permission denied")
    assert (m.group("line"), m.group("col")) == ("3", "12")


def _rakefile_dir(p: Path) -> None:
    p.mkdir()


def _rakefile_big(p: Path) -> None:
    with p.open("wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: 100 MB without writing them


RAKEFILE_CASES = {
    "directory": (_rakefile_dir, "is a directory"),
    "fifo": (lambda p: os.mkfifo(p), "FIFO"),
    "non-utf8": (lambda p: p.write_bytes(b"a:\n\techo \xff\n"), "invalid UTF-8 byte 0xff"),
    "100MB": (_rakefile_big, "at most"),
    "missing": (lambda p: None, "does not exist"),
    "c1-control": (lambda p: p.write_text("a:\n\techo \x9b31m\n"), "control character U+009B"),
    "header-escape": (lambda p: p.write_text("a\x1b[31m:\n\techo\n"), "control character U+001B"),
}


@pytest.mark.parametrize("case", list(RAKEFILE_CASES))
def test_run_bad_rakefile_itself(farm: LocalFarm, tmp_path: Path, case: str) -> None:
    make, fragment = RAKEFILE_CASES[case]
    make(tmp_path / "Rakefile")
    before = job_count(farm)
    r = herder("run", "-m", farm.url, cwd=tmp_path)
    assert_refused(r, "Rakefile", fragment)
    assert "\x1b" not in r.stderr
    assert job_count(farm) == before


def test_run_bad_rakefile_embedded(tmp_path: Path) -> None:
    (tmp_path / "Rakefile").write_text("a:\n\tremote-cat nope\n\t\trequires nope\n")
    r = herder("run", "--slots", "1", cwd=tmp_path)
    assert_refused(r, "Rakefile", "does not exist")


# ------------------------------------------------------------------ herder submit

_TASK = '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "cat x"\n'
SUBMIT_CASES: dict[str, tuple[str, str | bytes, str]] = {
    # name: (file name, content, fragment of the message)
    "toml-requires-escape": ("job.toml", _TASK + 'requires = ["pw"]\n', "outside the project"),
    "toml-requires-missing": ("job.toml", _TASK + 'requires = ["nope"]\n', "does not exist"),
    "toml-requires-dir": ("job.toml", _TASK + 'requires = ["d"]\n', "is a directory"),
    "toml-requires-fifo": ("job.toml", _TASK + 'requires = ["ff"]\n', "FIFO"),
    "toml-frames-too-many-tasks": (
        "job.toml",
        '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "r {start}"\nframes = "1-1000000"\n',
        "at most 100000",
    ),
    "toml-frame-past-2**63": (
        "job.toml",
        '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "r"\nframes = "9223372036854775808"\n',
        "out of range",
    ),
    "toml-name-escape": ("job.toml", 'name = "a\\u001b[31m"\n' + _TASK, "control character"),
    "toml-task-name-nul": ("job.toml", _TASK + 'name = "t\\u0000"\n', "control character"),
    "toml-syntax": ("job.toml", "[[stage]\n", "Expected ']]'"),
    "toml-non-utf8": ("job.toml", b'name = "\xff"\n', "invalid UTF-8"),
    "json-requires-escape": (
        "job.json",
        json.dumps(
            {
                "name": "j",
                "stages": [
                    {
                        "name": "s",
                        "tasks": [
                            {"command": "x", "requires": [{"path": "pw", "digest": "0" * 64}]}
                        ],
                    }
                ],
            }
        ),
        "outside the project",
    ),
    "json-name-nul": (
        "job.json",
        json.dumps(
            {"name": "j\x00\x1b[31m", "stages": [{"name": "s", "tasks": [{"command": "x"}]}]}
        ),
        "control character",
    ),
    "json-bad-value": (
        "job.json",
        '{"name": "j",\n "stages": [{"name": "s", "tasks": [{"command": "x", "cpus": -1}]}]}',
        "stages[0].tasks[0].cpus",
    ),
    "json-syntax": ("job.json", '{"name": "j",\n "stages": [}', "invalid JSON"),
    "json-non-utf8": ("job.json", b'{"name": "\xff"}', "invalid UTF-8"),
    "json-huge-int": ("job.json", '{"priority": ' + "9" * 5000 + "}", "invalid JSON"),
    "json-deep": ("job.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(SUBMIT_CASES))
def test_submit_bad_jobfile(farm: LocalFarm, tmp_path: Path, case: str) -> None:
    name, content, fragment = SUBMIT_CASES[case]
    (tmp_path / "pw").symlink_to("/etc/passwd")
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "ff")
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = job_count(farm)
    r = herder("submit", "-m", farm.url, name, cwd=tmp_path)
    m = assert_refused(r, name, fragment)
    assert "\x1b" not in r.stderr and "\x00" not in r.stderr
    if case == "json-bad-value":
        assert (m.group("line"), m.group("col")) == ("2", "54")  # the key "cpus"
    assert job_count(farm) == before


@pytest.mark.parametrize("kind", ["directory", "fifo", "100MB"])
def test_submit_jobfile_itself(farm: LocalFarm, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "job.toml"
    {"directory": _rakefile_dir, "fifo": os.mkfifo, "100MB": _rakefile_big}[kind](path)
    before = job_count(farm)
    r = herder("submit", "-m", farm.url, "job.toml", cwd=tmp_path)
    assert_refused(
        r, "job.toml", {"directory": "directory", "fifo": "FIFO", "100MB": "at most"}[kind]
    )
    assert job_count(farm) == before


# ------------------------------------------------------------------ what the CLI prints

EVIL = "evil\x1b[31m\x00red\x9b2J\u202e"


def test_status_shows_names_escaped(tmp_path: Path) -> None:
    """A job whose names hold escapes and a NUL (stored by some other client) is shown escaped."""
    from herder.api_models import JobSubmit, StageSpec, TaskSpec
    from herder.embedded import inspect_state

    state = tmp_path / ".herder"
    state.mkdir()
    client, store = inspect_state(state)
    try:
        # model_construct: the stored names come from elsewhere, past any API check
        task = TaskSpec.model_construct(
            name=EVIL, command="echo " + EVIL, placement="remote", requires=[], outputs=None,
            env={}, timeout_s=None, max_attempts=1, tags=[], cpus=1, ram_mb=0,
        )  # fmt: skip
        stage = StageSpec.model_construct(name=EVIL, tasks=[task])
        spec = JobSubmit.model_construct(
            name=EVIL, owner=None, pool="default", priority=0, idempotency_key=None,
            stages=[stage], blobs={},
        )  # fmt: skip
        job = client.submit_job(spec)
    finally:
        store.close()
    shown = "evil\\x1b[31m\\x00red\\x9b2J\\u202e"
    for args in (["status"], ["status", str(job.id)]):
        r = herder(*args, cwd=tmp_path, env={**os.environ, "COLUMNS": "300"})
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert shown in out, out
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", out), repr(out)


def test_run_progress_and_logs_escape_task_output(tmp_path: Path) -> None:
    """`herder run` progress lines and `herder logs` on a terminal escape a task's output;
    `herder logs` to a pipe gives the task's own text."""
    (tmp_path / "Rakefile").write_text("a:\n\tremote-printf 'x\\033[31mred\\001y\\n'\n")
    r = herder("run", "--slots", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[a[0] stdout] x\\x1b[31mred\\x01y" in r.stdout
    assert "\x1b" not in r.stdout
    jobs = json.loads(herder("status", "--json", cwd=tmp_path).stdout)
    job_id = str(jobs[0]["id"])

    piped = herder("logs", job_id, cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert "[a[0]] x\x1b[31mred\x01y" in piped.stdout  # raw: the task's own text

    leader, follower = pty.openpty()
    try:
        env = {k: v for k, v in os.environ.items() if k != "HERDER_MASTER"}
        proc = subprocess.run(
            [HERDER, "logs", job_id], cwd=tmp_path, stdout=follower, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, timeout=120, env=env,
        )  # fmt: skip
        os.close(follower)
        follower = -1
        got = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the writer is gone and everything was read
                break
            if not chunk:
                break
            got += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0, proc.stderr
    text = got.decode()
    assert "[a[0]] x\\x1b[31mred\\x01y" in text, repr(text)
    assert "\x1b" not in text
