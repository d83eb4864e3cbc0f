"""Issue 3 acceptance: `herder run` builds Rakefiles for real (real processes)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.localfarm import LocalFarm

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "examples" / "sum-of-squares" / "generate.py"


def herder(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    return subprocess.run(
        [sys.executable, "-m", "herder", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFarm]:
    """A separately started master and two agents (`herder run --master`)."""
    f = LocalFarm(workdir=tmp_path_factory.mktemp("farm"))
    f.start_master()
    f.start_agent(slots=2, name="r1")
    f.start_agent(slots=2, name="r2")
    f.wait_agents(2)
    yield f
    f.close()


def job_count(farm: LocalFarm) -> int:
    return len(httpx.get(f"{farm.url}/api/v1/jobs", params={"limit": 10000}).json()["jobs"])


def test_sum_of_squares_n40_embedded(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(GENERATE), "40", str(tmp_path)], check=True)
    r = herder("run", "--slots", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    expected = sum(i * i for i in range(1, 41))
    assert f"[run[0] stdout] {expected}" in r.stdout
    assert (tmp_path / "program40").exists() and os.access(tmp_path / "program40", os.X_OK)
    assert (
        subprocess.run([str(tmp_path / "program40")], capture_output=True, text=True).stdout
        == f"{expected}\n"
    )
    assert "build succeeded" in r.stdout

    # The embedded farm's state outlives the run: status and logs read it.
    st = herder("status", "--json", cwd=tmp_path)
    assert st.returncode == 0, st.stderr
    jobs = json.loads(st.stdout)
    assert sorted(j["name"].split(": ")[1] for j in jobs) == [
        "compile-functions",
        "compile-program",
        "link",
    ]
    assert {j["state"] for j in jobs} == {"succeeded"}
    compile_job = next(j for j in jobs if j["name"].endswith("compile-functions"))
    assert compile_job["counts"].get("succeeded") == 40
    lg = herder("logs", str(compile_job["id"]), cwd=tmp_path)
    assert lg.returncode == 0, lg.stderr


def test_sum_of_squares_against_a_running_farm(farm: LocalFarm, tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(GENERATE), "12", str(tmp_path)], check=True)
    r = herder("run", "--master", farm.url, "Rakefile", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"[run[0] stdout] {sum(i * i for i in range(1, 13))}" in r.stdout


def test_failing_action_stops_the_build(farm: LocalFarm, tmp_path: Path) -> None:
    example = ROOT / "examples" / "failing-build"
    for f in ("Rakefile", "good.c", "broken.c"):
        (tmp_path / f).write_bytes((example / f).read_bytes())
    r = herder("run", "-m", farm.url, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "build FAILED" in out and "compile[1]" in out and "exit status 1" in out
    assert "broken.c" in out and "error" in out  # the compiler's stderr is shown
    assert not (tmp_path / "program").exists()
    assert "== link" not in out, "no later actionset may start"


def test_local_and_remote_mixed_with_subdirectories_and_comments(
    farm: LocalFarm, tmp_path: Path
) -> None:
    (tmp_path / "Rakefile").write_text(
        "# mixing local and remote actions\n"
        "HOSTS = alpha beta:7000\n"
        "PORT = 7001   # after HOSTS on purpose\n"
        "\n"
        "generate:\n"
        "\tmkdir -p src/deep && echo hello > src/deep/msg.txt   # local\n"
        "\n"
        "   \n"
        "shout:\n"
        "\tremote-tr a-z A-Z < src/deep/msg.txt > loud.txt  # remote, comment after\n"
        "\t\trequires ./src/deep/msg.txt\n"
        "\tremote-mkdir -p res/sub && cp src/deep/msg.txt res/sub/copy.txt\n"
        "\t\trequires src/deep/msg.txt\n"
        "\n"
        "check:\n"
        "\tcat loud.txt res/sub/copy.txt\n"
    )
    r = herder("run", "-m", farm.url, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "loud.txt").read_text() == "HELLO\n"
    assert (tmp_path / "res" / "sub" / "copy.txt").read_text() == "hello\n"
    assert "[check[0] stdout] HELLO" in r.stdout
    assert "[check[0] stdout] hello" in r.stdout


def test_binary_output_round_trips_byte_for_byte(farm: LocalFarm, tmp_path: Path) -> None:
    (tmp_path / "make_bin.py").write_text(
        "import sys\n"
        "data = bytes(range(256)) * 64 + bytes([0, 255, 10, 13]) * 100\n"
        "open('out.bin', 'wb').write(data)\n"
    )
    (tmp_path / "Rakefile").write_text(
        f"bin:\n\tremote-{sys.executable} make_bin.py\n\t\trequires make_bin.py\n"
    )
    r = herder("run", "-m", farm.url, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    expected = bytes(range(256)) * 64 + bytes([0, 255, 10, 13]) * 100
    got = (tmp_path / "out.bin").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("\techo hi\n", "Rakefile:1:", "actionset"),
        ("a:\n    echo spaces\n", "Rakefile:2:1", "tab"),
        ("a:\n\t\trequires x.c\n", "Rakefile:2:", "requires"),
        ("PORT = lots\na:\n\techo hi\n", "Rakefile:1:", "PORT"),
    ],
)
def test_bad_rakefile_one_line_exit_2_nothing_submitted(
    farm: LocalFarm, tmp_path: Path, text: str, where: str, what: str
) -> None:
    (tmp_path / "Rakefile").write_text(text)
    before = job_count(farm)
    r = herder("run", "-m", farm.url, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(where) and what.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in r.stderr
    assert job_count(farm) == before


def test_missing_required_file_is_a_clear_error(farm: LocalFarm, tmp_path: Path) -> None:
    (tmp_path / "Rakefile").write_text("a:\n\tremote-cat nope.txt\n\t\trequires nope.txt\n")
    before = job_count(farm)
    r = herder("run", "-m", farm.url, cwd=tmp_path)
    assert r.returncode == 2
    assert "nope.txt" in r.stderr and "Traceback" not in r.stderr
    assert job_count(farm) == before
