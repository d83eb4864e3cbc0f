"""herder.core.rules.ram_retry_decision and RamRetryPolicy; herder.taskwatch (issue 13)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herder.api_models import TaskSpec
from herder.core.rules import RamRetryPolicy, ram_retry_decision
from herder.core.states import TaskEvent, TaskState, next_task_state
from herder.store.watch import ram_retry_policy_from_env
from herder.taskwatch import progress_of, progress_pattern_problem


def test_first_raise_multiplies_the_limit() -> None:
    d = ram_retry_decision(512, 700, memory_failures=0)
    assert d.retry and d.ram_mb == 768 and d.memory_failures == 1
    assert d.reason == "exceeded 512 MB (peak 700 MB): retrying with 768 MB"


def test_the_limit_not_the_peak_is_multiplied() -> None:
    # The peak is where the watch caught it (first sample past the limit), not its need.
    for peak in (90, 150, 1000, None):
        d = ram_retry_decision(100, peak, memory_failures=2, policy=RamRetryPolicy(factor=1.5))
        assert d.retry and d.ram_mb == 150 and d.memory_failures == 3


def test_rounds_up_to_whole_megabytes() -> None:
    assert ram_retry_decision(101, None, memory_failures=0).ram_mb == 152
    assert (
        ram_retry_decision(100, None, memory_failures=0, policy=RamRetryPolicy(1.1)).ram_mb == 110
    )


def test_no_limit_uses_the_peak() -> None:
    d = ram_retry_decision(0, 1000, memory_failures=0)
    assert d.retry and d.ram_mb == 1500
    assert d.reason == "ran out of memory (peak 1000 MB): retrying with 1500 MB"


def test_no_limit_and_no_peak_fails() -> None:
    d = ram_retry_decision(0, None, memory_failures=0)
    assert not d.retry and d.ram_mb == 0
    assert "no larger limit" in d.reason


def test_capped_at_the_ceiling_then_fails_past_it() -> None:
    policy = RamRetryPolicy(factor=2.0, ceiling_mb=1000)
    d = ram_retry_decision(600, 650, memory_failures=0, policy=policy)
    assert d.retry and d.ram_mb == 1000
    d2 = ram_retry_decision(1000, 1100, memory_failures=1, policy=policy)
    assert not d2.retry and d2.ram_mb == 1000 and d2.memory_failures == 2
    assert d2.reason == (
        "exceeded 1000 MB (peak 1100 MB): already at the RAM retry ceiling of 1000 MB, not retrying"
    )


def test_largest_agent_lowers_the_ceiling() -> None:
    d = ram_retry_decision(3000, 3100, memory_failures=0, largest_agent_mb=4096)
    assert d.retry and d.ram_mb == 4096
    assert not ram_retry_decision(4096, 4200, memory_failures=1, largest_agent_mb=4096).retry
    # unknown agent RAM (0): the configured ceiling alone
    assert ram_retry_decision(3000, None, memory_failures=0, largest_agent_mb=0).ram_mb == 4500


def test_own_budget_of_raises() -> None:
    policy = RamRetryPolicy(max_raises=2)
    assert ram_retry_decision(100, None, memory_failures=1, policy=policy).retry
    d = ram_retry_decision(225, None, memory_failures=2, policy=policy)
    assert not d.retry and "raised 2 times already" in d.reason


@pytest.mark.parametrize(
    "kwargs",
    [{"factor": 1.0}, {"factor": 1.05}, {"factor": 11}, {"ceiling_mb": 0}, {"max_raises": -1}],
)
def test_policy_bounds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RamRetryPolicy(**kwargs)  # type: ignore[arg-type]


@given(
    ram=st.integers(0, 1 << 20),
    peak=st.one_of(st.none(), st.integers(0, 1 << 21)),
    failures=st.integers(0, 20),
    largest=st.one_of(st.none(), st.integers(0, 1 << 20)),
    factor=st.floats(1.1, 10),
    ceiling=st.integers(1, 1 << 20),
)
def test_invariants(
    ram: int, peak: int | None, failures: int, largest: int | None, factor: float, ceiling: int
) -> None:
    policy = RamRetryPolicy(factor=factor, ceiling_mb=ceiling)
    d = ram_retry_decision(
        ram, peak, memory_failures=failures, largest_agent_mb=largest, policy=policy
    )
    limit = min(ceiling, largest) if largest else ceiling
    assert d.memory_failures == failures + 1
    if d.retry:
        assert ram < d.ram_mb <= limit  # always more, never past the ceiling
        assert failures < policy.max_raises
        assert d.reason.endswith(f"retrying with {d.ram_mb} MB")
    else:
        assert d.ram_mb == ram
        assert ram >= limit or failures >= policy.max_raises or max(ram, peak or 0) == 0


def test_retries_terminate() -> None:
    """From any start, repeated memory failures end in a failure within max_raises + 1."""
    policy = RamRetryPolicy(factor=1.1, ceiling_mb=1 << 16, max_raises=1000)
    ram, n = 1, 0
    while True:
        d = ram_retry_decision(ram, None, memory_failures=n, policy=policy)
        if not d.retry:
            break
        ram, n = d.ram_mb, d.memory_failures
    assert ram == 1 << 16 and n < 200


def test_ram_raised_requeues_from_offered_and_running() -> None:
    for src in (TaskState.OFFERED, TaskState.RUNNING):
        assert next_task_state(src, TaskEvent.RAM_RAISED) is TaskState.QUEUED


def test_policy_from_env() -> None:
    p = ram_retry_policy_from_env(
        {"HERDER_RAM_RETRY_FACTOR": "2", "HERDER_RAM_RETRY_CEILING_MB": "8192"}
    )
    assert p == RamRetryPolicy(factor=2.0, ceiling_mb=8192)
    assert ram_retry_policy_from_env({}) == RamRetryPolicy()
    with pytest.raises(ValueError, match="HERDER_RAM_RETRY_CEILING_MB='lots'"):
        ram_retry_policy_from_env({"HERDER_RAM_RETRY_CEILING_MB": "lots"})
    with pytest.raises(ValueError, match="HERDER_RAM_RETRY_FACTOR='1'"):
        ram_retry_policy_from_env({"HERDER_RAM_RETRY_FACTOR": "1"})


# ------------------------------------------------------------------ progress


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        (r"(\d+)%", None),
        (r"Fra:\d+ .* (\d+(?:\.\d+)?)/100", None),
        (r"\d+%", "exactly one capturing group"),
        (r"(\d+)/(\d+)", "exactly one capturing group"),
        (r"(\d+%", "not a valid regular expression"),
        ("", "empty"),
        ("(x)" + "y" * 600, "longer than 500"),
    ],
)
def test_progress_pattern_problem(pattern: str, problem: str | None) -> None:
    got = progress_pattern_problem(pattern)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


def test_progress_of() -> None:
    rx = re.compile(r"(\d+(?:[.,]\d+)?)%")
    assert progress_of(rx, "rendering 42%") == 42.0
    assert progress_of(rx, "rendering 12,5%") == 12.5
    assert progress_of(rx, "done 100%") == 100.0
    assert progress_of(rx, "bogus 250%") is None  # not 0-100
    assert progress_of(rx, "no number here") is None
    assert progress_of(re.compile(r"(x)?y"), "y") is None  # the group did not take part


def test_taskspec_validates_watch_fields() -> None:
    ok = TaskSpec(command="true", progress_pattern=r"(\d+)%", stuck_timeout_s=30)
    assert ok.progress_pattern == r"(\d+)%" and ok.stuck_timeout_s == 30
    with pytest.raises(ValueError, match="exactly one capturing group"):
        TaskSpec(command="true", progress_pattern=r"\d+%")
    with pytest.raises(ValueError, match="greater than 0"):
        TaskSpec(command="true", stuck_timeout_s=0)
    with pytest.raises(ValueError, match="less than or equal"):
        TaskSpec(command="true", stuck_timeout_s=1e9)
