"""The in-process transport: clients that call a :class:`MasterService` directly.

DESIGN §1: the embedded farm of ``herder run`` runs the master's service and
the agent's executor inside one process, "talking through an in-process
transport instead of HTTP, as long as it runs the same store transactions
and the same executor code as a networked farm: one implementation, two
transports". These classes are that transport. They have the methods of
:class:`herder.client.HerderClient` that their callers use (the agent's
``AgentClient`` protocol; the build's and the CLI's calls), take and return
the same models, and raise the same client errors, so the agent, the build
and the CLI cannot tell which transport they were given.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from herder.api_control import JobUpdate, update_fields
from herder.api_models import (
    AgentRegister,
    AgentView,
    BlobStored,
    ClaimRequest,
    ClaimResponse,
    EventView,
    Heartbeat,
    HeartbeatResponse,
    JobSubmit,
    JobSubmitted,
    JobSummary,
    JobView,
    LogChunk,
    LogView,
    TaskView,
)
from herder.client.errors import (
    ApiError,
    BlobDigestError,
    ConflictError,
    NotFoundError,
    StaleAttemptError,
)
from herder.client.files import InputSource, hash_files, read_input
from herder.client.logs import FullLogMixin
from herder.errors import HerderError, NotFound, StaleAttempt
from herder.master.service import MasterService
from herder.records import FollowPage
from herder.store.control import JobChanges

T = TypeVar("T")


def _translate(exc: HerderError) -> ApiError:
    """A domain error as the client error an HTTP answer would have raised."""
    if isinstance(exc, StaleAttempt):
        return StaleAttemptError(409, exc.code, exc.message, exc.detail)
    if isinstance(exc, NotFound):
        return NotFoundError(404, exc.code, exc.message, exc.detail)
    if exc.status == 409:
        return ConflictError(409, exc.code, exc.message, exc.detail)
    return ApiError(exc.status, exc.code, exc.message, exc.detail)


def _do(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except HerderError as exc:
        raise _translate(exc) from exc


class InProcessClient(FullLogMixin):
    """The client side of the in-process transport (build, CLI, agent)."""

    def __init__(self, service: MasterService) -> None:
        self.service = service
        self.store = service.store

    def __enter__(self) -> InProcessClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """The farm owns the service; closing a client releases nothing."""

    @property
    def masters(self) -> list[str]:
        return []

    # ------------------------------------------------------------------ jobs

    def submit_job(
        self, spec: JobSubmit, *, inputs: Mapping[str, InputSource] | None = None
    ) -> JobView:
        self._put_inputs(inputs)
        return _do(self.service.submit_view, spec)[0]

    def _put_inputs(self, inputs: Mapping[str, InputSource] | None) -> None:
        """In process there is no second transaction to hand off: store what is missing first."""
        if inputs:
            for digest in self.missing_blobs(list(inputs)):
                self.put_blob(digest, read_input(digest, inputs[digest]))

    def submit_job_ids(
        self, spec: JobSubmit, *, inputs: Mapping[str, InputSource] | None = None
    ) -> JobSubmitted:
        self._put_inputs(inputs)
        sub = _do(self.service.submit, spec)
        return JobSubmitted.model_construct(
            id=sub.id, href=f"/api/v1/jobs/{sub.id}", created=sub.created, task_ids=sub.task_ids
        )

    def get_job(self, job_id: int) -> JobView:
        return _do(self.store.get_job, int(job_id))

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobSummary]:
        return _do(self.store.list_jobs, state=state, limit=limit)

    def cancel_job(self, job_id: int) -> JobView:
        return _do(self.service.cancel_job, int(job_id), "cancelled by user")

    def pause_job(self, job_id: int, *, kill: bool = False) -> JobView:
        return _do(self.service.pause_job, int(job_id), kill)

    def resume_job(self, job_id: int) -> JobView:
        return _do(self.service.resume_job, int(job_id))

    def retry_job(self, job_id: int) -> JobView:
        return _do(self.service.retry_job, int(job_id))

    def update_job(
        self,
        job_id: int,
        *,
        priority: int | None = None,
        tags: list[str] | None = None,
        cpus: int | None = None,
        ram_mb: int | None = None,
        max_attempts: int | None = None,
        gpus: int | None = None,
    ) -> JobView:
        body = update_fields(priority, tags, cpus, ram_mb, max_attempts, gpus)
        try:
            update = JobUpdate.model_validate(body)
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in err.get("loc", ())) or "body"
            raise ApiError(422, "invalid_request", f"{where}: {err['msg']}") from None
        changes = JobChanges(**update.model_dump(exclude_none=True))
        return _do(self.service.update_job, int(job_id), changes)

    def job_events(self, job_id: int, after: int = 0, limit: int | None = None) -> list[EventView]:
        return _do(
            self.store.list_events,
            job_id=int(job_id),
            after_id=int(after),
            limit=1000 if limit is None else int(limit),
            job_must_exist=True,
        )

    def follow_job(
        self,
        job_id: int,
        after: int = 0,
        *,
        wait_s: float = 20.0,
        limit: int = 1000,
        events: bool = False,
    ) -> FollowPage:
        return _do(self.service.follow_wait, int(job_id), int(after), wait_s, limit, events)

    def get_task(self, task_id: int) -> TaskView:
        return _do(self.store.get_task, int(task_id))

    def read_log(self, attempt_id: int, stream: str = "stdout", offset: int = 0) -> LogView:
        return _do(self.store.read_log, int(attempt_id), stream, int(offset))

    # ---------------------------------------------------------------- agents

    def register_agent(self, req: AgentRegister) -> AgentView:
        return _do(self.store.register_agent, req)[0]

    def list_agents(self) -> list[AgentView]:
        return _do(self.store.list_agents)

    def get_agent(self, agent_id: str) -> AgentView:
        return _do(self.store.get_agent, agent_id)

    def claim(self, agent_id: str, req: ClaimRequest) -> ClaimResponse:
        out = _do(self.service.claim_wait, agent_id, req)
        return ClaimResponse.model_construct(
            offers=out.offers, completions=out.results, lease_s=self.store.lease_s, drain=out.drain
        )

    def ack(self, attempt_id: int, token: str) -> None:
        _do(self.service.ack, int(attempt_id), token)

    def append_log(self, attempt_id: int, token: str, chunks: Sequence[LogChunk]) -> None:
        _do(self.store.append_log, int(attempt_id), token, list(chunks))

    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse:
        return _do(self.service.heartbeat, agent_id, hb)

    # ----------------------------------------------------------------- blobs

    def missing_blobs(self, digests: Iterable[str]) -> list[str]:
        return _do(self.store.missing_blobs, list(dict.fromkeys(digests)))

    def put_blob(self, digest: str, data: bytes) -> BlobStored:
        size, created = _do(self.store.put_blob, digest, bytes(data))
        return BlobStored.model_construct(
            digest=digest, size=size, href=f"/api/v1/blobs/{digest}", created=created
        )

    def get_blob(self, digest: str) -> bytes:
        data: bytes = _do(self.store.get_blob, digest)
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BlobDigestError(digest, actual)
        return data

    def download_blob(self, digest: str, dest: Path | str, *, mode: int | None = None) -> int:
        """Write a blob into ``dest`` (a temp file renamed into place), verified."""
        data = self.get_blob(digest)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return len(data)

    def upload_files(
        self, root: Path | str, relpaths: Iterable[str]
    ) -> dict[str, tuple[str, int, int]]:
        """As :meth:`herder.client.HerderClient.upload_files`."""
        result, where = hash_files(Path(root), relpaths)
        for digest in self.missing_blobs(list(where)):
            data = where[digest].read_bytes()
            self.put_blob(digest, data)
        return result
