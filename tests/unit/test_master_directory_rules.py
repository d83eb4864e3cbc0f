"""The master directory's pure parts: the visibility rule (herder.core.rules),
the failure-report body, the advertised URL, and the master_info metric."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from herder.api_models import AgentRegister, Heartbeat, MasterFailureReport
from herder.core.rules import (
    DEFAULT_MASTER_HEARTBEAT_S,
    MasterDown,
    MasterState,
    master_down_reason,
    master_state,
    master_timeout_s,
    master_visible,
)
from herder.master.metrics import MasterStats
from herder.master.server import default_advertise_url, normalize_advertise_url

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
TIMEOUT = 6.0


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


# ----------------------------------------------------------------- the rule


def test_timeout_defaults_to_three_intervals() -> None:
    assert DEFAULT_MASTER_HEARTBEAT_S == 2.0
    assert master_timeout_s(2.0) == 6.0
    assert master_timeout_s(0.5) == 1.5
    assert master_timeout_s(2.0, 10.0) == 10.0


def test_fresh_heartbeat_without_failures_is_up() -> None:
    assert master_visible("up", ago(1), None, NOW, TIMEOUT)
    assert master_state("up", ago(1), None, NOW, TIMEOUT) is MasterState.UP
    assert master_down_reason("up", ago(1), None, NOW, TIMEOUT) is None


@pytest.mark.parametrize(
    ("age", "visible"), [(0.0, True), (5.999, True), (6.0, True), (6.001, False), (600, False)]
)
def test_stale_heartbeat_is_not_up(age: float, visible: bool) -> None:
    assert master_visible("up", ago(age), None, NOW, TIMEOUT) is visible
    if not visible:
        assert master_state("up", ago(age), None, NOW, TIMEOUT) is MasterState.FAILED
        assert (
            master_down_reason("up", ago(age), None, NOW, TIMEOUT) is MasterDown.HEARTBEAT_TIMEOUT
        )


def test_no_heartbeat_at_all_is_not_up() -> None:
    assert not master_visible("up", None, None, NOW, TIMEOUT)


def test_failure_after_the_last_heartbeat_hides_it() -> None:
    assert not master_visible("up", ago(2), ago(1), NOW, TIMEOUT)
    assert master_state("failed", ago(2), ago(1), NOW, TIMEOUT) is MasterState.FAILED
    assert master_down_reason("up", ago(2), ago(1), NOW, TIMEOUT) is MasterDown.FAILURE_REPORTED


def test_failure_in_the_same_clock_tick_as_the_heartbeat_hides_it() -> None:
    assert not master_visible("up", ago(1), ago(1), NOW, TIMEOUT)


def test_a_heartbeat_after_the_failure_makes_it_visible_again() -> None:
    # The stored state may still say "failed": the timestamps decide.
    assert master_visible("up", ago(1), ago(3), NOW, TIMEOUT)
    assert master_visible("failed", ago(1), ago(3), NOW, TIMEOUT)


def test_sequence_heartbeat_failure_heartbeat() -> None:
    t0 = NOW
    hb = t0
    failure = None
    assert master_visible("up", hb, failure, t0 + timedelta(seconds=0.1), TIMEOUT)
    failure = t0 + timedelta(seconds=0.5)
    assert not master_visible("up", hb, failure, t0 + timedelta(seconds=1), TIMEOUT)
    hb = t0 + timedelta(seconds=2)
    assert master_visible("up", hb, failure, t0 + timedelta(seconds=2.1), TIMEOUT)
    # ... and it drops out again once that heartbeat is too old.
    assert not master_visible("up", hb, failure, t0 + timedelta(seconds=9), TIMEOUT)


def test_stopped_is_never_up_even_with_a_fresh_heartbeat() -> None:
    assert not master_visible("stopped", ago(0), None, NOW, TIMEOUT)
    assert master_state("stopped", ago(0), ago(3), NOW, TIMEOUT) is MasterState.STOPPED
    assert master_down_reason("stopped", ago(100), None, NOW, TIMEOUT) is MasterDown.STOPPED


def test_states_are_the_wire_names() -> None:
    assert {s.value for s in MasterState} == {"up", "failed", "stopped"}


# ------------------------------------------------------------ request bodies


def _report(**over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "time": "2025-01-01T12:00:00Z",
        "reporter": "agent@host",
        "request": "POST /api/v1/agents/a/claim",
        "kind": "unreachable",
        "url": "http://127.0.0.2:6240",
    }
    body.update(over)
    return body


def test_failure_report_accepts_what_the_client_sends() -> None:
    r = MasterFailureReport.model_validate(_report())
    assert r.time == NOW and r.kind == "unreachable" and r.url == "http://127.0.0.2:6240"
    minimal = MasterFailureReport.model_validate(
        {"time": "2025-01-01T12:00:00Z", "reporter": "r", "kind": "busy"}
    )
    assert minimal.request == "" and minimal.url is None


@pytest.mark.parametrize(
    "body",
    [
        _report(extra="x"),
        _report(time="yesterday"),
        _report(reporter=""),
        _report(kind=""),
        _report(kind="Not A Kind"),
        _report(request="x" * 501),
        {k: v for k, v in _report().items() if k != "reporter"},
        {k: v for k, v in _report().items() if k != "time"},
        {k: v for k, v in _report().items() if k != "kind"},
    ],
)
def test_failure_report_rejects_bad_bodies(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        MasterFailureReport.model_validate(body)


def test_agent_mode_in_heartbeat_and_register() -> None:
    assert Heartbeat().mode == "master"
    assert Heartbeat.model_validate({"mode": "autonomous"}).mode == "autonomous"
    with pytest.raises(ValidationError):
        Heartbeat.model_validate({"mode": "rogue"})
    reg = AgentRegister(name="a", hostname="h", slots=1)
    assert reg.mode is None


# --------------------------------------------------------- URL and metrics


def test_default_advertise_url() -> None:
    assert default_advertise_url("127.0.0.2", 6240) == "http://127.0.0.2:6240"
    assert default_advertise_url("::1", 6240) == "http://[::1]:6240"
    wildcard = default_advertise_url("0.0.0.0", 7000)
    assert wildcard.startswith("http://") and wildcard.endswith(":7000")
    assert "0.0.0.0" not in wildcard


def test_normalize_advertise_url() -> None:
    assert normalize_advertise_url("https://farm.example/m1/") == "https://farm.example/m1"
    assert normalize_advertise_url(" http://[::1]:6240 ") == "http://[::1]:6240"
    for bad in ("farm.example:6240", "ftp://x", "http://", "http://x/?a=1"):
        with pytest.raises(ValueError):
            normalize_advertise_url(bad)


def test_master_info_metric() -> None:
    stats = MasterStats(master_id="h:127.0.0.2:6240", url="http://127.0.0.2:6240")
    text = stats.prometheus()
    assert 'herder_master_info{id="h:127.0.0.2:6240",url="http://127.0.0.2:6240"} 1' in text
    assert "herder_requests_total 0" in text
    odd = MasterStats(master_id='a"b\\c', url="u\nv").prometheus()
    assert 'herder_master_info{id="a\\"b\\\\c",url="u\\nv"} 1' in odd
