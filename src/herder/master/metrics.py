"""Master information of seeds/001: requests handled, unhandled exceptions,
average request time. A pure ASGI middleware keeps the per-request cost tiny."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from herder.master.dbhealth import DatabaseHealth


@dataclass
class MasterStats:
    started_at: float = field(default_factory=time.time)
    requests: int = 0
    in_flight: int = 0
    errors_5xx: int = 0
    unhandled_exceptions: int = 0
    total_seconds: float = 0.0
    reaped: int = 0  # tasks requeued or failed by this master's maintenance
    maintenance: bool = False  # holds the maintenance lock now
    pruned_jobs: int = 0  # finished jobs past retention this master pruned
    pruned_blobs: int = 0  # unreferenced blobs it collected
    pruned_bytes: int = 0  # ... and their size
    wake_rounds: int = 0  # talkback wake rounds that found idle agents (herder.master.wake)
    wakes_sent: int = 0  # talkback wake requests sent to agents
    wake_failures: int = 0  # ... that failed (unreachable, refused): latency only
    master_id: str = ""  # its id in the master directory
    url: str = ""  # the URL it advertises in the directory
    health: DatabaseHealth = field(default_factory=DatabaseHealth)  # the database: up or lost

    @property
    def average_seconds(self) -> float:
        return self.total_seconds / self.requests if self.requests else 0.0

    def prometheus(self) -> str:
        lines = [
            "# HELP herder_requests_total HTTP requests handled by this master.",
            "# TYPE herder_requests_total counter",
            f"herder_requests_total {self.requests}",
            "# HELP herder_requests_in_flight HTTP requests being handled now.",
            "# TYPE herder_requests_in_flight gauge",
            f"herder_requests_in_flight {self.in_flight}",
            "# HELP herder_responses_5xx_total Responses with a 5xx status.",
            "# TYPE herder_responses_5xx_total counter",
            f"herder_responses_5xx_total {self.errors_5xx}",
            "# HELP herder_unhandled_exceptions_total Exceptions no handler expected.",
            "# TYPE herder_unhandled_exceptions_total counter",
            f"herder_unhandled_exceptions_total {self.unhandled_exceptions}",
            "# HELP herder_request_seconds_total Time spent handling requests.",
            "# TYPE herder_request_seconds_total counter",
            f"herder_request_seconds_total {self.total_seconds:.6f}",
            "# HELP herder_reaped_total Tasks this master's maintenance requeued or failed.",
            "# TYPE herder_reaped_total counter",
            f"herder_reaped_total {self.reaped}",
            "# HELP herder_pruned_jobs_total Finished jobs past retention pruned here.",
            "# TYPE herder_pruned_jobs_total counter",
            f"herder_pruned_jobs_total {self.pruned_jobs}",
            "# HELP herder_pruned_blobs_total Unreferenced blobs collected here.",
            "# TYPE herder_pruned_blobs_total counter",
            f"herder_pruned_blobs_total {self.pruned_blobs}",
            "# HELP herder_pruned_bytes_total Bytes of the blobs collected here.",
            "# TYPE herder_pruned_bytes_total counter",
            f"herder_pruned_bytes_total {self.pruned_bytes}",
            "# HELP herder_maintenance_holder 1 while this master holds the maintenance lock.",
            "# TYPE herder_maintenance_holder gauge",
            f"herder_maintenance_holder {int(self.maintenance)}",
            "# HELP herder_wake_rounds_total Talkback wake rounds that found idle agents.",
            "# TYPE herder_wake_rounds_total counter",
            f"herder_wake_rounds_total {self.wake_rounds}",
            "# HELP herder_wakes_sent_total Talkback wake requests sent to agents.",
            "# TYPE herder_wakes_sent_total counter",
            f"herder_wakes_sent_total {self.wakes_sent}",
            "# HELP herder_wake_failures_total Talkback wake requests that failed (latency only).",
            "# TYPE herder_wake_failures_total counter",
            f"herder_wake_failures_total {self.wake_failures}",
            "# HELP herder_database_up 0 while this master has lost its database.",
            "# TYPE herder_database_up gauge",
            f"herder_database_up {int(self.health.up)}",
            "# HELP herder_database_failures_total Store calls the database failed.",
            "# TYPE herder_database_failures_total counter",
            f"herder_database_failures_total {self.health.failures}",
            "# HELP herder_start_time_seconds Unix time this master started.",
            "# TYPE herder_start_time_seconds gauge",
            f"herder_start_time_seconds {self.started_at:.3f}",
            "# HELP herder_master_info This master's directory id and advertised URL.",
            "# TYPE herder_master_info gauge",
            f'herder_master_info{{id="{_label(self.master_id)}",url="{_label(self.url)}"}} 1',
        ]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value, escaped (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class StatsMiddleware:
    def __init__(self, app: ASGIApp, stats: MasterStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stats = self.stats
        start = time.perf_counter()
        stats.in_flight += 1

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 500:
                stats.errors_5xx += 1
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            stats.in_flight -= 1
            stats.requests += 1
            stats.total_seconds += time.perf_counter() - start
