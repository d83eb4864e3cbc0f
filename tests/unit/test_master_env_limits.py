"""`herder master` reads its input limits from the environment; a bad value is one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from herder.localfarm import free_port


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("HERDER_MAX_BODY_BYTES", "abc", "expected a positive integer"),
        ("HERDER_MAX_TASKS_PER_JOB", "-5", "expected a positive integer"),
        ("HERDER_DB_TIMEOUT_S", "soon", "expected a positive number"),
    ],
)
def test_bad_limit_exits_with_one_line(tmp_path: Path, env: str, value: str, expected: str) -> None:
    db = f"sqlite:///{tmp_path / 'm.db'}"
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "herder", "master", "--db", db, "--listen", listen],
        env={"PATH": "/usr/bin:/bin", env: value, "PYTHONPATH": ":".join(sys.path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert f"herder master: {env}={value!r}: {expected}" in proc.stderr
    assert "Traceback" not in proc.stderr
