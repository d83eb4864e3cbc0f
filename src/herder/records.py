"""Domain records shared by the store, the master's service and the clients.

The store speaks in these (not in wire models); the API layer turns them into
``herder.api_models`` views, and the clients turn views back into them, so
the code that follows a job (``herder.build``) reads the same records from an
embedded farm and from a farm over HTTP. No database or HTTP import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from herder.api_models import EventView

FINAL_TASK_STATES = frozenset({"succeeded", "failed", "cancelled"})


class Submitted(NamedTuple):
    """A job as its submission created (or found, by idempotency key) it."""

    id: int
    created: bool
    task_ids: list[int]


@dataclass(frozen=True, slots=True)
class OutputRecord:
    path: str
    digest: str
    size: int
    mode: int


@dataclass(slots=True)
class TaskResult:
    """A task in a final state, as its last attempt left it."""

    task_id: int
    name: str | None
    state: str
    exit_code: int | None
    error: str | None
    attempt_id: int | None = None
    outputs: list[OutputRecord] = field(default_factory=list)
    stdout: str | None = None  # the whole stream when short (FOLLOW_LOG_MAX), else None
    stderr: str | None = None
    stdout_len: int = 0
    stderr_len: int = 0
    blobs: dict[str, bytes] = field(default_factory=dict)  # small outputs' bytes by digest


@dataclass(slots=True)
class FollowPage:
    job_id: int
    state: str
    next: int
    started: list[int] = field(default_factory=list)
    results: list[TaskResult] = field(default_factory=list)
    events: list[EventView] | None = None

    def moved(self, after: int) -> bool:
        """Whether anything happened after ``after`` (or the job is over)."""
        return self.next > after or self.state in FINAL_TASK_STATES


__all__ = ["FINAL_TASK_STATES", "FollowPage", "OutputRecord", "Submitted", "TaskResult"]
