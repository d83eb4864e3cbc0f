"""``HerderClient``: the one HTTP client of the master API (CLI, Python API, agent).

Every call goes through ``RequestLoop._request`` (``herder.client.loop``), which implements the
redirect protocol of seeds/004 (DESIGN §7; the wire format is docs/protocol-deferrals.md):

* the client keeps *servers to try*, *servers tried*, *dead servers* and a
  *priority flag* (sent as ``Herder-Priority: 1``); the lists and the steps
  are ``herder.client.deferral.LoopState``;
* a master that cannot be reached goes to *dead servers*;
* a **busy** deferral (HTTP 503, ``{"error": "busy", "message", "alternates",
  "queued": {"requests", "estimate_s"}}``, ``Retry-After``) puts the master on
  *servers tried*; a **no-service** deferral (HTTP 421, ``{"error":
  "no_service", "message", "alternates"}``) puts it on no list: it is not asked
  again for this request; alternates no list knows yet join *servers to try*;
* when *servers to try* runs out, the flag turns on and the tried (busy)
  servers are tried again (a master must queue, not defer, a priority request
  it can handle); ``on_all_busy=`` may give up instead (:class:`WaitDeclined`,
  the CLI's ``--no-wait``); when it runs out with the flag on,
  :class:`NoMasterAvailable` names every master tried and what it said;
* a **continuation** deferral (a 2xx answer with header
  ``Herder-Continuation: 1`` and body ``{"continuation": {"method", "path",
  "body", "params"}, "alternates", "result"}``) means the first transaction is
  done: the flag resets, the tried servers become servers to try again (after
  the continuation's alternates; the master that answered only if it is one),
  and the loop goes on with the new command (idempotent by construction).

With ``master_timeout=`` (seconds) or ``outage=OutagePolicy(...)``
(``herder.client.outage``) a request that finds no master waits for one
(capped exponential backoff with full jitter, one announcement per outage)
and is sent again, up to that long per outage; then
:class:`~herder.client.errors.MasterOutageTimeout`. A submission without an
idempotency key gets one first, so a resend whose first answer was lost
finds the same job. The agent leaves this off: it has its own backoff.

A master that answers normally becomes the preferred server of the next
request (sticky); the configured masters stay the fallback. Masters that
failed (unreachable, timed out, busy) are recorded in :attr:`failures` so the
caller can report them to the next master it reaches (DESIGN §6).

TCP_NODELAY: httpcore's synchronous backend sets it on every TCP connection it
opens (``httpcore/_backends/sync.py``, ``connect_tcp``), so no socket option is
added here. Connections are pooled and kept alive by ``httpx.Client``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from herder.api_auth import AgentRegistered
from herder.api_control import update_fields
from herder.api_inputs import JobHeld
from herder.api_models import (
    AckRequest,
    AgentLimits,
    AgentList,
    AgentRegister,
    AgentView,
    BlobMissing,
    BlobQuery,
    BlobStored,
    ClaimRequest,
    ClaimResponse,
    Completion,
    CompletionResult,
    EventView,
    FollowView,
    Heartbeat,
    HeartbeatResponse,
    JobList,
    JobSubmit,
    JobSubmitted,
    JobSummary,
    JobView,
    LogAppend,
    LogChunk,
    LogView,
    OwnerShareList,
    OwnerShareView,
    TaskView,
    decode_inline,
)
from herder.client.errors import (
    BlobDigestError,
    HerderClientError,
)
from herder.client.files import CHUNK, InputSource, InputUploader, hash_files
from herder.client.logs import FullLogMixin
from herder.client.loop import (
    API_PREFIX,
    CONTINUATION_HEADER,
    MAX_CONTINUATIONS,
    MAX_FAILURES_KEPT,
    PRIORITY_HEADER,
    MasterFailure,
    MasterSource,
    RequestLoop,
    normalize_master_url,
)
from herder.records import FollowPage, OutputRecord, TaskResult

M = TypeVar("M", bound=BaseModel)

BLOB_QUERY_BATCH = 10_000
MAX_BODY_CUTS = 5

__all__ = [
    "API_PREFIX",
    "BLOB_QUERY_BATCH",
    "CONTINUATION_HEADER",
    "MAX_CONTINUATIONS",
    "MAX_FAILURES_KEPT",
    "PRIORITY_HEADER",
    "HerderClient",
    "MasterFailure",
    "MasterSource",
    "follow_page",
    "normalize_master_url",
]


class _EventList(BaseModel):
    events: list[EventView]


class HerderClient(FullLogMixin, RequestLoop):
    """Synchronous, thread-safe client of the herder master API.

    ``masters`` is one URL, a comma/space separated string of URLs, or a
    sequence of URLs (``http://host:port``; ``/api/v1`` is added). Use as a
    context manager or call :meth:`close`.

    ``discovery`` (e.g. :class:`herder.client.discovery.MasterDiscovery`)
    adds masters found at request time after the configured ones; with it,
    ``masters`` may be omitted.
    """

    def __enter__(self) -> HerderClient:
        return self

    # ------------------------------------------------------------------ jobs

    def submit_job(
        self, spec: JobSubmit, *, inputs: Mapping[str, InputSource] | None = None
    ) -> JobView:
        """Submit a job. Resent after an ambiguous failure only when it has an idempotency key.

        ``inputs`` (``{digest: file or bytes}``): the job's required blobs, sent in
        two transactions (issue 10): the master creates the job waiting for those
        it lacks, the client uploads them (:meth:`_submit_with_inputs`).
        """
        spec = self._keyed(spec)
        if inputs is not None:
            held, response = self._submit_with_inputs(spec, inputs, {})
            if held is not None:
                return self.get_job(held.id)
            return _parsed(JobView, response)
        return self._call(
            JobView, "POST", "/jobs", json=spec, idempotent=spec.idempotency_key is not None
        )

    def submit_job_ids(
        self, spec: JobSubmit, *, inputs: Mapping[str, InputSource] | None = None
    ) -> JobSubmitted:
        """Submit a job; the answer names its task ids instead of carrying every task's view.

        ``inputs``: as for :meth:`submit_job`."""
        spec = self._keyed(spec)
        if inputs is not None:
            held, response = self._submit_with_inputs(spec, inputs, {"view": "ids"})
            if held is not None:
                return JobSubmitted(
                    id=held.id, href=held.href, created=held.created, task_ids=held.task_ids
                )
            return _parsed(JobSubmitted, response)
        return self._call(
            JobSubmitted,
            "POST",
            "/jobs",
            json=spec,
            params={"view": "ids"},
            idempotent=spec.idempotency_key is not None,
        )

    def _submit_with_inputs(
        self,
        spec: JobSubmit,
        inputs: Mapping[str, InputSource],
        params: dict[str, str | int | float],
    ) -> tuple[JobHeld | None, httpx.Response]:
        """``POST /jobs?inputs=later``, then the uploads its continuation names.

        The short write creates the job (waiting while inputs are missing) and
        answers a continuation naming them; :class:`InputUploader` uploads them
        and the loop sends the last one (seeds/004: the continuation is
        idempotent, by digest). Returns the held job (None: nothing was
        missing, the answer is the job) and the last answer. A crash in between
        leaves the job waiting: sending the same spec again (same idempotency
        key) answers what is still missing.
        """
        uploader = InputUploader(self.put_blob, inputs)
        response = self._request(
            "POST",
            "/jobs",
            json=spec,
            params={**params, "inputs": "later"},
            idempotent=spec.idempotency_key is not None,
            on_continuation=uploader,
        )
        return uploader.held, response

    def _keyed(self, spec: JobSubmit) -> JobSubmit:
        """A client that waits out outages resends: give a keyless submission a key of its own."""
        if self._outage is None or spec.idempotency_key is not None:
            return spec
        return spec.model_copy(update={"idempotency_key": f"client-{uuid.uuid4()}"})

    def follow_job(
        self,
        job_id: int,
        after: int = 0,
        *,
        wait_s: float = 20.0,
        limit: int = 1000,
        events: bool = False,
    ) -> FollowPage:
        """One long-poll of the job's follow stream (``GET /jobs/{id}/follow``), as a record."""
        params: dict[str, str | int | float] = {
            "after": int(after),
            "wait_s": float(wait_s),
            "limit": int(limit),
        }
        if events:
            params["events"] = "true"
        timeout = httpx.Timeout(self._timeout, read=self._timeout + wait_s)
        view = self._call(
            FollowView,
            "GET",
            f"/jobs/{int(job_id)}/follow",
            params=params,
            idempotent=True,
            timeout=timeout,
        )
        return follow_page(view)

    def get_job(self, job_id: int) -> JobView:
        return self._call(JobView, "GET", f"/jobs/{int(job_id)}", idempotent=True)

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobSummary]:
        params: dict[str, str | int | float] = {"limit": int(limit)}
        if state is not None:
            params["state"] = state
        return self._call(JobList, "GET", "/jobs", params=params, idempotent=True).jobs

    def cancel_job(self, job_id: int) -> JobView:
        return self._call(JobView, "POST", f"/jobs/{int(job_id)}/cancel", idempotent=True)

    # --------------------------------------------------------------- control

    def pause_job(self, job_id: int, *, kill: bool = False) -> JobView:
        """Pause a job: nothing of it starts any more; ``kill``: its running tasks are
        stopped now and queued again (no failure counted). ConflictError unless queued
        or running."""
        return self._call(
            JobView, "POST", f"/jobs/{int(job_id)}/pause", json={"kill": kill}, idempotent=False
        )

    def resume_job(self, job_id: int) -> JobView:
        """Resume a paused job (ConflictError for one that is not paused)."""
        return self._call(JobView, "POST", f"/jobs/{int(job_id)}/resume", idempotent=False)

    def retry_job(self, job_id: int) -> JobView:
        """Queue a failed or cancelled job's failed and cancelled tasks again, with fresh
        attempt budgets (ConflictError for a job in any other state)."""
        return self._call(JobView, "POST", f"/jobs/{int(job_id)}/retry", idempotent=False)

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
        """Change a live job (``PATCH /jobs/{id}``): priority, tags, cpus, ram_mb of its
        tasks not started yet, max_attempts of every task not finished. ApiError 422
        naming a bad field (nothing changed), ConflictError for a finished job."""
        body = update_fields(priority, tags, cpus, ram_mb, max_attempts, gpus)
        return self._call(JobView, "PATCH", f"/jobs/{int(job_id)}", json=body, idempotent=True)

    def job_events(self, job_id: int, after: int = 0, limit: int | None = None) -> list[EventView]:
        params: dict[str, str | int | float] = {"after": int(after)}
        if limit is not None:
            params["limit"] = int(limit)
        return self._call(
            _EventList, "GET", f"/jobs/{int(job_id)}/events", params=params, idempotent=True
        ).events

    def get_task(self, task_id: int) -> TaskView:
        return self._call(TaskView, "GET", f"/tasks/{int(task_id)}", idempotent=True)

    # ------------------------------------------------------------------ logs

    def read_log(self, attempt_id: int, stream: str = "stdout", offset: int = 0) -> LogView:
        return self._call(
            LogView,
            "GET",
            f"/attempts/{int(attempt_id)}/log",
            params={"stream": stream, "offset": int(offset)},
            idempotent=True,
        )

    # ---------------------------------------------------------------- agents

    def register_agent(self, req: AgentRegister) -> AgentView:
        """Register (idempotent when the agent sends the id it keeps)."""
        # AgentRegistered: with a join token, the answer carries the agent's own token.
        return self._call(
            AgentRegistered, "POST", "/agents", json=req, idempotent=req.agent_id is not None
        )

    def list_agents(self) -> list[AgentView]:
        return self._call(AgentList, "GET", "/agents", idempotent=True).agents

    def get_agent(self, agent_id: str) -> AgentView:
        return self._call(AgentView, "GET", f"/agents/{agent_id}", idempotent=True)

    # ------------------------------------------------------------- scheduler

    def set_agent_limits(self, agent_id: str, **limits: int | float | None) -> AgentView:
        """Change an agent's own limits now: ``max_ram_mb``, ``max_load`` (None lifts one)."""
        body = AgentLimits.model_validate(limits).model_dump(exclude_unset=True)
        return self._call(
            AgentView, "PATCH", f"/agents/{quote(agent_id, safe='')}", json=body, idempotent=True
        )

    def owner_shares(self) -> list[OwnerShareView]:
        """Owners' fair-share weights and the slot-seconds they used over the window."""
        return self._call(OwnerShareList, "GET", "/owners", idempotent=True).owners

    def set_owner_weight(self, owner: str, weight: float) -> OwnerShareView:
        """An owner's fair-share weight (default 1): 2 gets twice the slots of 1."""
        return self._call(
            OwnerShareView,
            "PUT",
            f"/owners/{quote(owner, safe='')}/share",
            json={"weight": weight},
            idempotent=True,
        )

    def claim(
        self, agent_id: str, req: ClaimRequest, *, idempotent: bool | None = None
    ) -> ClaimResponse:
        """Complete, acknowledge and claim in one round trip (long-polls up to ``req.wait_s``).

        Resent after an ambiguous failure only when it carries no completions
        (offers lost that way return to the queue at their ack deadline).
        """
        timeout = httpx.Timeout(self._timeout, read=self._timeout + req.wait_s)
        return self._call(
            ClaimResponse,
            "POST",
            f"/agents/{agent_id}/claim",
            json=req,
            idempotent=(not req.completions) if idempotent is None else idempotent,
            timeout=timeout,
        )

    def ack(self, attempt_id: int, token: str) -> None:
        self._request(
            "POST",
            f"/attempts/{int(attempt_id)}/ack",
            json=AckRequest(token=token),
            idempotent=True,
        )

    def append_log(self, attempt_id: int, token: str, chunks: Sequence[LogChunk]) -> None:
        """Append log chunks (not resent after an ambiguous failure: it would duplicate them)."""
        self._request(
            "POST",
            f"/attempts/{int(attempt_id)}/log",
            json=LogAppend(token=token, chunks=list(chunks)),
            idempotent=False,
        )

    def complete(self, c: Completion) -> CompletionResult:
        """Report an attempt's end. 409 → :class:`StaleAttemptError`; never resent blindly."""
        return self._call(
            CompletionResult,
            "POST",
            f"/attempts/{int(c.attempt_id)}/complete",
            json=c,
            idempotent=False,
        )

    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse:
        return self._call(
            HeartbeatResponse, "POST", f"/agents/{agent_id}/heartbeat", json=hb, idempotent=True
        )

    # ----------------------------------------------------------------- blobs

    def missing_blobs(self, digests: Iterable[str]) -> list[str]:
        """The digests (of those given) the blob store lacks."""
        unique = list(dict.fromkeys(digests))
        missing: list[str] = []
        for i in range(0, len(unique), BLOB_QUERY_BATCH):
            batch = unique[i : i + BLOB_QUERY_BATCH]
            missing.extend(
                self._call(
                    BlobMissing,
                    "POST",
                    "/blobs/missing",
                    json=BlobQuery(digests=batch),
                    idempotent=True,
                ).missing
            )
        return missing

    def put_blob(self, digest: str, data: bytes) -> BlobStored:
        response = self._request("PUT", f"/blobs/{digest}", content=bytes(data), idempotent=True)
        return BlobStored.model_validate_json(response.content)

    def get_blob(self, digest: str) -> bytes:
        data = self._request("GET", f"/blobs/{digest}", idempotent=True).content
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BlobDigestError(digest, actual)
        return data

    def download_blob(self, digest: str, dest: Path | str, *, mode: int | None = None) -> int:
        """Stream a blob into ``dest`` (a temp file renamed into place); verify its sha256.

        Returns the number of bytes written. A client that waits out outages
        fetches a body cut off midway again from the start (a master killed
        mid-answer), up to :data:`MAX_BODY_CUTS` times.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                cuts = 0
                while True:
                    try:
                        size, actual = self._stream_blob(digest, out)
                        break
                    except httpx.TransportError as exc:
                        cuts += 1
                        if self._outage is None or cuts > MAX_BODY_CUTS:
                            raise HerderClientError(
                                f"download of blob {digest} interrupted: "
                                f"{type(exc).__name__}: {exc}"
                            ) from exc
                        out.seek(0)
                        out.truncate()
            if actual != digest:
                raise BlobDigestError(digest, actual)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, dest)
            return size
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _stream_blob(self, digest: str, out: BinaryIO) -> tuple[int, str]:
        """One GET of a blob's body into ``out``: (bytes, their sha256)."""
        h = hashlib.sha256()
        size = 0
        response = self._request("GET", f"/blobs/{digest}", idempotent=True, stream=True)
        try:
            for chunk in response.iter_bytes(CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        finally:
            response.close()
        return size, h.hexdigest()

    def upload_files(
        self, root: Path | str, relpaths: Iterable[str]
    ) -> dict[str, tuple[str, int, int]]:
        """Hash files under ``root``, upload those the store lacks (one ``missing`` query).

        Returns ``{relpath: (digest, size, mode)}``, keyed by each path as given
        and by its normalized form (``./src/a.c`` and ``src/a.c``).
        Paths that would leave ``root`` raise :class:`herder.paths.UnsafePath`.
        """
        result, where = hash_files(Path(root), relpaths)
        if not where:
            return result
        for digest in self.missing_blobs(list(where)):
            src = where.get(digest)
            if src is None:
                continue
            data = src.read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise HerderClientError(f"{src} changed while it was being uploaded")
            self.put_blob(digest, data)
        return result

    def iter_job_events(
        self, job_id: int, after: int = 0, *, poll_s: float = 0.5
    ) -> Iterator[EventView]:
        """Yield a job's events as they arrive, until the job reaches a final state."""
        final = {"succeeded", "failed", "cancelled"}
        while True:
            events = self.job_events(job_id, after=after)
            yield from events
            if events:
                after = events[-1].id
                continue
            if self.get_job(job_id).state in final:
                yield from self.job_events(job_id, after=after)
                return
            time.sleep(poll_s)


def _parsed(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise HerderClientError(
            f"POST /jobs: the master's answer is not a valid {model.__name__}: {exc}"
        ) from exc


def follow_page(view: FollowView) -> FollowPage:
    """A follow answer as the record the embedded farm's follower returns too."""
    results = []
    for r in view.results:
        try:
            blobs = decode_inline(r.inline)
        except ValueError:
            blobs = {}  # fetched as blobs instead
        results.append(
            TaskResult(
                task_id=r.task_id,
                name=r.name,
                state=r.state,
                exit_code=r.exit_code,
                error=r.error,
                attempt_id=r.attempt_id,
                outputs=[OutputRecord(o.path, o.digest, o.size, o.mode) for o in r.outputs],
                stdout=r.stdout,
                stderr=r.stderr,
                stdout_len=r.stdout_len,
                stderr_len=r.stderr_len,
                blobs=blobs,
            )
        )
    return FollowPage(
        job_id=view.job_id,
        state=view.state,
        next=view.next,
        started=list(view.started),
        results=results,
        events=view.events,
    )
