"""What the master's route modules share: the service, the stats, the config, helpers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from fastapi import FastAPI, Path, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, StringConstraints, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.routing import Route

from herder.api_limits import (
    INT64_MAX,
    MAX_BODY_BYTES,
    MAX_TASKS_PER_JOB,
    NUL_ESCAPE,
    SURROGATE_ESCAPE,
    nul_string,
    unencodable_string,
)
from herder.api_models import ErrorBody
from herder.core.rules import DEFAULT_MASTER_HEARTBEAT_S
from herder.errors import (
    CommitOutcomeUnknown,
    DatabaseBusy,
    DatabaseError,
    DatabaseUnavailable,
    HerderError,
)
from herder.master.admission import AdmissionQueue, current_ticket
from herder.master.deferrals import NoServiceBody
from herder.master.metrics import MasterStats
from herder.master.service import MasterService
from herder.master.wake import WakeConfig
from herder.store.tx import CallGuard, guarded_call

T = TypeVar("T")
#: A row id in a path or query: past the database's BIGINT it is a 422, never a 500.
IdPath = Annotated[int, Path(ge=0, le=INT64_MAX)]
IdQuery = Annotated[int | None, Query(ge=0, le=INT64_MAX)]
#: A name in a path (an agent id, a master id or URL): no control character,
#: which no store holds (PostgreSQL refuses NUL) and no id contains.
_NAME_MAX, _NAME_PATTERN = 2000, r"^[^\x00-\x1f\x7f]+$"
NamePath = Annotated[str, Path(max_length=_NAME_MAX, pattern=_NAME_PATTERN)]
#: An event id to read after.
AfterQuery = Annotated[int, Query(ge=0, le=INT64_MAX, description="events with a larger id")]
M = TypeVar("M", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
    413: {"model": ErrorBody, "description": "the request body is larger than the master takes"},
    421: {"model": NoServiceBody, "description": "no-service deferral: a read-only master"},
    422: {"model": ErrorBody},
    500: {"model": ErrorBody, "description": "a bug: see the master's log"},
    503: {
        "model": ErrorBody,
        "description": "busy deferral (admission queue full, database unavailable or busy)",
    },
    504: {"model": ErrorBody, "description": "the commit's outcome is unknown: retry"},
    507: {"model": ErrorBody, "description": "the database's disk is full"},
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
    # While claims or follows are parked, one cheap read this often looks for
    # claimable work that no local wake-up announced (queued through another
    # master) and wakes them; parked polls themselves cost nothing.
    recheck_interval_s: float = 1.0
    max_blob_bytes: int = 1 << 30
    # Bounds of what one request may carry (issue 11): a JSON body (413 past
    # it, enforced while reading, chunked bodies too) and a job's tasks (422).
    max_body_bytes: int = MAX_BODY_BYTES
    max_tasks_per_job: int = MAX_TASKS_PER_JOB
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
    # A store call that has not finished after this long is answered with a
    # busy deferral (DESIGN §7: "a write waits longer than a configured time
    # for the database"); the call itself finishes or fails in its thread.
    # This is what bounds a request when the database hangs (a partition
    # holds its connections open) instead of refusing.
    db_timeout_s: float = 30.0
    # The admission queue (herder.master.admission): store calls served at
    # once, calls that may wait before requests without priority are answered
    # busy, and how long a write may wait for a worker before it is.
    admission_workers: int = 32
    admission_depth: int = 512
    write_wait_s: float = 10.0
    # A read-only master (herder.master.readonly): read-write masters to send
    # its directory row through, besides those its replicated directory lists.
    register_via: list[str] = field(default_factory=list)
    # ... and the token it sends them (an admin's: `PUT /masters/{id}` is admin-only).
    register_token: str | None = None
    # Secure by default (issue 11, herder.master.auth): every request but the
    # public ones needs a token. False only by `--insecure-no-auth` or
    # HERDER_INSECURE_NO_AUTH=1 (the test suite sets it for tests not about auth).
    auth: bool = field(default_factory=lambda: not insecure_from_env())


def insecure_from_env() -> bool:
    """HERDER_INSECURE_NO_AUTH=1 (or true/yes): as `herder master --insecure-no-auth`."""
    return os.environ.get("HERDER_INSECURE_NO_AUTH", "").strip().lower() in ("1", "true", "yes")


@dataclass
class ApiContext:
    service: MasterService
    stats: MasterStats
    cfg: MasterConfig
    state: Any  # the app's state (stopping flag)
    # The admission queue the calls of requests wait in (None: background loops).
    gate: AdmissionQueue | None = None

    @property
    def store(self) -> Any:
        return self.service.store

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store or service call in the thread pool, within ``cfg.db_timeout_s``.

        Database failures (``herder.errors.DatabaseError``) are reported to
        ``stats.health`` and re-raised for the error handlers. A call that
        outlives the timeout is answered as busy and will not commit
        afterwards (``CallGuard``); one caught sending its COMMIT is waited
        for once more, then answered as of unknown outcome. With a ``gate``,
        the call first waits for a worker slot of the admission queue (and may
        be answered busy there: ``herder.master.admission.Busy``).
        """
        if self.gate is not None:
            async with self.gate.slot(current_ticket.get()):
                return await self._call(fn, *args, **kwargs)
        return await self._call(fn, *args, **kwargs)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = _GuardedCall(functools.partial(fn, *args, **kwargs))
        started = time.monotonic()
        timeout = self.cfg.db_timeout_s
        try:
            with anyio.move_on_after(timeout) as scope:
                result: T = await anyio.to_thread.run_sync(call.run, abandon_on_cancel=True)
            if scope.cancelled_caught:
                loop = asyncio.get_running_loop()
                if call.guard.abandon():
                    call.outcome(loop).add_done_callback(
                        functools.partial(self._abandoned_outcome, started)
                    )
                    raise self._timed_out(timeout)
                try:  # sending its COMMIT: the outcome is worth waiting for
                    value, error = await asyncio.wait_for(call.outcome(loop), timeout)
                except TimeoutError:
                    raise CommitOutcomeUnknown(
                        "the database did not confirm the commit within "
                        f"{2 * timeout:g} s: the request may or may not have taken effect"
                    ) from None
                if error is not None:
                    raise error
                result = value
        except DatabaseError as exc:
            self.stats.health.failed(exc, started)
            raise
        self.stats.health.succeeded(wrote=call.guard.commits > 0)
        return result

    def _timed_out(self, timeout: float) -> DatabaseError:
        health = self.stats.health
        if health.problem == "unavailable":  # an outage already seen: say so
            return DatabaseUnavailable(
                f"database unavailable: no answer within {timeout:g} s ({health.message})"
            )
        return DatabaseBusy(f"database busy: no answer within {timeout:g} s")

    def _abandoned_outcome(
        self, started: float, fut: asyncio.Future[tuple[Any, BaseException | None]]
    ) -> None:
        """A call answered as busy finished later: its failure still tells the health."""
        _, error = fut.result()
        if isinstance(error, DatabaseError):
            self.stats.health.failed(error, started)
        elif error is None:
            self.stats.health.succeeded(wrote=False)


