"""The master's database health tracker (herder.master.dbhealth): one line when
the database is lost, one when it is back, and stragglers of an outage that is
over (calls stuck through it that fail late) do not open another."""

from __future__ import annotations

import logging
import time

import pytest

from herder.errors import DatabaseBusy, DatabaseFull, DatabaseUnavailable
from herder.master.dbhealth import DatabaseHealth


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split()[0] for r in caplog.records if r.name == "herder.master"]


def test_one_line_when_lost_and_one_when_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "herder.master")
    h = DatabaseHealth()
    for _ in range(5):
        h.failed(DatabaseUnavailable("refused"), time.monotonic())
    assert (h.up, h.problem, h.failures) == (False, "unavailable", 5)
    h.succeeded(wrote=False)
    h.succeeded(wrote=False)
    assert h.up
    assert events(caplog) == ["event=database_lost", "event=database_back"]


def test_a_call_from_before_the_recovery_does_not_reopen_the_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "herder.master")
    h = DatabaseHealth()
    stuck = time.monotonic()  # a call that hangs through the whole outage
    h.failed(DatabaseUnavailable("gone"), time.monotonic())
    h.succeeded(wrote=True)  # a newer call: the database is back
    h.failed(DatabaseUnavailable("connection reset"), stuck)  # the straggler fails late
    assert h.up and h.failures == 2
    assert events(caplog) == ["event=database_lost", "event=database_back"]
    # A call that starts after the recovery and fails is a new outage.
    h.failed(DatabaseUnavailable("gone again"), time.monotonic())
    assert h.problem == "unavailable"
    assert events(caplog)[-1] == "event=database_lost"


def test_a_full_disk_ends_only_with_a_committed_write() -> None:
    h = DatabaseHealth()
    h.failed(DatabaseFull("disk full"))
    h.succeeded(wrote=False)  # reads still work on a full disk
    assert h.problem == "full"
    h.succeeded(wrote=True)
    assert h.up


def test_busy_is_counted_but_not_an_outage() -> None:
    h = DatabaseHealth()
    h.failed(DatabaseBusy("locked"))
    assert h.up and h.failures == 1
