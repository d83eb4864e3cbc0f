"""The wire contract of the master HTTP API (DESIGN §4).

Shared by the master (validation, OpenAPI), the client library, the CLI and
the agent. Input models forbid unknown fields so a typo is an error, never a
silently ignored setting.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator, model_validator

from herder.api_agent import AckRequest as AckRequest
from herder.api_agent import AgentLimits as AgentLimits
from herder.api_agent import AgentList as AgentList
from herder.api_agent import AgentRegister as AgentRegister
from herder.api_agent import AgentView as AgentView
from herder.api_agent import ClaimRequest as ClaimRequest
from herder.api_agent import ClaimResponse as ClaimResponse
from herder.api_agent import Completion as Completion
from herder.api_agent import CompletionResult as CompletionResult
from herder.api_agent import Heartbeat as Heartbeat
from herder.api_agent import HeartbeatResponse as HeartbeatResponse
from herder.api_agent import LogAppend as LogAppend
from herder.api_agent import LogChunk as LogChunk
from herder.api_agent import Offer as Offer
from herder.api_agent import Outcome as Outcome
from herder.api_agent import OwnerShareList as OwnerShareList
from herder.api_agent import OwnerShareView as OwnerShareView
from herder.api_agent import ResourceUsage as ResourceUsage
from herder.api_agent import RunningAttempt as RunningAttempt
from herder.api_agent import ShareUpdate as ShareUpdate
from herder.api_base import _In, _Out
from herder.api_common import DEPENDS_ON_MAX as DEPENDS_ON_MAX
from herder.api_common import DIGEST_RE as DIGEST_RE
from herder.api_common import FOLLOW_INLINE_MAX as FOLLOW_INLINE_MAX
from herder.api_common import FOLLOW_LOG_MAX as FOLLOW_LOG_MAX
from herder.api_common import GPUS_MAX as GPUS_MAX
from herder.api_common import INLINE_OUTPUT_MAX as INLINE_OUTPUT_MAX
from herder.api_common import INLINE_REQUIRE_MAX as INLINE_REQUIRE_MAX
from herder.api_common import INLINE_TOTAL_MAX as INLINE_TOTAL_MAX
from herder.api_common import OUTPUTS_MAX as OUTPUTS_MAX
from herder.api_common import SUBMIT_INLINE_MAX as SUBMIT_INLINE_MAX
from herder.api_common import TAGS_MAX as TAGS_MAX
from herder.api_common import AgentMode as AgentMode
from herder.api_common import Digest as Digest
from herder.api_common import FrameOrder as FrameOrder
from herder.api_common import JobStateName as JobStateName
from herder.api_common import OnParentFailure as OnParentFailure
from herder.api_common import OutputFile as OutputFile
from herder.api_common import RequiredFile as RequiredFile
from herder.api_common import TaskStateName as TaskStateName
from herder.api_common import _check_output_name, _check_tags
from herder.api_common import agent_tags_problem as agent_tags_problem
from herder.api_common import decode_inline as decode_inline
from herder.api_common import encode_inline as encode_inline
from herder.api_common import task_tags_problem as task_tags_problem
from herder.api_directory import MasterFailureList as MasterFailureList
from herder.api_directory import MasterFailureReport as MasterFailureReport
from herder.api_directory import MasterFailureView as MasterFailureView
from herder.api_directory import MasterList as MasterList
from herder.api_directory import MasterRole as MasterRole
from herder.api_directory import MasterStateName as MasterStateName
from herder.api_directory import MasterView as MasterView
from herder.api_limits import (
    COMMAND_TOTAL_MAX,
    RAM_MB_MAX,
    TIMEOUT_MAX_S,
    RowId,
    command_problem,
    env_problem,
    exec_size,
)
from herder.taskwatch import STUCK_TIMEOUT_MAX_S, progress_pattern_problem

# --------------------------------------------------------------------- submit


class TaskSpec(_In):
    name: str | None = Field(default=None, max_length=200)
    command: str | list[str] = Field(description="a shell string, or an argv list")
    placement: Literal["remote", "local"] = "remote"
    requires: list[RequiredFile] = Field(default_factory=list)
    outputs: list[str] | None = Field(
        default=None, description="paths to bring back; null means every created or changed file"
    )
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0, le=TIMEOUT_MAX_S)
    max_attempts: int = Field(default=1, ge=1, le=100)
    tags: list[str] = Field(
        default_factory=list,
        max_length=TAGS_MAX,
        description="tags the agent must have; `!tag`: the agent must not have it",
    )
    cpus: int = Field(default=1, ge=0, le=4096)
    ram_mb: int = Field(default=0, ge=0, le=RAM_MB_MAX)
    gpus: int = Field(default=0, ge=0, le=GPUS_MAX)
    progress_pattern: str | None = Field(
        default=None,
        description="regex with one group, a number 0-100, matched against each output line: "
        "the task's progress (herder.taskwatch)",
    )
    stuck_timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=STUCK_TIMEOUT_MAX_S,
        description="kill the task (a command failure) after this long without output",
    )

    @field_validator("progress_pattern")
    @classmethod
    def _progress_pattern_ok(cls, v: str | None) -> str | None:
        problem = None if v is None else progress_pattern_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("tags")
    @classmethod
    def _task_tags(cls, v: list[str]) -> list[str]:
        return _check_tags(v, negation=True)

    @field_validator("command")
    @classmethod
    def _command_not_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and not v.strip():
            raise ValueError("command is empty")
        if isinstance(v, list) and (not v or not v[0]):
            raise ValueError("argv command is empty")
        problem = command_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("outputs")
    @classmethod
    def _outputs_safe(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [_check_output_name(p) for p in v]

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        problem = env_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _fits_exec(self) -> TaskSpec:
        size = exec_size(self.command, self.env)
        if size > COMMAND_TOTAL_MAX:
            raise ValueError(f"command and env take {size} bytes, more than {COMMAND_TOTAL_MAX}")
        return self


class StageSpec(_In):
    name: str = Field(min_length=1, max_length=200)
    tasks: list[TaskSpec] = Field(min_length=1, max_length=100_000)


class JobSubmit(_In):
    name: str = Field(min_length=1, max_length=200)
    owner: str | None = Field(default=None, max_length=200)
    pool: str = Field(default="default", min_length=1, max_length=200)
    priority: int = Field(default=0, ge=-1000, le=1000)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    stages: list[StageSpec] = Field(min_length=1, max_length=10_000)
    depends_on: list[RowId] = Field(
        default_factory=list,
        max_length=DEPENDS_ON_MAX,
        description="ids of jobs that must all succeed before any task of this one starts "
        "(each must exist; repeats count once)",
    )
    on_parent_failure: OnParentFailure = Field(
        default="fail",
        description="a parent failed or was cancelled: fail this job too, or hold it until "
        "that parent is retried and succeeds",
    )
    frame_order: FrameOrder = Field(
        default="sequential",
        description="first-last-middle: each stage dispatches its first task, its last, "
        "then middle-out (tasks keep their names; task ids follow dispatch order)",
    )
    blobs: dict[Digest, str] = Field(
        default_factory=dict,
        description="small input files inline, sha256 → base64 (each at most 64 KiB, "
        "16 MiB in all); stored as if uploaded, each checked against its digest",
    )

    @field_validator("depends_on")
    @classmethod
    def _parents_once(cls, v: list[int]) -> list[int]:
        return list(dict.fromkeys(v))

    @field_validator("blobs")
    @classmethod
    def _blobs_fit(cls, v: dict[str, str]) -> dict[str, str]:
        decoded = decode_inline(v)
        big = [d for d, b in decoded.items() if len(b) > INLINE_REQUIRE_MAX]
        if big:
            raise ValueError(
                f"inline blob {big[0]} is larger than {INLINE_REQUIRE_MAX} bytes: upload it"
            )
        total = sum(len(b) for b in decoded.values())
        if total > SUBMIT_INLINE_MAX:
            raise ValueError(f"inline blobs total {total} bytes, more than {SUBMIT_INLINE_MAX}")
        return v


class JobSubmitted(_Out):
    """The short answer to a submission (``POST /jobs?view=ids``): no task views."""

    id: int
    href: str
    created: bool
    task_ids: list[int] = Field(description="the job's task ids, in submission order")


# ------------------------------------------------------------------- results


class AttemptView(_Out):
    id: int
    href: str
    number: int
    agent_id: str | None
    state: str  # offered, running, succeeded, failed, lost, released, cancelled
    exit_code: int | None = None
    error: str | None = None
    offered_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outputs: list[OutputFile] = Field(default_factory=list)
    log_href: str
    stdout_len: int = Field(0, description="characters of stdout recorded so far")
    stderr_len: int = Field(0, description="characters of stderr recorded so far")
    progress: float | None = Field(None, description="latest progress (0-100) its agent reported")
    peak_rss_mb: int | None = Field(
        None, description="highest RSS of its process group the agent saw, MB"
    )


class TaskView(_Out):
    id: int
    href: str
    job_id: int
    stage: int
    name: str | None
    state: TaskStateName
    command: str | list[str]
    placement: Literal["remote", "local"]
    requires: list[RequiredFile] = Field(default_factory=list)
    outputs: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = None
    max_attempts: int
    tags: list[str] = Field(default_factory=list)
    cpus: int
    ram_mb: int = Field(description="raised by memory-aware retries (herder.core.rules)")
    gpus: int = 0
    failures: int = 0
    infra_failures: int = 0
    exit_code: int | None = None
    error: str | None = None
    attempts: list[AttemptView] = Field(default_factory=list)
    progress_pattern: str | None = None
    stuck_timeout_s: float | None = None
    memory_failures: int = 0
    progress: float | None = Field(None, description="its latest attempt's progress (0-100)")


class StageView(_Out):
    index: int
    name: str
    state: str  # blocked, queued, running, succeeded, failed, cancelled
    counts: dict[str, int]
    tasks: list[TaskView] = Field(default_factory=list)


class JobLink(_Out):
    """Another job, by reference (seeds/001: resources link with ``href``)."""

    id: int
    href: str
    name: str
    state: JobStateName


class JobView(_Out):
    id: int
    href: str
    name: str
    owner: str | None
    pool: str
    priority: int
    state: JobStateName
    idempotency_key: str | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    stages: list[StageView] = Field(default_factory=list)
    depends_on: list[JobLink] = Field(
        default_factory=list, description="the jobs this one waits for (its parents)"
    )
    dependents: list[JobLink] = Field(
        default_factory=list, description="the jobs that wait for this one (its children)"
    )
    on_parent_failure: OnParentFailure = "fail"
    frame_order: FrameOrder = "sequential"


class JobSummary(_Out):
    id: int
    href: str
    name: str
    owner: str | None
    pool: str
    priority: int
    state: JobStateName
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    counts: dict[str, int] = Field(default_factory=dict)


class JobList(_Out):
    jobs: list[JobSummary]


class LogView(_Out):
    attempt_id: int
    stream: Literal["stdout", "stderr"]
    offset: int
    next_offset: int
    data: str
    complete: bool


# ----------------------------------------------------------------------- blobs


class BlobQuery(_In):
    digests: list[Digest] = Field(max_length=100_000)


class BlobMissing(_Out):
    missing: list[str]


class BlobStored(_Out):
    digest: str
    size: int
    href: str
    created: bool


class ErrorBody(_Out):
    error: str
    message: str
    detail: object | None = None


class EventView(_Out):
    id: int
    at: datetime
    job_id: int | None
    task_id: int | None
    attempt_id: int | None
    agent_id: str | None
    kind: str
    from_state: str | None
    to_state: str | None
    reason: str | None


class EventList(_Out):
    events: list[EventView]


class TaskResultView(_Out):
    """A task that reached a final state, with what a client collects of it."""

    task_id: int
    href: str
    name: str | None
    state: TaskStateName
    exit_code: int | None = None
    error: str | None = None
    attempt_id: int | None = Field(default=None, description="its last attempt")
    outputs: list[OutputFile] = Field(default_factory=list)
    stdout: str | None = Field(
        default=None, description="the whole stdout when at most 64 KiB, else null"
    )
    stderr: str | None = Field(
        default=None, description="the whole stderr when at most 64 KiB, else null"
    )
    stdout_len: int = 0
    stderr_len: int = 0
    inline: dict[str, str] = Field(
        default_factory=dict,
        description="bytes of small outputs, sha256 → base64; fetch the others as blobs",
    )


class FollowView(_Out):
    """One long-poll of ``GET /jobs/{id}/follow``: what happened after ``after``."""

    job_id: int
    state: JobStateName
    next: int = Field(description="pass as `after` to the next call")
    started: list[int] = Field(
        default_factory=list, description="tasks offered or started since `after`"
    )
    results: list[TaskResultView] = Field(
        default_factory=list, description="tasks that reached a final state since `after`"
    )
    events: list[EventView] | None = Field(
        default=None, description="the events themselves, with `events=true`"
    )
