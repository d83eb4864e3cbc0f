"""Routes of jobs, tasks, events, the follow stream, logs and blobs (DESIGN §4, §10)."""

from __future__ import annotations

import hashlib
import tempfile
import time
from typing import Annotated, Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import Response

from herder.api_control import JobPause, JobUpdate
from herder.api_inputs import JobHeld
from herder.api_limits import INT64_MAX
from herder.api_models import (
    BlobMissing,
    BlobQuery,
    BlobStored,
    ErrorBody,
    EventList,
    FollowView,
    JobList,
    JobSubmit,
    JobSubmitted,
    JobView,
    OutputFile,
    TaskResultView,
    TaskView,
    encode_inline,
)
from herder.errors import DigestMismatch
from herder.master.auth import bind_owner, principal_of
from herder.master.context import (
    ERRORS,
    AfterQuery,
    ApiContext,
    IdPath,
    IdQuery,
    body_doc,
    json_response,
    parse_body,
    validation_error,
)
from herder.master.deferrals import UploadContinuation, upload_continuation
from herder.master.deferrals import handoff as handoff_read
from herder.records import FollowPage, Submitted
from herder.store.control import JobChanges

# Long reads a read-write master hands to read-only masters (herder.master.deferrals).
HandoffQuery = Annotated[
    bool, Query(description="false: serve it here (the continuation of a handed-off read)")
]
HANDOFF_LOG_BYTES = 1 << 20
DigestPath = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="sha256, lowercase hex")]
FOLLOW_WAIT_MAX_S = 60.0


def follow_view(page: FollowPage) -> FollowView:
    """A store record of a follow page as its wire model."""
    results = [
        TaskResultView.model_construct(
            task_id=r.task_id,
            href=f"/api/v1/tasks/{r.task_id}",
            name=r.name,
            state=r.state,
            exit_code=r.exit_code,
            error=r.error,
            attempt_id=r.attempt_id,
            outputs=[
                OutputFile.model_construct(path=o.path, digest=o.digest, size=o.size, mode=o.mode)
                for o in r.outputs
            ],
            stdout=r.stdout,
            stderr=r.stderr,
            stdout_len=r.stdout_len,
            stderr_len=r.stderr_len,
            inline={d: encode_inline(b) for d, b in r.blobs.items()},
        )
        for r in page.results
    ]
    return FollowView.model_construct(
        job_id=page.job_id,
        state=page.state,
        next=page.next,
        started=page.started,
        results=results,
        events=page.events,
    )


