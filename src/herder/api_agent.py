"""The agent cycle on the wire (DESIGN §4, §10): registration, claims, offers,
completions, heartbeats, and the scheduler's knobs on agents and owners.

herder.api_models re-exports every name here: import from there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator

from herder.api_base import _In, _Out
from herder.api_common import (
    GPUS_MAX,
    INLINE_TOTAL_MAX,
    OUTPUTS_MAX,
    TAGS_MAX,
    AgentMode,
    Digest,
    OutputFile,
    RequiredFile,
    TaskStateName,
    _check_tags,
    decode_inline,
)
from herder.api_limits import (
    RAM_MB_MAX,
    Int64,
    RowId,
    Token,
    replace_nul,
)
from herder.core.acl import LIST_MAX as ACL_LIST_MAX
from herder.core.acl import normalize_accept

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
    tags: list[str] = Field(default_factory=list, max_length=TAGS_MAX)
    cpus: int = Field(default=1, ge=1, le=4096)
    ram_mb: int = Field(default=0, ge=0, le=RAM_MB_MAX)
    gpus: int = Field(default=0, ge=0, le=GPUS_MAX)
    max_ram_mb: int | None = Field(
        default=None, ge=1, le=RAM_MB_MAX, description="the most RAM the farm may use on it"
    )
    max_load: float | None = Field(
        default=None,
        gt=0,
        le=100_000,
        description="no new task while its 1-minute load is this high",
    )
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

    accept_owners: list[str] = Field(
        default_factory=list,
        max_length=ACL_LIST_MAX,
        description="only tasks of jobs of these owners ([] or '*': everyone's)",
    )
    accept_pools: list[str] = Field(
        default_factory=list,
        max_length=ACL_LIST_MAX,
        description="only tasks of jobs in these pools ([] or '*': every pool)",
    )

    @field_validator("tags")
    @classmethod
    def _agent_tags(cls, v: list[str]) -> list[str]:
        return _check_tags(v, negation=False)

    @field_validator("accept_owners", "accept_pools")
    @classmethod
    def _accepts(cls, v: list[str]) -> list[str]:
        return normalize_accept(v, "name")  # herder.core.acl


class AgentLimits(_In):
    """``PATCH /agents/{id}``: the agent's own limits (seeds/001); null lifts one."""

    max_ram_mb: int | None = Field(default=None, ge=1, le=RAM_MB_MAX)
    max_load: float | None = Field(default=None, gt=0, le=100_000)


class ShareUpdate(_In):
    weight: float = Field(gt=0, le=1_000_000, description="relative share (default 1)")


class OwnerShareView(_Out):
    owner: str
    weight: float
    used_slot_s: float = Field(description="slot-seconds used over the share window")


class OwnerShareList(_Out):
    owners: list[OwnerShareView]


class AgentView(_Out):
    id: str
    href: str
    name: str
    hostname: str
    slots: int
    tags: list[str]
    cpus: int
    ram_mb: int
    gpus: int = 0
    max_ram_mb: int | None = None
    max_load: float | None = None
    state: str  # online, draining, offline
    registered_at: datetime
    last_seen_at: datetime | None
    running: int = 0
    usage: ResourceUsage | None = None
    talkback_url: str | None = None
    mode: AgentMode = "master"
    accept_owners: list[str] = Field(default_factory=list, description="[]: everyone's")
    accept_pools: list[str] = Field(default_factory=list, description="[]: every pool")


class AgentList(_Out):
    agents: list[AgentView]


class LogChunk(_In):
    stream: Literal["stdout", "stderr"]
    data: str

    _storable = field_validator("data")(replace_nul)


#: ``memory``: killed for exceeding its ``ram_mb``, or by the kernel's OOM killer
#: (herder.agent.watch); the store retries it with more RAM (herder.core.rules).
Outcome = Literal["exited", "timeout", "launch_failed", "released", "cancelled", "memory"]


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
    peak_rss_mb: int | None = Field(
        default=None, ge=0, le=RAM_MB_MAX, description="highest RSS of the process group seen, MB"
    )
    progress: float | None = Field(default=None, ge=0, le=100, description="latest progress")

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
    cpus: int = 1
    gpus: int = 0
    ram_mb: int = Field(0, description="the agent kills the task past this RSS (0: no limit)")
    progress_pattern: str | None = None
    stuck_timeout_s: float | None = None
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
    progress: float | None = Field(
        default=None, ge=0, le=100, description="its latest progress, when it has a pattern"
    )


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
