"""Wire models of job control (issue 13): pause a job, change a live job.

Kept apart from ``herder.api_models`` (which is at its size budget); the
fields are bounded exactly as at submission (``TaskSpec``, ``JobSubmit``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints, field_validator, model_validator

from herder.api_base import _In
from herder.api_limits import RAM_MB_MAX

Tag = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class JobPause(_In):
    """``POST /jobs/{id}/pause``: with ``kill``, running tasks are stopped and queued again."""

    kill: bool = Field(
        default=False,
        description="stop the job's running tasks now; they are queued again, no failure counted",
    )


class JobUpdate(_In):
    """``PATCH /jobs/{id}``: the fields to change (at least one).

    priority, tags, cpus and ram_mb apply to the tasks not started yet
    (blocked or queued); max_attempts to every task not finished.
    """

    priority: int | None = Field(default=None, ge=-1000, le=1000)
    tags: list[Tag] | None = Field(
        default=None, max_length=64, description="replaces the tasks' tags; [] clears them"
    )
    cpus: int | None = Field(default=None, ge=0, le=4096)
    ram_mb: int | None = Field(default=None, ge=0, le=RAM_MB_MAX)
    gpus: int | None = Field(default=None, ge=0, le=1024)
    max_attempts: int | None = Field(default=None, ge=1, le=100)

    @field_validator("tags")
    @classmethod
    def _tags_valid(cls, v: list[str] | None) -> list[str] | None:
        from herder.api_models import task_tags_problem  # api_models imports this module

        problem = None if v is None else task_tags_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _something(self) -> JobUpdate:
        if not self.model_fields_set or all(
            getattr(self, k) is None for k in self.model_fields_set
        ):
            raise ValueError(
                "nothing to change: give priority, tags, cpus, ram_mb, gpus or max_attempts"
            )
        return self


def update_fields(
    priority: int | None = None,
    tags: list[str] | None = None,
    cpus: int | None = None,
    ram_mb: int | None = None,
    max_attempts: int | None = None,
    gpus: int | None = None,
) -> dict[str, object]:
    """A ``JobUpdate`` body of the given fields (None: unchanged), unvalidated."""
    given = {
        "priority": priority,
        "tags": tags,
        "cpus": cpus,
        "ram_mb": ram_mb,
        "gpus": gpus,
        "max_attempts": max_attempts,
    }
    return {k: v for k, v in given.items() if v is not None}