def register(app: FastAPI, ctx: ApiContext) -> None:
    service = ctx.service
    store = service.store
    cfg = ctx.cfg

    def _released(job_ids: object) -> None:
        # An upload released jobs held for their inputs: wake parked claims now.
        service.work_arrived()
        service.changed.notify()

    if hasattr(store, "add_release_listener"):
        store.add_release_listener(_released)

    def _submit_held(spec: JobSubmit) -> tuple[Submitted, list[str]]:
        sub = service.submit(spec, hold_inputs=True)
        return sub, store.missing_inputs(sub.id)

    @app.post(
        "/api/v1/jobs",
        response_model=JobView,
        status_code=201,
        responses={
            **ERRORS,
            200: {
                "model": JobSubmitted,
                "description": "the idempotency key is known: the same job (a JobView, a "
                "JobSubmitted with view=ids, or with inputs=later an UploadContinuation "
                "while it still misses inputs)",
            },
            202: {
                "model": UploadContinuation,
                "description": "inputs=later and inputs are missing: the job is created "
                "waiting; a continuation (`Herder-Continuation: 1`) to upload them",
            },
        },
        openapi_extra=body_doc(JobSubmit),
    )
    async def submit_job(
        request: Request,
        view: Annotated[
            Literal["full", "ids"],
            Query(description="ids: answer a JobSubmitted (no task views) instead of a JobView"),
        ] = "full",
        inputs: Annotated[
            Literal["now", "later"],
            Query(
                description="later: required blobs not stored yet hold the job (waiting) "
                "until they are uploaded; the answer is then a continuation naming them "
                "(202, `Herder-Continuation: 1`). now: the job is queued as it is"
            ),
        ] = "now",
    ) -> Response:
        """Submit a job; 201 new, 200 when its idempotency key is known (the same job).

        With `inputs=later` a job whose inputs are not all stored is created
        waiting and answered with a continuation: upload each missing blob
        (`PUT /api/v1/blobs/{digest}`) to a read-write master; the last one
        releases the job. Sent again with its idempotency key, it answers
        what is still missing."""
        spec = await parse_body(request, JobSubmit)
        spec = bind_owner(spec, principal_of(request))  # the owner is who is authenticated
        tasks = sum(len(stage.tasks) for stage in spec.stages)
        if tasks > cfg.max_tasks_per_job:
            raise validation_error(
                [
                    {
                        "loc": ("body", "stages"),
                        "msg": f"{tasks} tasks, more than {cfg.max_tasks_per_job} in one job",
                        "type": "too_many_tasks",
                    }
                ]
            )
        if inputs == "later":
            sub, missing = await ctx.call(_submit_held, spec)
            if missing:
                held = JobHeld(
                    id=sub.id,
                    href=f"/api/v1/jobs/{sub.id}",
                    created=sub.created,
                    state="waiting",
                    missing=missing,
                    task_ids=sub.task_ids,
                )
                return upload_continuation(ctx.state, held, 202 if sub.created else 200)
            status = 201 if sub.created else 200
            if view == "ids":
                out = JobSubmitted(
                    id=sub.id,
                    href=f"/api/v1/jobs/{sub.id}",
                    created=sub.created,
                    task_ids=sub.task_ids,
                )
                return json_response(out, status)
            return json_response(await ctx.call(store.get_job, sub.id), status)
        if view == "ids":
            sub = await ctx.call(service.submit, spec)
            out = JobSubmitted(
                id=sub.id, href=f"/api/v1/jobs/{sub.id}", created=sub.created, task_ids=sub.task_ids
            )
            return json_response(out, 201 if sub.created else 200)
        job, created = await ctx.call(service.submit_view, spec)
        return json_response(job, 201 if created else 200)

    @app.get("/api/v1/jobs", response_model=JobList, responses=ERRORS)
    async def list_jobs(
        state: Literal["waiting", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
        | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> Response:
        jobs = await ctx.call(store.list_jobs, state=state, limit=limit)
        return json_response(JobList(jobs=jobs))

    @app.get("/api/v1/jobs/{job_id}", response_model=JobView, responses=ERRORS)
    async def get_job(job_id: IdPath) -> Response:
        return json_response(await ctx.call(store.get_job, job_id))

    @app.post("/api/v1/jobs/{job_id}/cancel", response_model=JobView, responses=ERRORS)
    async def cancel_job(job_id: IdPath) -> Response:
        return json_response(await ctx.call(service.cancel_job, job_id, "cancelled by user"))

    control_errors = {
        **ERRORS,
        404: {"model": ErrorBody, "description": "no such job"},
        409: {"model": ErrorBody, "description": "not allowed in the job's state"},
    }

    @app.post("/api/v1/jobs/{job_id}/pause", response_model=JobView, responses=control_errors)
    async def pause_job(job_id: IdPath, body: JobPause | None = None) -> Response:
        """Pause a queued or running job: nothing of it starts any more.

        Its running tasks finish; with `kill` they are stopped now and queued
        again, no failure counted. 409 for a job in any other state.
        """
        kill = body.kill if body is not None else False
        return json_response(await ctx.call(service.pause_job, job_id, kill))

    @app.post("/api/v1/jobs/{job_id}/resume", response_model=JobView, responses=control_errors)
    async def resume_job(job_id: IdPath) -> Response:
        """Resume a paused job; 409 for a job that is not paused."""
        return json_response(await ctx.call(service.resume_job, job_id))

    @app.post("/api/v1/jobs/{job_id}/retry", response_model=JobView, responses=control_errors)
    async def retry_job(job_id: IdPath) -> Response:
        """Retry a failed or cancelled job: its failed and cancelled tasks are queued again
        with fresh attempt budgets and the job runs. 409 for a job in any other state."""
        return json_response(await ctx.call(service.retry_job, job_id))

    @app.patch("/api/v1/jobs/{job_id}", response_model=JobView, responses=control_errors)
    async def update_job(job_id: IdPath, body: JobUpdate) -> Response:
        """Change a waiting, queued, running or paused job (422 naming a bad field, nothing
        changed).

        priority, tags, cpus and ram_mb apply to its tasks not started yet,
        max_attempts to every task of it not finished. 409 for a finished job.
        """
        changes = JobChanges(**body.model_dump(exclude_none=True))
        return json_response(await ctx.call(service.update_job, job_id, changes))

    @app.get("/api/v1/jobs/{job_id}/events", response_model=EventList, responses=ERRORS)
    async def job_events(
        job_id: IdPath,
        after: AfterQuery = 0,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> Response:
        events = await ctx.call(
            store.list_events, job_id=job_id, after_id=after, limit=limit, job_must_exist=True
        )
        return json_response(EventList(events=events))

    @app.get("/api/v1/jobs/{job_id}/follow", response_model=FollowView, responses=ERRORS)
    async def follow_job(
        job_id: IdPath,
        after: Annotated[
            int, Query(ge=0, le=INT64_MAX, description="the `next` of the previous answer")
        ] = 0,
        wait_s: Annotated[
            float, Query(ge=0, le=FOLLOW_WAIT_MAX_S, description="long-poll up to this long")
        ] = 20.0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        events: Annotated[bool, Query(description="include the events themselves")] = False,
    ) -> Response:
        """Follow a job: tasks offered, and tasks finished with their results, since `after`.

        Answers as soon as anything happened after `after` (or the job is
        over, or `wait_s` passed). A finished task comes with its exit status,
        error, its logs when short, its output manifest and the bytes of its
        small outputs (`inline`), so a client collects a build with no
        request per task. Pass `next` back as `after`.
        """
        deadline = time.monotonic() + wait_s
        while True:
            gen = service.changed.generation
            page = await ctx.call(service.follow, job_id, after, limit, events)
            remaining = deadline - time.monotonic()
            if page.moved(after) or remaining <= 0 or ctx.state.stopping:
                return json_response(follow_view(page))
            await service.changed.wait_async(gen, min(remaining, cfg.recheck_interval_s))

    @app.get("/api/v1/events", response_model=EventList, responses=ERRORS)
    async def list_events(
        job_id: IdQuery = None,
        task_id: IdQuery = None,
        after: AfterQuery = 0,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> Response:
        """Every recorded transition (task, from, to, reason, attempt, agent, time), by id."""
        events = await ctx.call(
            store.list_events, job_id=job_id, task_id=task_id, after_id=after, limit=limit
        )
        return json_response(EventList(events=events))

    @app.get("/api/v1/tasks/{task_id}", response_model=TaskView, responses=ERRORS)
    async def get_task(task_id: IdPath) -> Response:
        return json_response(await ctx.call(store.get_task, task_id))

    @app.get(
        "/api/v1/attempts/{attempt_id}/log",
        responses={
            **ERRORS,
            200: {
                "description": "the window, or (handed off) a continuation "
                "(`Herder-Continuation: 1`, a ContinuationBody)",
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                {"$ref": "#/components/schemas/LogView"},
                                {"$ref": "#/components/schemas/ContinuationBody"},
                            ]
                        }
                    }
                },
            },
        },
    )
    async def read_log(
        request: Request,
        attempt_id: IdPath,
        stream: Literal["stdout", "stderr"] = "stdout",
        offset: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
        limit: Annotated[int, Query(ge=1, le=16 << 20)] = 1 << 20,
        handoff: HandoffQuery = True,
    ) -> Response:
        """A window of a log. A read-write master hands a window of ``HANDOFF_LOG_BYTES``
        or more to a read-only master (a continuation), when it knows one."""
        if handoff and limit >= HANDOFF_LOG_BYTES and (moved := handoff_read(ctx.state, request)):
            return moved
        return json_response(await ctx.call(store.read_log, attempt_id, stream, offset, limit))

    # ----------------------------------------------------------------- blobs

    @app.post(
        "/api/v1/blobs/missing",
        response_model=BlobMissing,
        responses=ERRORS,
        openapi_extra=body_doc(BlobQuery),
    )
    async def missing_blobs(request: Request) -> Response:
        body = await parse_body(request, BlobQuery)
        return json_response(BlobMissing(missing=await ctx.call(store.missing_blobs, body.digests)))

    @app.put(
        "/api/v1/blobs/{digest}",
        response_model=BlobStored,
        status_code=201,
        responses={**ERRORS, 200: {"model": BlobStored, "description": "already stored"}},
    )
    async def put_blob(digest: DigestPath, request: Request) -> Response:
        """Upload a blob (at most ``max_blob_bytes``, 413 past it, chunked or not);
        422 and nothing kept when its sha256 is not ``digest``."""
        # Spooled to a temporary file, its digest computed on the way: memory
        # stays bounded whatever the size (BodyLimitMiddleware bounds the size).
        with tempfile.NamedTemporaryFile(prefix="herder-blob-") as spool:
            sha, size = hashlib.sha256(), 0
            async for chunk in request.stream():
                sha.update(chunk)
                spool.write(chunk)
                size += len(chunk)
            spool.flush()
            if sha.hexdigest() != digest:
                raise DigestMismatch(
                    "the data's sha256 does not match the digest",
                    detail={"expected": digest, "actual": sha.hexdigest()},
                )
            size, created = await ctx.call(store.put_blob_file, digest, spool.name, size)
        stored = BlobStored(
            digest=digest, size=size, href=f"/api/v1/blobs/{digest}", created=created
        )
        return json_response(stored, 201 if created else 200)

    @app.get(
        "/api/v1/blobs/{digest}",
        responses={
            **ERRORS,
            200: {
                "description": "the bytes, or (handed off) a continuation "
                "(`Herder-Continuation: 1`, a ContinuationBody)",
                "content": {
                    "application/octet-stream": {},
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/ContinuationBody"}
                    },
                },
            },
        },
    )
    async def get_blob(
        digest: DigestPath, request: Request, handoff: HandoffQuery = True
    ) -> Response:
        """A blob's bytes. A read-write master hands the download to a read-only master
        (a continuation naming the same request with ``handoff=0``), when it knows one."""
        if handoff and (moved := handoff_read(ctx.state, request)):
            return moved
        data = await ctx.call(store.get_blob, digest)
        return Response(data, media_type="application/octet-stream")