class _GuardedCall:
    """One store call in a worker thread, whose outcome a caller that stopped
    waiting can still collect (``outcome``)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.guard = CallGuard()
        self._lock = threading.Lock()
        self._outcome: tuple[Any, BaseException | None] | None = None
        self._waiter: asyncio.Future[tuple[Any, BaseException | None]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> Any:  # in the worker thread
        if self.guard.abandoned:  # it never got a thread in time: the caller is gone
            exc = DatabaseBusy("database busy: the request was given up before it started")
            self._settle((None, exc))
            raise exc
        try:
            with guarded_call(self.guard):
                value = self.fn()
        except BaseException as exc:
            self._settle((None, exc))
            raise
        self._settle((value, None))
        return value

    def _settle(self, outcome: tuple[Any, BaseException | None]) -> None:
        with self._lock:
            self._outcome = outcome
            waiter, loop = self._waiter, self._loop
        if waiter is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(_resolve, waiter, outcome)

    def outcome(
        self, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[tuple[Any, BaseException | None]]:
        """A future of ``(value, exception)``, resolved when the call ends (on ``loop``)."""
        fut: asyncio.Future[tuple[Any, BaseException | None]] = loop.create_future()
        with self._lock:
            if self._outcome is None:
                self._waiter, self._loop = fut, loop
                return fut
            outcome = self._outcome
        fut.set_result(outcome)
        return fut


def _resolve(fut: asyncio.Future[Any], outcome: Any) -> None:
    if not fut.done():
        fut.set_result(outcome)


def json_response(model: BaseModel, status: int = 200) -> Response:
    # Serialize with pydantic directly: FastAPI's response_model round-trip
    # would validate the object a second time on the hot path.
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def error_response(
    status: int,
    code: str,
    message: str,
    detail: object = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def database_error_response(exc: DatabaseError, **extra: Any) -> JSONResponse:
    """A database failure as the API answers it: a busy deferral (503), 507 or 504,
    with ``Retry-After`` (DESIGN §7); ``extra`` fields join the body."""
    body: dict[str, Any] = {"error": exc.code, "message": exc.message, **extra}
    if exc.detail is not None:
        body["detail"] = exc.detail
    return JSONResponse(
        body,
        status_code=exc.status,
        headers={"Retry-After": str(max(1, round(exc.retry_after)))},
    )


class BodyError(HerderError):
    """A request body that is not valid JSON (400) or not a valid model (422)."""

    def __init__(self, status: int, code: str, message: str, detail: object = None) -> None:
        super().__init__(message, detail=detail)
        self.status = status
        self.code = code


def validation_error(errors: Iterable[Any], loc_prefix: tuple[str, ...] = ()) -> BodyError:
    """Pydantic's (or FastAPI's) validation errors as the API's error: 400
    ``malformed_json`` for a body that is not JSON, else 422 ``invalid_request``
    naming the first bad field."""
    detail = [
        {
            "loc": [str(p) for p in (*loc_prefix, *e.get("loc", ()))],
            "message": str(e.get("msg", "")).removeprefix("Value error, "),  # pydantic's prefix
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]
    if any(d["type"] == "json_invalid" for d in detail):
        return BodyError(400, "malformed_json", "the request body is not valid JSON", detail)
    first = detail[0] if detail else {"loc": [], "message": "invalid"}
    where = ".".join(p for p in first["loc"] if p != "body") or "request"
    return BodyError(422, "invalid_request", f"{where}: {first['message']}", detail)


#: NamePath's check, for the routes that skip FastAPI (:func:`fast_route`).
_NAME_PARAM: TypeAdapter[str] = TypeAdapter(
    Annotated[str, StringConstraints(max_length=_NAME_MAX, pattern=_NAME_PATTERN)]
)


def fast_route(
    app: FastAPI, path: str, endpoint: Callable[[str, Request], Awaitable[Response]]
) -> None:
    """Serve ``POST path`` (one ``{agent_id}``-like name parameter) by a plain Starlette
    route ahead of every FastAPI route: the agent cycle's hot requests skip FastAPI's
    route scan, dependency solving and request handler (DESIGN §10).

    The FastAPI route of the same path stays registered, for the OpenAPI document;
    this one answers first and does what FastAPI would: the authorization dependency
    every route runs, then the :data:`NamePath` check (the same 422).
    """
    (param,) = re.findall(r"{(\w+)}", path)
    route: Route

    async def handle(request: Request) -> Response:
        request.scope["route"] = route  # the authorizer's rule is looked up by its path
        await request.app.state.authorizer.dependency(request)  # first, as FastAPI does
        try:
            value = _NAME_PARAM.validate_python(request.path_params[param])
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False), ("path", param)) from None
        return await endpoint(value, request)

    route = Route(path, handle, methods=["POST"], include_in_schema=False)
    app.router.routes.insert(0, route)


async def parse_body(request: Request, model: type[M]) -> M:
    """Validate a JSON body straight from its bytes (the hot routes skip FastAPI's body
    machinery); errors have the same shape as FastAPI's validation errors."""
    raw = await request.body()
    try:
        parsed = model.model_validate_json(raw)
    except ValidationError as exc:
        if SURROGATE_ESCAPE.search(raw):  # a lone high surrogate is a JSON error to pydantic
            _refuse_unencodable(raw)
        errors = exc.errors(include_url=False, include_input=False)
        raise validation_error(errors, ("body",)) from None
    if SURROGATE_ESCAPE.search(raw):
        _refuse_unencodable(raw)
    if NUL_ESCAPE in raw:  # after validation: program output has had its NULs replaced
        loc = nul_string(parsed.model_dump())
        if loc is not None:
            error = {"loc": ("body", *loc), "msg": "contains a NUL character", "type": "string_nul"}
            raise validation_error([error])
    return parsed


def _refuse_unencodable(raw: bytes) -> None:
    """422 for a body with a string UTF-8 cannot encode (a lone surrogate escape):
    it could be stored, but never be answered again (every later read a 500)."""
    try:
        loc = unencodable_string(json.loads(raw))
    except ValueError:  # not JSON at all: the caller's validation error says so
        return
    if loc is not None:
        error = {"loc": ("body", *loc), "msg": "not valid Unicode (a lone surrogate)"}
        raise validation_error([{**error, "type": "string_unicode"}])


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that parses its body itself (see ``herder.master.app``)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }
