"""The master's HTTP API: translates HTTP to service and store calls (DESIGN §4).

Handlers hold no thread while a claim or a follow long-polls: store calls run
in the thread pool, waiting happens on a :class:`herder.master.notify.Signal`.
The routes live in ``api_jobs``, ``api_agents`` and ``api_masters``; what
the master does beyond the store's transactions is ``MasterService``, which
the embedded farm of ``herder run`` runs too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route

from herder import __version__
from herder.api_acl import PoolAclSet
from herder.api_models import (
    AckRequest,
    AgentRegister,
    BlobQuery,
    ClaimRequest,
    Completion,
    ErrorBody,
    Heartbeat,
    JobSubmit,
    LogAppend,
    LogView,
    MasterFailureReport,
)
from herder.core.rules import master_timeout_s
from herder.errors import DatabaseError, HerderError
from herder.master import api_agents, api_jobs, api_masters, api_pools, api_sched, auth, readonly
from herder.master.admission import (
    AdmissionConfig,
    AdmissionMiddleware,
    AdmissionQueue,
    Busy,
    busy_handler,
)
from herder.master.cancels import CancelSender
from herder.master.context import (
    ApiContext,
    MasterConfig,
    database_error_response,
    default_master_id,
    error_response,
    validation_error,
)
from herder.master.dbhealth import DRIVER_ERRORS, LoopFailures
from herder.master.deferrals import BusyBody, ContinuationBody, DirectoryCache, refresh_forever
from herder.master.limits import BodyLimitMiddleware
from herder.master.metrics import MasterStats, StatsMiddleware
from herder.master.service import MasterService
from herder.master.wake import Waker
from herder.store import Store, dberrors
from herder.store.store import MasterStatus

log = logging.getLogger("herder.master")

# /healthz waits this long for its database round trip.
HEALTH_PROBE_S = 3.0

# Bodies the hot routes parse themselves: added to the OpenAPI components.
_SELF_PARSED = (
    AckRequest,
    AgentRegister,
    BlobQuery,
    ClaimRequest,
    Completion,
    Heartbeat,
    JobSubmit,
    LogAppend,
    MasterFailureReport,
    readonly.MasterRegistration,
    ContinuationBody,  # deferral bodies (herder.master.deferrals)
    BusyBody,
    LogView,  # GET /attempts/{id}/log: a LogView or a continuation
    PoolAclSet,
)

__all__ = ["MasterConfig", "create_app", "default_master_id"]


def create_app(store: Store, config: MasterConfig | None = None) -> FastAPI:
    cfg = config or MasterConfig()
    url = cfg.url or f"http://{socket.gethostname()}:6240"
    stats = MasterStats(master_id=cfg.master_id, url=url)
    read_only = cfg.role == "read-only"
    # Alternates of deferrals (herder.master.deferrals), and the admission queue.
    directory = DirectoryCache(url)
    admission = AdmissionQueue(
        AdmissionConfig(cfg.admission_workers, cfg.admission_depth, cfg.write_wait_s)
    )
    waker: Waker | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def _poke() -> None:
        # Work arrives in worker threads; the waker lives on the event loop.
        if waker is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(waker.poke)
            except RuntimeError:  # the loop is closed: shutting down
                pass

    canceller = CancelSender()  # talkback cancels of a stopped job's attempts
    service = MasterService(
        store,
        recheck_interval_s=cfg.recheck_interval_s,
        on_work=_poke,
        on_cancel=canceller.submit,
    )
    call = ApiContext(service, stats, cfg, None).call
    # Rounds of the background loops: one line per distinct failure, not one per round.
    rounds = LoopFailures(log)

    async def _wake_targets(limit: int, exclude: Any) -> Any:
        return await call(store.wake_targets, limit, exclude)

    async def _has_work() -> bool:
        return await call(store.has_claimable_work)

    waker = Waker(cfg.wake, stats, _wake_targets, _has_work, lambda: list(service.parked))

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

    async def reaper() -> None:
        holding = False
        while True:
            await asyncio.sleep(cfg.reap_interval_s)
            try:
                # Reaps only while holding the maintenance lock (taken or
                # renewed in the reap's own transaction).
                n = await call(service.maintain, cfg.master_id, cfg.maintenance_ttl_s)
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
                pruned = store.pruned_total
                stats.pruned_jobs, stats.pruned_blobs = pruned.jobs, pruned.blobs
                stats.pruned_bytes = pruned.bytes
                rounds.ok("reap")
            except Exception as exc:  # keep reaping whatever one round did
                rounds.failed("reap", exc, stats)

    async def directory_heartbeat() -> None:
        while True:
            await asyncio.sleep(cfg.heartbeat_interval_s)
            try:
                await call(_directory_write)
                rounds.ok("master_heartbeat")
            except Exception as exc:  # the database may be away; the next beat tries again
                rounds.failed("master_heartbeat", exc, stats)

    async def ticker() -> None:
        # Work or results that no local wake-up announced (written through
        # another master, or by an agent in autonomous mode).
        while True:
            await asyncio.sleep(cfg.recheck_interval_s)
            if service.changed.waiters:
                service.changed.notify()
            if not service.work.waiters:
                continue
            try:
                if await call(store.has_claimable_work):
                    service.work.notify()
                rounds.ok("recheck")
            except Exception as exc:
                rounds.failed("recheck", exc, stats)

    async def _recover_on_start() -> int:
        # A database away at start is waited for (one line), not a crash: the
        # master serves nothing until it has recovered, clients go elsewhere.
        delay = 0.5
        while True:
            try:
                return await call(store.reap)
            except DatabaseError as exc:
                rounds.failed("startup_recovery", exc, stats)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _read_directory() -> Any:
        return await call(store.list_masters, True)

    registrar = (
        readonly.Registrar(_status, directory, cfg.register_via, cfg.register_token)
        if read_only
        else None
    )

    async def _stop_loops(tasks: list[asyncio.Task[Any]]) -> None:
        """The lifespan's loops, then what they drive (talkback senders, the service)."""
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert waker is not None
        await waker.close()
        await canceller.close()
        service.close()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal loop
        loop = asyncio.get_running_loop()
        canceller.bind(loop)
        if registrar is not None:
            # A read-only master writes nothing: no recovery, no maintenance, and
            # its directory row goes through a read-write master (herder.master.readonly).
            with contextlib.suppress(Exception):
                directory.update_from_views(await _read_directory())
            log.info(
                "event=master_started read_only=1 dialect=%s master=%s",
                store.dialect,
                cfg.master_id,
            )
            await registrar.send(starting=True)
            tasks = [
                asyncio.create_task(ticker()),
                asyncio.create_task(registrar.run(cfg.heartbeat_interval_s)),
                asyncio.create_task(
                    refresh_forever(directory, _read_directory, cfg.heartbeat_interval_s)
                ),
            ]
            try:
                yield
            finally:
                await _stop_loops(tasks)
                await registrar.close()
            return
        # Recovery on start (seeds/002): requeue unacknowledged offers and
        # expired leases before serving any claim (uvicorn accepts no request
        # before the lifespan's startup is done). This reap does not wait for
        # the maintenance lock: every requeue is a compare-and-set, so it is
        # safe next to another master's reaper, and the start-up must not wait
        # for a dead master's lock to time out.
        requeued = await _recover_on_start()
        log.info(
            "event=master_started requeued=%d dialect=%s master=%s",
            requeued,
            store.dialect,
            cfg.master_id,
        )
        try:  # listed in the directory before the first request is served
            await call(_directory_write, True)
        except Exception as exc:
            rounds.failed("master_heartbeat", exc, stats)
        log.info("event=master_directory master=%s url=%s role=%s", cfg.master_id, url, cfg.role)
        tasks = [
            asyncio.create_task(reaper()),
            asyncio.create_task(ticker()),
            asyncio.create_task(directory_heartbeat()),
            asyncio.create_task(
                refresh_forever(directory, _read_directory, cfg.heartbeat_interval_s)
            ),
        ]
        try:
            yield
        finally:
            await _stop_loops(tasks)
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
    app.state.service = service
    app.state.stats = stats
    app.state.notifier = service.work
    app.state.waker = waker
    # Set on SIGTERM so long-polls answer at once and shutdown is not held up.
    app.state.stopping = False
    app.state.maintenance = False
    app.state.master_id = cfg.master_id
    app.state.url = url
    app.state.role = cfg.role
    app.state.directory = directory
    app.state.admission = admission
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=cfg.max_body_bytes,
        max_blob_bytes=cfg.max_blob_bytes,
    )
    # Outside the body limit: a busy master defers before it reads a body; a
    # read-only master refuses writes before they queue.
    app.add_middleware(AdmissionMiddleware, queue=admission, directory=directory)
    if read_only:
        app.add_middleware(readonly.ReadOnlyMiddleware, directory=directory)
    # Counting is the outermost layer: the 500 of an unhandled exception is
    # sent by Starlette's ServerErrorMiddleware, outside every added middleware.
    build_stack = app.build_middleware_stack
    app.build_middleware_stack = lambda: StatsMiddleware(build_stack(), stats)  # type: ignore[method-assign]
    ctx = ApiContext(service, stats, cfg, app.state, admission)
    app.add_exception_handler(Busy, busy_handler(directory))

    # ---------------------------------------------------------------- errors

    @app.exception_handler(HerderError)
    async def _herder_error(request: Request, exc: HerderError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.detail)

    @app.exception_handler(DatabaseError)
    async def _database_error(request: Request, exc: DatabaseError) -> JSONResponse:
        # Logged once per outage by the health tracker (ApiContext.call), not per request.
        if exc.status == 503:  # a busy deferral: with alternates, like the admission's
            write = request.method not in ("GET", "HEAD", "OPTIONS")
            return database_error_response(exc, alternates=directory.alternates(write=write))
        return database_error_response(exc)

    async def _driver_error(request: Request, exc: Exception) -> JSONResponse:
        # A database failure raised past the store (which classifies its own):
        # answered the same way, never as a 500 with a traceback.
        err = dberrors.herder_error(exc)
        if err is None:  # not a database failure but a bug: the unhandled path, traceback
            raise exc
        stats.health.failed(err)
        return database_error_response(err)

    for driver_error in DRIVER_ERRORS:
        app.add_exception_handler(driver_error, _driver_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc.errors())
        return error_response(err.status, err.code, err.message, jsonable_encoder(err.detail))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:  # Starlette names the first route's methods only
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            headers=headers,
        )

    def _allowed_methods(request: Request) -> str:
        methods: set[str] = set()
        for route in app.router.routes:
            if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
                methods.update(route.methods or ())
        return ", ".join(sorted(methods))

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
        return error_response(500, "internal", "internal error; see the master's log")

    # ---------------------------------------------------------------- routes

    @app.get("/healthz", responses={503: {"model": ErrorBody}})
    async def healthz() -> JSONResponse:
        """Liveness with the database: 200 when a database round trip works (``"database":
        "up"``, or ``"full"`` while writes fail for lack of space), else a busy deferral
        (503) that says why (``"database": "down"``)."""
        probe = ApiContext(service, stats, replace(cfg, db_timeout_s=HEALTH_PROBE_S), None)
        try:
            await probe.call(store.db_now)
        except DatabaseError as exc:
            return database_error_response(exc, database="down")
        health = stats.health
        if health.problem == "full":  # reads work, writes fail until space is freed
            return JSONResponse(
                {"status": "degraded", "database": "full", "message": health.message}
            )
        return JSONResponse({"status": "ok", "database": "up", "version": __version__})

    # Before the routes: its dependency joins every route registered after it.
    auth.install(app, ctx, cfg.auth)
    api_masters.register(app, ctx)
    api_jobs.register(app, ctx)
    api_agents.register(app, ctx)
    api_sched.register(app, ctx)
    api_pools.register(app, ctx)
    readonly.register_routes(app, ctx)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _, defs = models_json_schema(
                [(m, "validation") for m in _SELF_PARSED],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, body in defs.get("$defs", {}).items():
                components.setdefault(name, body)
            auth.document(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
