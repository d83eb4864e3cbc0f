"""Retention settings (issue 9): durations, ``0``/``off``, the environment, the CLI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from herder.cli import app
from herder.store.retention import (
    DEFAULT_RETENTION_S,
    RetentionPolicy,
    parse_duration,
    parse_retention,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("14d", 14 * 86400.0), ("12h", 43200.0), ("30m", 1800.0), ("90s", 90.0), ("2W", 1209600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_retention(text) == seconds


@pytest.mark.parametrize("text", ["0", "off", "OFF", " none "])
def test_zero_or_off_keeps_everything(text: str) -> None:
    assert parse_retention(text) is None


@pytest.mark.parametrize("text", ["", "14", "d", "-1d", "14 days", "1.5.2h"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_retention(text)


def test_policy_from_env() -> None:
    assert RetentionPolicy.from_env({}).retention_s == DEFAULT_RETENTION_S
    p = RetentionPolicy.from_env({"HERDER_RETENTION": "3d", "HERDER_BLOB_GRACE": "6h"})
    assert (p.retention_s, p.blob_grace_s) == (3 * 86400.0, 6 * 3600.0)
    assert RetentionPolicy.from_env({"HERDER_RETENTION": "off"}).retention_s is None
    with pytest.raises(ValueError, match="HERDER_RETENTION"):
        RetentionPolicy.from_env({"HERDER_RETENTION": "soon"})


def test_master_refuses_a_bad_retention_without_a_traceback() -> None:
    result = CliRunner().invoke(app, ["master", "--retention", "fortnight"])
    assert result.exit_code == 2
    assert "--retention" in result.output and "expected a duration" in result.output
    assert "Traceback" not in result.output
