"""herder.agent.watch through the executor: real processes, real RSS (issue 13)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from herder.agent import procs
from herder.agent.execspec import ExecSpec
from herder.agent.executor import Executor
from herder.agent.watch import oom_counters

PY = sys.executable


@pytest.fixture
def executor(tmp_path: Path) -> Executor:
    return Executor(tmp_path / "work", tmp_path / "blobs", subreaper=False, watch_interval_s=0.05)


def _spec(n: int, code: str, **kw: object) -> ExecSpec:
    return ExecSpec(attempt_id=n, command=[PY, "-c", code], **kw)  # type: ignore[arg-type]


def test_group_rss_sums_the_group(executor: Executor) -> None:
    ex = executor.execution(_spec(1, "import os, time; os.fork(); time.sleep(5)"))
    ex.prepare()
    assert ex.start() is None
    try:
        assert ex.pgid is not None
        time.sleep(0.5)
        one = procs.group_rss([ex.pgid])[ex.pgid]
        assert one > 2 * 4 * 2**20  # two Python processes, several MB each
        assert procs.group_rss([999_999_999]) == {}
    finally:
        ex.cancel()
        ex.wait()


def test_killed_past_its_ram(executor: Executor) -> None:
    code = "b = bytearray(200 * 2**20); import time; time.sleep(10)"
    t0 = time.monotonic()
    _, res = executor.run(_spec(2, code, ram_mb=50))
    assert time.monotonic() - t0 < 5  # killed, not slept out
    assert res.outcome == "memory"
    assert res.error is not None and "exceeded its ram_mb of 50 MB" in res.error
    assert res.peak_rss_mb is not None and res.peak_rss_mb > 55
    assert res.exit_code == 137


def test_within_its_ram_runs_to_the_end(executor: Executor) -> None:
    _, res = executor.run(
        _spec(3, "b = bytearray(20 * 2**20); import time; time.sleep(1.5)", ram_mb=200)
    )
    assert res.outcome == "exited" and res.exit_code == 0
    assert res.peak_rss_mb is not None and 20 <= res.peak_rss_mb < 200


def test_sigkill_near_the_limit_is_taken_for_the_oom_killer(executor: Executor) -> None:
    # The kernel's OOM kill as the agent sees it: SIGKILL it did not send, RSS at the limit.
    code = (
        "import os, time, signal; b = bytearray(95 * 2**20); time.sleep(0.6); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    _, res = executor.run(_spec(4, code, ram_mb=100))
    assert res.outcome == "memory", res
    assert res.error is not None and "OOM killer" in res.error and "limit 100 MB" in res.error


def test_sigkill_far_below_the_limit_is_an_ordinary_exit(executor: Executor) -> None:
    before = oom_counters()
    code = "import os, time, signal; time.sleep(0.6); os.kill(os.getpid(), signal.SIGKILL)"
    _, res = executor.run(_spec(5, code, ram_mb=1000))
    if oom_counters() != before:  # pragma: no cover - a real OOM kill elsewhere meanwhile
        pytest.fail("an OOM kill happened on this machine during the test: rerun it")
    assert res.outcome == "exited" and res.exit_code == 137
    assert res.error == "killed by SIGKILL"


def test_progress_from_the_output(executor: Executor) -> None:
    code = (
        "import sys, time\n"
        "for p in (10, 45.5):\n"
        "    print(f'rendering {p}%', flush=True); time.sleep(0.3)\n"
        "print('noise 300%', flush=True)\n"
        "sys.stderr.write('last 80%')\n"  # no newline: read at the end
    )
    ex = executor.execution(_spec(6, code, progress_pattern=r"(\d+(?:\.\d+)?)%"))
    ex.prepare()
    assert ex.start() is None
    seen: set[float] = set()
    while ex.proc is not None and ex.proc.poll() is None:
        if ex.progress is not None:
            seen.add(ex.progress)
        time.sleep(0.02)
    res = ex.wait()
    assert res.outcome == "exited" and res.progress == 80.0
    assert seen & {10.0, 45.5}  # seen while it ran


def test_stuck_is_killed_as_a_command_failure(executor: Executor) -> None:
    code = "import time; print('started', flush=True); time.sleep(30)"
    t0 = time.monotonic()
    _, res = executor.run(_spec(7, code, stuck_timeout_s=0.5))
    assert time.monotonic() - t0 < 10
    assert res.outcome == "timeout"
    assert res.error == "stuck: no output for 0.5 s"


def test_steady_output_is_not_stuck(executor: Executor) -> None:
    # 4 s of output every 0.2 s outlasts the 1.5 s limit (which leaves room for start-up)
    code = "import time\nfor i in range(20):\n    print(i, flush=True); time.sleep(0.2)\n"
    _, res = executor.run(_spec(8, code, stuck_timeout_s=1.5))
    assert res.outcome == "exited" and res.exit_code == 0


def test_ram_tolerance_from_env() -> None:
    from herder.agent.watch import ram_tolerance_from_env

    assert ram_tolerance_from_env({}) == 0.1
    assert ram_tolerance_from_env({"HERDER_RAM_TOLERANCE": "0.25"}) == 0.25
    for bad in ("lots", "-0.1", "2"):
        with pytest.raises(ValueError, match="HERDER_RAM_TOLERANCE"):
            ram_tolerance_from_env({"HERDER_RAM_TOLERANCE": bad})
