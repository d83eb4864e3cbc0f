"""`--master-timeout` / HERDER_MASTER_TIMEOUT through the `herder` console script.

Bad values are one clear line naming their source (exit 2, nothing sent);
no master at all gives up with the documented line and exit status 75.
Real processes, real loopback sockets (a port nothing listens on).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from herder.localfarm import free_port

HERDER = Path(sys.executable).parent / "herder"


def herder(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_MASTER")}
    run_env.update(env or {})
    return subprocess.run(
        [str(HERDER), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=run_env,
        stdin=subprocess.DEVNULL,
    )


def test_a_bad_option_value_is_one_line_naming_the_option(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    r = herder("status", "--master", url, "--master-timeout", "soon", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr == (
        "error: --master-timeout: 'soon' is not a duration: give seconds (90, 1.5) "
        "or a duration like 90s, 5m, 1h30m, 250ms\n"
    )


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    (tmp_path / "Rakefile").write_text("a:\n\tremote-true\n")
    url = f"http://127.0.0.1:{free_port()}"
    r = herder(
        "run", "--master", url, "Rakefile", cwd=tmp_path, env={"HERDER_MASTER_TIMEOUT": "-5m"}
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: HERDER_MASTER_TIMEOUT: '-5m' is not"), (
        r.stderr
    )
    # The option wins over the environment.
    r = herder(
        "cancel",
        "7",
        "--master",
        url,
        "--master-timeout",
        "0",
        cwd=tmp_path,
        env={"HERDER_MASTER_TIMEOUT": "junk"},
    )
    assert r.returncode == 75, r.stderr


def test_no_master_gives_up_with_exit_75_and_names_the_job(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    r = herder("cancel", "7", "--master", url, "--master-timeout", "0", cwd=tmp_path)
    assert r.returncode == 75, r.stderr
    assert r.stderr == (
        f"herder: no master answered (tried: {url} refused); job 7 goes on in the farm — "
        f"follow it with 'herder status 7 --master {url}'\n"
    )


def test_the_environment_sets_how_long_to_wait(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = herder("status", "--master", url, cwd=tmp_path, env={"HERDER_MASTER_TIMEOUT": "1s"})
    waited = time.monotonic() - t0
    assert r.returncode == 75, r.stderr
    assert r.stderr.splitlines() == [
        f"herder: lost the master at {url} (connection refused); waiting up to 1s for a master…",
        f"herder: no master answered for 1s (tried: {url} refused)",
    ]
    assert waited >= 1.0
