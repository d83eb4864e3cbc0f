"""What the TOML job-file loader (``herder.jobfile``) shares with its callers:
its error, and the turn of a loaded job file into the API's ``JobSubmit``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from herder.api_models import JobSubmit, RequiredFile, StageSpec, TaskSpec
from herder.rakefile import MissingDigestError

if TYPE_CHECKING:
    from herder.jobfile import JobFile

__all__ = ["JobFileError", "to_job_submit"]


class JobFileError(Exception):
    """A job file that cannot be used."""

    def __init__(
        self,
        path: str,
        message: str,
        line: int | None = None,
        col: int | None = None,
        key: str | None = None,
    ) -> None:
        self.path = path
        self.message = message
        self.line = line
        self.col = col
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}:{self.col or 1}: {self.message}"
        return f"{self.path}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.message, self.line, self.col, self.key))


def _tname(v: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def to_job_submit(
    job: JobFile,
    digests: Mapping[str, str],
    modes: Mapping[str, int] | None = None,
) -> JobSubmit:
    """The API's ``JobSubmit`` for ``job``, given a digest for each required path."""
    stages: list[StageSpec] = []
    for s in job.stages:
        tasks: list[TaskSpec] = []
        for t in s.tasks:
            reqs: list[RequiredFile] = []
            for p in t.requires:
                digest = digests.get(p)
                if digest is None:
                    raise MissingDigestError(
                        f"no digest for required file {p!r} (task {t.name or t.command!r})"
                    )
                reqs.append(
                    RequiredFile(
                        path=p, digest=digest, mode=None if modes is None else modes.get(p)
                    )
                )
            tasks.append(
                TaskSpec(
                    name=t.name,
                    command=t.command,
                    placement=t.placement,
                    requires=reqs,
                    outputs=t.outputs,
                    env=t.env,
                    timeout_s=t.timeout_s,
                    max_attempts=t.max_attempts,
                    tags=t.tags,
                    cpus=t.cpus,
                    ram_mb=t.ram_mb,
                    gpus=t.gpus,
                    progress_pattern=t.progress_pattern,
                    stuck_timeout_s=t.stuck_timeout_s,
                )
            )
        stages.append(StageSpec(name=s.name, tasks=tasks))
    return JobSubmit(
        name=job.name,
        owner=job.owner,
        pool=job.pool,
        priority=job.priority,
        idempotency_key=job.idempotency_key,
        stages=stages,
        depends_on=job.depends_on,
        on_parent_failure=job.on_parent_failure,
        frame_order=job.frame_order,
    )
