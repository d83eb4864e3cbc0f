"""The master directory's wire models (DESIGN §6, seeds/001 "master information").

Part of the API contract of ``herder.api_models``, which re-exports them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from herder.api_base import _In, _Out

MasterRole = Literal["read-write", "read-only"]
MasterStateName = Literal["up", "failed", "stopped"]


class MasterView(_Out):
    """One master of the farm (seeds/001 "master information")."""

    id: str
    href: str
    url: str = Field(description="the URL agents and clients use to reach it")
    role: MasterRole
    state: MasterStateName
    down_reason: Literal["stopped", "heartbeat_timeout", "failure_reported"] | None = None
    started_at: datetime
    last_heartbeat_at: datetime
    heartbeat_timeout_s: float
    version: str | None = None
    requests: int = Field(description="requests handled since it started")
    unhandled_exceptions: int
    avg_request_ms: float
    in_flight: int
    failures: int = Field(description="failures to reach it reported by agents and clients")
    last_failure_at: datetime | None = None
    failures_href: str


class MasterList(_Out):
    masters: list[MasterView]


class MasterFailureReport(_In):
    """An agent's or client's failure to reach a master (DESIGN §6)."""

    time: datetime = Field(description="when it failed, by the reporter's clock (ISO 8601)")
    reporter: str = Field(min_length=1, max_length=200)
    request: str = Field(default="", max_length=500, description='e.g. "POST /api/v1/jobs"')
    kind: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,49}$",
        description="unreachable, timeout, broken, busy, gateway, …",
    )
    url: str | None = Field(default=None, max_length=2000, description="the URL that failed")


class MasterFailureView(_Out):
    id: int
    master_id: str
    time: datetime = Field(description="the reporter's time of the failure")
    received_at: datetime = Field(description="when a master recorded it (database clock)")
    reporter: str
    request: str
    kind: str
    url: str | None = None


class MasterFailureList(_Out):
    failures: list[MasterFailureView]
