"""Rows → API view models. Rows never leave the store; these functions are its edge."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from herder.api_models import (
    AgentView,
    AttemptView,
    EventView,
    JobSummary,
    JobView,
    MasterFailureView,
    MasterView,
    OutputFile,
    RequiredFile,
    ResourceUsage,
    StageView,
    TaskView,
)
from herder.core.rules import master_down_reason, master_state

API = "/api/v1"


def job_href(job_id: int) -> str:
    return f"{API}/jobs/{job_id}"


def task_href(task_id: int) -> str:
    return f"{API}/tasks/{task_id}"


def attempt_href(attempt_id: int) -> str:
    return f"{API}/attempts/{attempt_id}"


def log_href(attempt_id: int) -> str:
    return f"{API}/attempts/{attempt_id}/log"


def agent_href(agent_id: str) -> str:
    return f"{API}/agents/{agent_id}"


def master_href(master_id: str) -> str:
    return f"{API}/masters/{quote(master_id, safe=':')}"


def blob_href(digest: str) -> str:
    return f"{API}/blobs/{digest}"


def attempt_view(r: Any) -> AttemptView:
    return AttemptView(
        id=r.id,
        href=attempt_href(r.id),
        number=r.number,
        agent_id=r.agent_id,
        state=r.state,
        exit_code=r.exit_code,
        error=r.error,
        offered_at=r.offered_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
        outputs=[OutputFile.model_validate(o) for o in (r.outputs or [])],
        log_href=log_href(r.id),
        stdout_len=r.stdout_len,
        stderr_len=r.stderr_len,
        progress=r.progress,
        peak_rss_mb=r.peak_rss_mb,
    )


def task_view(r: Any, attempts: Iterable[Any] = ()) -> TaskView:
    tried = [attempt_view(a) for a in attempts]
    return TaskView(
        id=r.id,
        href=task_href(r.id),
        job_id=r.job_id,
        stage=r.stage,
        name=r.name,
        state=r.state,
        command=r.command,
        placement=r.placement,
        requires=[RequiredFile.model_validate(x) for x in r.requires],
        outputs=r.outputs,
        env=r.env,
        timeout_s=r.timeout_s,
        max_attempts=r.max_attempts,
        tags=r.tags,
        cpus=r.cpus,
        ram_mb=r.ram_mb,
        gpus=r.gpus,
        failures=r.failures,
        infra_failures=r.infra_failures,
        exit_code=r.exit_code,
        error=r.error,
        attempts=tried,
        progress=tried[-1].progress if tried else None,
        progress_pattern=r.progress_pattern,
        stuck_timeout_s=r.stuck_timeout_s,
        memory_failures=r.memory_failures,
    )


def stage_state(counts: Mapping[str, int]) -> str:
    """One word for a stage from its tasks' states."""
    total = sum(counts.values())
    if total == 0:
        return "queued"
    if counts.get("succeeded", 0) == total:
        return "succeeded"
    if counts.get("failed", 0) or counts.get("rejected", 0):  # rejected: by the pool's ACL
        return "failed"
    if counts.get("offered", 0) or counts.get("running", 0):
        return "running"
    if counts.get("queued", 0):
        return "running" if counts.get("succeeded", 0) else "queued"
    if counts.get("blocked", 0):
        return "blocked"
    return "cancelled"


def job_view(
    job: Any,
    stage_rows: Sequence[Any],
    task_rows: Sequence[Any],
    attempts_by_task: Mapping[int, list[Any]],
    counts_by_stage: Mapping[int, dict[str, int]],
    include_tasks: bool = True,
) -> JobView:
    tasks_by_stage: dict[int, list[TaskView]] = {}
    if include_tasks:
        for t in task_rows:
            tasks_by_stage.setdefault(t.stage, []).append(
                task_view(t, attempts_by_task.get(t.id, ()))
            )
    total: dict[str, int] = {}
    stages_out = []
    for s in stage_rows:
        counts = counts_by_stage.get(s.position, {})
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
        stages_out.append(
            StageView(
                index=s.position,
                name=s.name,
                state=stage_state(counts),
                counts=dict(counts),
                tasks=tasks_by_stage.get(s.position, []),
            )
        )
    return JobView(
        id=job.id,
        href=job_href(job.id),
        name=job.name,
        owner=job.owner,
        pool=job.pool,
        priority=job.priority,
        state=job.state,
        idempotency_key=job.idempotency_key,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        counts=total,
        stages=stages_out,
        on_parent_failure=job.on_parent_failure,
        frame_order=job.frame_order,
    )


def job_summary(job: Any, counts: Mapping[str, int]) -> JobSummary:
    return JobSummary(
        id=job.id,
        href=job_href(job.id),
        name=job.name,
        owner=job.owner,
        pool=job.pool,
        priority=job.priority,
        state=job.state,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        counts=dict(counts),
    )


def agent_view(r: Any, running: int, now: datetime, offline_after_s: float) -> AgentView:
    state = r.state
    if state != "offline" and (
        r.last_seen_at is None or r.last_seen_at < now - timedelta(seconds=offline_after_s)
    ):
        state = "offline"
    return AgentView(
        id=r.id,
        href=agent_href(r.id),
        name=r.name,
        hostname=r.hostname,
        slots=r.slots,
        tags=r.tags,
        cpus=r.cpus,
        ram_mb=r.ram_mb,
        gpus=r.gpus,
        max_ram_mb=r.max_ram_mb,
        max_load=r.max_load,
        state=state,
        registered_at=r.registered_at,
        last_seen_at=r.last_seen_at,
        running=running,
        usage=ResourceUsage.model_validate(r.usage) if r.usage else None,
        talkback_url=r.talkback_url,
        mode=r.mode,
        accept_owners=r.accept_owners or [],
        accept_pools=r.accept_pools or [],
    )


def event_view(r: Any) -> EventView:
    return EventView(
        id=r.id,
        at=r.at,
        job_id=r.job_id,
        task_id=r.task_id,
        attempt_id=r.attempt_id,
        agent_id=r.agent_id,
        kind=r.kind,
        from_state=r.from_state,
        to_state=r.to_state,
        reason=r.reason,
    )


def master_view(r: Any, now: datetime) -> MasterView:
    """A ``masters`` row as the directory shows it; state by ``herder.core.rules``."""
    args = (r.state, r.last_heartbeat_at, r.last_failure_at, now, r.heartbeat_timeout_s)
    why = master_down_reason(*args)
    return MasterView(
        id=r.id,
        href=master_href(r.id),
        url=r.url,
        role=r.role,
        state=master_state(*args).value,
        down_reason=why.value if why is not None else None,
        started_at=r.started_at,
        last_heartbeat_at=r.last_heartbeat_at,
        heartbeat_timeout_s=r.heartbeat_timeout_s,
        version=r.version,
        requests=r.requests,
        unhandled_exceptions=r.unhandled_exceptions,
        avg_request_ms=r.avg_request_ms,
        in_flight=r.in_flight,
        failures=r.failures,
        last_failure_at=r.last_failure_at,
        failures_href=f"{master_href(r.id)}/failures",
    )


def master_failure_view(r: Any) -> MasterFailureView:
    return MasterFailureView(
        id=r.id,
        master_id=r.master_id,
        time=r.reported_at,
        received_at=r.received_at,
        reporter=r.reporter,
        request=r.request,
        kind=r.kind,
        url=r.url,
    )
