"""The master's HTTP API: translates HTTP to store calls (DESIGN §4).

Handlers hold no thread while a claim long-polls: store calls run in the
thread pool, waiting happens on an asyncio event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from herder import __version__
from herder.api_models import (
    AckRequest,
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
    ErrorBody,
    EventList,
    Heartbeat,
    HeartbeatResponse,
    JobList,
    JobSubmit,
    JobView,
    LogAppend,
    LogView,
    MasterFailureList,
    MasterFailureReport,
    MasterFailureView,
    MasterList,
    MasterView,
    TaskView,
)
from herder.core.rules import DEFAULT_MASTER_HEARTBEAT_S, master_timeout_s
from herder.errors import HerderError, InvalidRequest
from herder.master.metrics import MasterStats, StatsMiddleware
from herder.master.notify import WorkNotifier
from herder.master.wake import WakeConfig, Waker
from herder.store import Store
from herder.store.store import ClaimOutcome, MasterStatus

log = logging.getLogger("herder.master")

T = TypeVar("T")
DigestPath = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="sha256, lowercase hex")]
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
    422: {"model": ErrorBody},
}


def default_master_id() -> str:
    """A name for this master process (the maintenance lock's holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass
class MasterConfig:
    reap_interval_s: float = 1.0
    # Maintenance (reaping) runs on one master at a time: the holder of the
    # "reaper" lock row, renewed every round, taken over by another master
    # once it has not been renewed for this long (database clock).
    maintenance_ttl_s: float = 10.0
    master_id: str = field(default_factory=default_master_id)
    # While claims are parked, one cheap read this often looks for claimable
    # work that no local wake-up announced (queued through another master)
    # and wakes them; parked polls themselves cost nothing.
    recheck_interval_s: float = 1.0
    max_blob_bytes: int = 1 << 30
    # The master directory (GET /api/v1/masters): the URL agents use to reach
    # this master (`herder master --advertise-url`; serve() defaults it to
    # http://<listen host>:<port>), its role, and its heartbeat. The directory
    # stops listing it once its heartbeat is older than heartbeat_timeout_s
    # (default: 3 intervals), judged by the database clock.
    url: str | None = None
    role: Literal["read-write", "read-only"] = "read-write"
    heartbeat_interval_s: float = DEFAULT_MASTER_HEARTBEAT_S
    heartbeat_timeout_s: float | None = None
    # Talkback wake-ups (herder.master.wake): when work arrives, POST wake to
    # idle agents' talkback endpoints. Latency only; never needed for correctness.
    wake: WakeConfig = field(default_factory=WakeConfig)


def _json(model: BaseModel, status: int = 200) -> Response:
    # Serialize with pydantic directly: FastAPI's response_model round-trip
    # would validate the object a second time on the hot path.
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _error(status: int, code: str, message: str, detail: object | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        out.append(
            {
                "loc": [str(p) for p in err.get("loc", ())],
                "message": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return out


def create_app(store: Store, config: MasterConfig | None = None) -> FastAPI:
    cfg = config or MasterConfig()
    url = cfg.url or f"http://{socket.gethostname()}:6240"
    stats = MasterStats(master_id=cfg.master_id, url=url)
    notifier = WorkNotifier()
    # Agents with a claim parked on this master (its notifier wakes those).
    parked: dict[str, int] = {}

    async def _wake_targets(limit: int, exclude: Any) -> Any:
        return await run_in_threadpool(store.wake_targets, limit, exclude)

    async def _has_work() -> bool:
        return await run_in_threadpool(store.has_claimable_work)

    waker = Waker(cfg.wake, stats, _wake_targets, _has_work, lambda: list(parked))

    def work_arrived() -> None:
        """Tasks may have become claimable: wake parked claims here, and idle agents."""
        notifier.notify()
        waker.poke()

    # Serializes directory writes of this master, so a heartbeat still running
    # in a worker thread cannot land after the shutdown marked it stopped.
    directory_lock = threading.Lock()
    directory_closed = False

    def _status() -> MasterStatus:
        return MasterStatus(
            id=cfg.master_id,
            url=url,
            role=cfg.role,
            heartbeat_timeout_s=master_timeout_s(cfg.heartbeat_interval_s, cfg.heartbeat_timeout_s),
            requests=stats.requests,
            unhandled_exceptions=stats.unhandled_exceptions,
            avg_request_ms=stats.average_seconds * 1000.0,
            in_flight=stats.in_flight,
            version=__version__,
        )

    def _directory_write(starting: bool = False, stopping: bool = False) -> None:
        nonlocal directory_closed
        with directory_lock:
            if directory_closed:
                return
            if stopping:
                directory_closed = True
                store.master_stopped(_status())
            else:
                store.master_heartbeat(_status(), starting=starting)

    async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)

    async def reaper() -> None:
        holding = False
        while True:
            await asyncio.sleep(cfg.reap_interval_s)
            try:
                # Reaps only while holding the maintenance lock (taken or
                # renewed in the reap's own transaction).
                n = await call(store.maintain, cfg.master_id, cfg.maintenance_ttl_s)
                if (n is not None) != holding:
                    holding = n is not None
                    log.info(
                        "event=maintenance_lock %s master=%s",
                        "acquired" if holding else "lost",
                        cfg.master_id,
                    )
                app.state.maintenance = stats.maintenance = holding
                if n:
                    stats.reaped += n
                    work_arrived()
            except Exception:  # keep reaping whatever one round did
                stats.unhandled_exceptions += 1
                log.exception("event=reap_failed")

    def _claim_once(agent_id: str, body: ClaimRequest) -> Any:
        # An idle poll with nothing to deliver first probes the claim index
        # (a read) so it does not queue for the write lock only to find nothing.
        if not body.completions and not body.acks and not store.has_claimable_work():
            agent = store.get_agent(agent_id)  # NotFound for an unknown agent
            return ClaimOutcome(drain=agent.state == "draining")
        return store.claim(agent_id, body.max_tasks, body.completions, body.acks)

    async def directory_heartbeat() -> None:
        while True:
            await asyncio.sleep(cfg.heartbeat_interval_s)
            try:
                await call(_directory_write)
            except Exception:  # the database may be away; the next beat tries again
                stats.unhandled_exceptions += 1
                log.exception("event=master_heartbeat_failed master=%s", cfg.master_id)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(cfg.recheck_interval_s)
            if not notifier.waiters:
                continue
            try:
                if await call(store.has_claimable_work):
                    notifier.notify()
            except Exception:
                stats.unhandled_exceptions += 1
                log.exception("event=recheck_failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Recovery on start (seeds/002): requeue unacknowledged offers and
        # expired leases before serving any claim (uvicorn accepts no request
        # before the lifespan's startup is done). This reap does not wait for
        # the maintenance lock: every requeue is a compare-and-set, so it is
        # safe next to another master's reaper, and the start-up must not wait
        # for a dead master's lock to time out.
        requeued = await call(store.reap)
        log.info(
            "event=master_started requeued=%d dialect=%s master=%s",
            requeued,
            store.dialect,
            cfg.master_id,
        )
        try:  # listed in the directory before the first request is served
            await call(_directory_write, True)
        except Exception:
            stats.unhandled_exceptions += 1
            log.exception("event=master_heartbeat_failed master=%s", cfg.master_id)
        log.info("event=master_directory master=%s url=%s role=%s", cfg.master_id, url, cfg.role)
        tasks = [
            asyncio.create_task(reaper()),
            asyncio.create_task(ticker()),
            asyncio.create_task(directory_heartbeat()),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await waker.close()
            try:  # hand maintenance over at once instead of after the TTL
                await call(store.release_lock, cfg.master_id)
            except Exception:
                log.warning("event=maintenance_release_failed master=%s", cfg.master_id)
            try:  # leave the directory at once instead of after the heartbeat timeout
                await call(_directory_write, False, True)
            except Exception:
                log.warning("event=master_stop_record_failed master=%s", cfg.master_id)

    app = FastAPI(
        title="herder master",
        version=__version__,
        description="Job farm master API (DESIGN §4). Errors are JSON {error, message, detail}.",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.stats = stats
    app.state.notifier = notifier
    app.state.waker = waker
    # Set on SIGTERM so long-polls answer at once and shutdown is not held up.
    app.state.stopping = False
    app.state.maintenance = False
    app.state.master_id = cfg.master_id
    app.state.url = url
    app.add_middleware(StatsMiddleware, stats=stats)

    # ---------------------------------------------------------------- errors

    @app.exception_handler(HerderError)
    async def _herder_error(request: Request, exc: HerderError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _validation_detail(exc)
        if any(d["type"] == "json_invalid" for d in detail):
            return _error(400, "malformed_json", "the request body is not valid JSON", detail)
        first = detail[0] if detail else {"loc": [], "message": "invalid"}
        where = ".".join(p for p in first["loc"] if p != "body") or "request"
        return _error(
            422, "invalid_request", f"{where}: {first['message']}", jsonable_encoder(detail)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client went away mid-request (an agent killed during an upload):
        # nothing was written, nobody reads the answer, nothing is wrong here.
        log.info("event=client_disconnected path=%s", request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        stats.unhandled_exceptions += 1
        log.error("event=unhandled_exception path=%s error=%r", request.url.path, exc)
        return _error(500, "internal", "internal error; see the master's log")

    # ------------------------------------------------------------------ misc

    @app.get("/api/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__, "dialect": store.dialect}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(stats.prometheus(), media_type="text/plain; version=0.0.4")

    # -------------------------------------------------------------- masters
    # Routes with a trailing segment come first: {master_id:path} takes a
    # directory id, a URL (percent-encoded or not) or the host:port of one.

    @app.post(
        "/api/v1/masters/{master_id:path}/failures",
        response_model=MasterFailureView,
        status_code=201,
        responses=ERRORS,
    )
    async def report_master_failure(master_id: str, body: MasterFailureReport) -> Response:
        """Record an agent's or client's failure to reach a master (DESIGN §6).

        ``master_id`` is its directory id, its URL, or the ``host:port`` of its
        URL. The directory hides the master until its next heartbeat. 404
        ``not_found`` ("no master … in the directory") for an unknown master.
        """
        view = await call(store.report_master_failure, master_id, body)
        log.info(
            "event=master_failure_reported master=%s kind=%s reporter=%s request=%r",
            view.master_id,
            view.kind,
            view.reporter,
            view.request,
        )
        return _json(view, 201)

    @app.get(
        "/api/v1/masters/{master_id:path}/failures",
        response_model=MasterFailureList,
        responses=ERRORS,
    )
    async def list_master_failures(
        master_id: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> Response:
        """Failures reported for a master, newest first."""
        failures = await call(store.list_master_failures, master_id, limit)
        return _json(MasterFailureList(failures=failures))

    @app.get("/api/v1/masters", response_model=MasterList, responses=ERRORS)
    async def list_masters(
        include_all: Annotated[
            bool,
            Query(alias="all", description="every master, with its state and failures"),
        ] = False,
    ) -> Response:
        """The master directory: masters that are up (heartbeat fresh, no failure since)."""
        return _json(MasterList(masters=await call(store.list_masters, include_all)))

    @app.get("/api/v1/masters/{master_id:path}", response_model=MasterView, responses=ERRORS)
    async def get_master(master_id: str) -> Response:
        """One master, whatever its state, by directory id, URL or ``host:port``."""
        return _json(await call(store.get_master, master_id))

    # ------------------------------------------------------------------ jobs

    @app.post("/api/v1/jobs", response_model=JobView, status_code=201, responses=ERRORS)
    async def submit_job(spec: JobSubmit) -> Response:
        for si, stage in enumerate(spec.stages):
            for ti, task in enumerate(stage.tasks):
                if task.placement == "local":
                    # Local actions run on the submitting machine (`herder run`
                    # runs them itself); no agent may claim them.
                    raise InvalidRequest(
                        f"stages.{si}.tasks.{ti}.placement: 'local' tasks run on the submitting "
                        "client and cannot be queued on a farm; submit remote tasks only"
                    )
        job, created = await call(store.submit_job, spec)
        work_arrived()
        return _json(job, 201 if created else 200)

    @app.get("/api/v1/jobs", response_model=JobList, responses=ERRORS)
    async def list_jobs(
        state: Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]
        | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> Response:
        jobs = await call(store.list_jobs, state=state, limit=limit)
        return _json(JobList(jobs=jobs))

    @app.get("/api/v1/jobs/{job_id}", response_model=JobView, responses=ERRORS)
    async def get_job(job_id: int) -> Response:
        return _json(await call(store.get_job, job_id))

    @app.post("/api/v1/jobs/{job_id}/cancel", response_model=JobView, responses=ERRORS)
    async def cancel_job(job_id: int) -> Response:
        return _json(await call(store.cancel_job, job_id, "cancelled by user"))

    @app.get("/api/v1/jobs/{job_id}/events", response_model=EventList, responses=ERRORS)
    async def job_events(
        job_id: int,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> Response:
        events = await call(
            store.list_events, job_id=job_id, after_id=after, limit=limit, job_must_exist=True
        )
        return _json(EventList(events=events))

    @app.get("/api/v1/events", response_model=EventList, responses=ERRORS)
    async def list_events(
        job_id: int | None = None,
        task_id: int | None = None,
        after: Annotated[int, Query(ge=0, description="events with a larger id")] = 0,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> Response:
        """Every recorded transition (task, from, to, reason, attempt, agent, time), by id."""
        events = await call(
            store.list_events, job_id=job_id, task_id=task_id, after_id=after, limit=limit
        )
        return _json(EventList(events=events))

    @app.get("/api/v1/tasks/{task_id}", response_model=TaskView, responses=ERRORS)
    async def get_task(task_id: int) -> Response:
        return _json(await call(store.get_task, task_id))

    # -------------------------------------------------------------- attempts

    @app.get("/api/v1/attempts/{attempt_id}/log", response_model=LogView, responses=ERRORS)
    async def read_log(
        attempt_id: int,
        stream: Literal["stdout", "stderr"] = "stdout",
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=16 << 20)] = 1 << 20,
    ) -> Response:
        return _json(await call(store.read_log, attempt_id, stream, offset, limit))

    @app.post("/api/v1/attempts/{attempt_id}/ack", status_code=204, responses=ERRORS)
    async def ack(attempt_id: int, body: AckRequest) -> Response:
        await call(store.ack, attempt_id, body.token)
        return Response(status_code=204)

    @app.post("/api/v1/attempts/{attempt_id}/log", status_code=204, responses=ERRORS)
    async def append_log(attempt_id: int, body: LogAppend) -> Response:
        await call(store.append_log, attempt_id, body.token, body.chunks)
        return Response(status_code=204)

    @app.post(
        "/api/v1/attempts/{attempt_id}/complete", response_model=CompletionResult, responses=ERRORS
    )
    async def complete(attempt_id: int, body: Completion) -> Response:
        if body.attempt_id != attempt_id:
            raise InvalidRequest(
                f"attempt_id {body.attempt_id} in the body does not match {attempt_id} in the path"
            )
        result, woke = await call(store.complete, body)
        if woke:
            work_arrived()
        if result.result == "stale":
            return _error(
                409,
                "stale_attempt",
                f"attempt {attempt_id} is no longer current; discard its result",
                result.model_dump(mode="json"),
            )
        return _json(result)

    # ---------------------------------------------------------------- agents

    @app.post("/api/v1/agents", response_model=AgentView, status_code=201, responses=ERRORS)
    async def register_agent(body: AgentRegister) -> Response:
        agent, created = await call(store.register_agent, body)
        return _json(agent, 201 if created else 200)

    @app.get("/api/v1/agents", response_model=AgentList, responses=ERRORS)
    async def list_agents() -> Response:
        return _json(AgentList(agents=await call(store.list_agents)))

    @app.get("/api/v1/agents/{agent_id}", response_model=AgentView, responses=ERRORS)
    async def get_agent(agent_id: str) -> Response:
        return _json(await call(store.get_agent, agent_id))

    @app.post("/api/v1/agents/{agent_id}/claim", response_model=ClaimResponse, responses=ERRORS)
    async def claim(agent_id: str, body: ClaimRequest, request: Request) -> Response:
        deadline = time.monotonic() + body.wait_s
        outcome = await call(_claim_once, agent_id, body)
        if outcome.woke:
            work_arrived()
        results = outcome.results
        offers = outcome.offers
        # Long-poll: nothing to offer yet, so wait for a wake-up without
        # holding a thread; only a wake-up triggers another claim.
        waiting = not offers and body.max_tasks > 0 and body.wait_s > 0
        if waiting:
            parked[agent_id] = parked.get(agent_id, 0) + 1
        try:
            while not offers and body.max_tasks > 0 and not app.state.stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or await request.is_disconnected():
                    break
                if not await notifier.wait(remaining):
                    break
                # An agent that gave up on this poll (it closed the connection)
                # must not be offered anything here: the offer would wait for
                # its ack deadline.
                if await request.is_disconnected():
                    break
                outcome = await call(store.claim, agent_id, body.max_tasks, [], [])
                offers = outcome.offers
        finally:
            if waiting:
                left = parked.get(agent_id, 0) - 1
                if left > 0:
                    parked[agent_id] = left
                else:
                    parked.pop(agent_id, None)
        return _json(
            ClaimResponse(
                offers=offers, completions=results, lease_s=store.lease_s, drain=outcome.drain
            )
        )

    @app.post(
        "/api/v1/agents/{agent_id}/heartbeat", response_model=HeartbeatResponse, responses=ERRORS
    )
    async def heartbeat(agent_id: str, body: Heartbeat) -> Response:
        return _json(await call(store.heartbeat, agent_id, body))

    @app.post("/api/v1/agents/{agent_id}/drain", response_model=AgentView, responses=ERRORS)
    async def drain_agent(agent_id: str) -> Response:
        """No new offers for the agent; its heartbeats answer ``drain: true`` until undrained."""
        return _json(await call(store.set_drain, agent_id, True))

    @app.post("/api/v1/agents/{agent_id}/undrain", response_model=AgentView, responses=ERRORS)
    async def undrain_agent(agent_id: str) -> Response:
        view = await call(store.set_drain, agent_id, False)
        work_arrived()
        return _json(view)

    # ----------------------------------------------------------------- blobs

    @app.post("/api/v1/blobs/missing", response_model=BlobMissing, responses=ERRORS)
    async def missing_blobs(body: BlobQuery) -> Response:
        return _json(BlobMissing(missing=await call(store.missing_blobs, body.digests)))

    @app.put("/api/v1/blobs/{digest}", response_model=BlobStored, status_code=201, responses=ERRORS)
    async def put_blob(digest: DigestPath, request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_blob_bytes:
            return _error(413, "too_large", f"blob larger than {cfg.max_blob_bytes} bytes")
        data = await request.body()
        size, created = await call(store.put_blob, digest, data)
        stored = BlobStored(
            digest=digest, size=size, href=f"/api/v1/blobs/{digest}", created=created
        )
        return _json(stored, 201 if created else 200)

    @app.get(
        "/api/v1/blobs/{digest}",
        responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    )
    async def get_blob(digest: DigestPath) -> Response:
        data = await call(store.get_blob, digest)
        return Response(data, media_type="application/octet-stream")

    return app
