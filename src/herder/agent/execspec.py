"""What an execution is asked to run (``ExecSpec``) and what came of it (``ExecResult``).

The executor's own records (herder.agent.executor), apart from the wire
models: an offer becomes an ``ExecSpec``; the slot that ran it turns the
``ExecResult`` into a completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from herder.api_models import Outcome, OutputFile, RequiredFile

if TYPE_CHECKING:
    from herder.api_models import Offer


@dataclass
class ExecSpec:
    """What to run: the executor's view of an offer."""

    attempt_id: int
    command: str | list[str]
    env: dict[str, str] = field(default_factory=dict)
    requires: list[RequiredFile] = field(default_factory=list)
    outputs: list[str] | None = None
    timeout_s: float | None = None
    task_id: int | None = None
    job_id: int | None = None
    ram_mb: int = 0  # killed past this RSS (herder.agent.watch); 0: no limit
    progress_pattern: str | None = None
    stuck_timeout_s: float | None = None

    @classmethod
    def from_offer(cls, offer: Offer) -> ExecSpec:
        return cls(
            attempt_id=offer.attempt_id,
            command=offer.command,
            env=dict(offer.env),
            requires=list(offer.requires),
            outputs=offer.outputs,
            timeout_s=offer.timeout_s,
            task_id=offer.task_id,
            job_id=offer.job_id,
            ram_mb=offer.ram_mb,
            progress_pattern=offer.progress_pattern,
            stuck_timeout_s=offer.stuck_timeout_s,
        )


@dataclass
class ExecResult:
    outcome: Outcome
    exit_code: int | None = None
    error: str | None = None
    outputs: list[tuple[OutputFile, Path]] = field(default_factory=list)
    duration_s: float = 0.0
    outputs_failed: bool = False  # ``error`` says why the outputs cannot be brought back
    peak_rss_mb: int | None = None  # the highest RSS of the group the watch saw
    progress: float | None = None  # the latest progress its output reported

    @property
    def output_files(self) -> list[OutputFile]:
        return [of for of, _ in self.outputs]


__all__ = ["ExecResult", "ExecSpec"]
