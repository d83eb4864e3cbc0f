"""The wire contract of the master HTTP API (DESIGN §4).

Shared by the master (validation, OpenAPI), the client library, the CLI and
the agent. Input models forbid unknown fields so a typo is an error, never a
silently ignored setting.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from herder.api_base import _In, _Out
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
    Int64,
    RowId,
    Token,
    command_problem,
    env_problem,
    exec_size,
    replace_nul,
)
from herder.names import name_problem
from herder.paths import UnsafePath, normalize_relpath

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256, lowercase hex")]
TaskStateName = Literal[
    "blocked", "queued", "offered", "running", "succeeded", "failed", "cancelled"
]
JobStateName = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]
#: How an agent gets work: from a master, or from the database itself (DESIGN §6).
AgentMode = Literal["master", "autonomous"]

#: Small files travel inside the claim round trip instead of a blob request
#: each (DESIGN §10): required files up to INLINE_REQUIRE_MAX in an offer,
#: outputs up to INLINE_OUTPUT_MAX in a completion, INLINE_TOTAL_MAX in all.
INLINE_REQUIRE_MAX = 64 * 1024
INLINE_OUTPUT_MAX = 256 * 1024
INLINE_TOTAL_MAX = 1024 * 1024
#: A submission may carry its small input files inline (each up to
#: INLINE_REQUIRE_MAX, SUBMIT_INLINE_MAX in all) instead of a PUT each.
SUBMIT_INLINE_MAX = 16 * 1024 * 1024
#: A followed job's results carry logs up to FOLLOW_LOG_MAX characters per
#: stream and outputs up to INLINE_OUTPUT_MAX each, FOLLOW_INLINE_MAX per page.
FOLLOW_LOG_MAX = 64 * 1024
FOLLOW_INLINE_MAX = 4 * 1024 * 1024


def decode_inline(blobs: dict[str, str]) -> dict[str, bytes]:
    """``{sha256: base64}`` → ``{sha256: bytes}``; ValueError names a bad entry."""
    out: dict[str, bytes] = {}
    for digest, text in blobs.items():
        try:
            out[digest] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"inline blob {digest}: not valid base64") from None
    return out


def encode_inline(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


#: The most output files one completion may list.
OUTPUTS_MAX = 100_000


def _check_relpath(value: str) -> str:
    try:
        norm = normalize_relpath(value)
    except UnsafePath as exc:
        raise ValueError(str(exc)) from None
    problem = name_problem(norm)
    if problem is not None:
        raise ValueError(f"path {problem}")
    return norm


def _check_output_name(value: str) -> str:
    # A backslash is a fine POSIX name but no output of that name can be
    # brought back portably: refused at submission instead of on an agent.
    if "\\" in value:
        raise ValueError(f"path contains a backslash: {value!r}")
    return _check_relpath(value)


# --------------------------------------------------------------------- submit


class RequiredFile(_In):
    path: str = Field(
        description="relative to the job root; staged at the same path in the sandbox"
    )
    digest: Digest
    mode: int | None = Field(default=None, ge=0, le=0o7777, description="file mode bits")

    _norm = field_validator("path")(_check_relpath)


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
    tags: list[str] = Field(default_factory=list)
    cpus: int = Field(default=1, ge=0, le=4096)
    ram_mb: int = Field(default=0, ge=0, le=RAM_MB_MAX)

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
    blobs: dict[Digest, str] = Field(
        default_factory=dict,
        description="small input files inline, sha256 → base64 (each at most 64 KiB, "
        "16 MiB in all); stored as if uploaded, each checked against its digest",
    )

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


class OutputFile(_In):
    path: str
    digest: Digest
    size: Int64 = Field(ge=0)
    mode: int = Field(default=0o644, ge=0, le=0o7777)

    _norm = field_validator("path")(_check_relpath)


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
    ram_mb: int
    failures: int = 0
    infra_failures: int = 0
    exit_code: int | None = None
    error: str | None = None
    attempts: list[AttemptView] = Field(default_factory=list)


class StageView(_Out):
    index: int
    name: str
    state: str  # blocked, queued, running, succeeded, failed, cancelled
    counts: dict[str, int]
    tasks: list[TaskView] = Field(default_factory=list)


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


# --------------------------------------------------------------------- agents


class ResourceUsage(_In):
    ram_used_mb: float | None = Field(default=None, ge=0)
    ram_total_mb: float | None = Field(default=None, ge=0)
    cpu_percent: float | None = Field(default=None, ge=0)
    load_1m: float | None = Field(default=None, ge=0)
    disk_free_mb: float | None = Field(default=None, ge=0)
    io_read_bytes: Int64 | None = Field(default=None, ge=0)
    io_write_bytes: Int64 | None = Field(default=None, ge=0)


class AgentRegister(_In):
    agent_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:-]{1,100}$",
        description="kept in the agent's state dir",
    )
    name: str = Field(min_length=1, max_length=200)
    hostname: str = Field(min_length=1, max_length=255)
    slots: int = Field(ge=1, le=4096)
    tags: list[str] = Field(default_factory=list)
    cpus: int = Field(default=1, ge=1, le=4096)
    ram_mb: int = Field(default=0, ge=0, le=RAM_MB_MAX)
    talkback_url: str | None = Field(
        default=None, max_length=500, description="the agent's talkback endpoint (DESIGN §4)"
    )
    talkback_token: str | None = Field(
        default=None,
        min_length=16,
        max_length=200,
        description="bearer token a master sends to the talkback endpoint; never shown back",
    )
    version: str | None = None
    mode: AgentMode | None = Field(
        default=None, description="autonomous: it claimed from the database while masters were down"
    )


class AgentView(_Out):
    id: str
    href: str
    name: str
    hostname: str
    slots: int
    tags: list[str]
    cpus: int
    ram_mb: int
    state: str  # online, draining, offline
    registered_at: datetime
    last_seen_at: datetime | None
    running: int = 0
    usage: ResourceUsage | None = None
    talkback_url: str | None = None
    mode: AgentMode = "master"


class AgentList(_Out):
    agents: list[AgentView]


class LogChunk(_In):
    stream: Literal["stdout", "stderr"]
    data: str

    _storable = field_validator("data")(replace_nul)


Outcome = Literal["exited", "timeout", "launch_failed", "released", "cancelled"]


class Completion(_In):
    attempt_id: RowId
    token: Token
    outcome: Outcome
    exit_code: Int64 | None = None
    error: str | None = Field(default=None, max_length=10_000)
    outputs: list[OutputFile] = Field(default_factory=list, max_length=OUTPUTS_MAX)
    log: list[LogChunk] = Field(default_factory=list, description="output not yet streamed")
    blobs: dict[Digest, str] = Field(
        default_factory=dict,
        description="small outputs inline, sha256 → base64 (at most 1 MiB decoded in all); "
        "stored as if uploaded, each checked against its digest",
    )

    @field_validator("blobs")
    @classmethod
    def _blobs_fit(cls, v: dict[str, str]) -> dict[str, str]:
        total = sum(len(b) for b in decode_inline(v).values())
        if total > INLINE_TOTAL_MAX:
            raise ValueError(f"inline blobs total {total} bytes, more than {INLINE_TOTAL_MAX}")
        return v

    @field_validator("error")
    @classmethod
    def _error_storable(cls, v: str | None) -> str | None:
        return None if v is None else replace_nul(v)


class ClaimRequest(_In):
    max_tasks: int = Field(ge=0, le=1000)
    wait_s: float = Field(
        default=0.0, ge=0.0, le=120.0, description="long-poll for up to this long"
    )
    completions: list[Completion] = Field(default_factory=list)
    acks: list[RowId] = Field(default_factory=list, description="attempt ids now running")


class Offer(_Out):
    attempt_id: int
    token: str
    task_id: int
    job_id: int
    href: str
    command: str | list[str]
    env: dict[str, str]
    requires: list[RequiredFile]
    outputs: list[str] | None
    timeout_s: float | None
    lease_expires_at: datetime
    ack_deadline: datetime
    inline: dict[str, str] = Field(
        default_factory=dict,
        description="bytes of small required files, sha256 → base64, so the agent need "
        "not fetch them; any other required file is fetched from the blob store",
    )


class CompletionResult(_Out):
    attempt_id: int
    result: Literal["accepted", "stale"]
    task_state: TaskStateName | None = None


class ClaimResponse(_Out):
    offers: list[Offer]
    completions: list[CompletionResult] = Field(default_factory=list)
    lease_s: float
    drain: bool = Field(
        default=False,
        description="an operator drained this agent: no new offers; exit once idle",
    )


class AckRequest(_In):
    token: Token


class LogAppend(_In):
    token: Token
    chunks: list[LogChunk] = Field(min_length=1)


class RunningAttempt(_In):
    attempt_id: RowId
    token: Token


class Heartbeat(_In):
    running: list[RunningAttempt] = Field(default_factory=list)
    usage: ResourceUsage | None = None
    draining: bool = False
    mode: AgentMode = Field(
        default="master",
        description="autonomous: the agent claims from the database itself (masters were down)",
    )


class HeartbeatResponse(_Out):
    cancel: list[int] = Field(default_factory=list, description="attempt ids to kill")
    lease_expires_at: datetime | None = None
    lease_s: float
    drain: bool = Field(
        default=False,
        description="an operator drained this agent (herder drain): it gets no new offers "
        "and should exit once its running tasks have finished and been reported",
    )


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
