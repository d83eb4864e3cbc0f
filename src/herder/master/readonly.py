"""Read-only masters (``herder master --read-only``, DESIGN §6, §7).

A read-only master runs against a PostgreSQL hot standby fed by streaming
replication. It serves reads (jobs, tasks, events, logs, blob downloads, the
directory) and answers every write with a no-service deferral (421) naming
the read-write masters. It writes nothing into its database, which a
standby refuses anyway:

- its store is opened without migrating, and must already be at the schema
  revision this version needs (``open_read_only_store``); on PostgreSQL its
  sessions are ``default_transaction_read_only``, so no bug can write even
  when it is pointed at a primary;
- no start-up recovery, no maintenance, no heartbeat of its own;
- its place in the master directory comes through a read-write master: every
  heartbeat interval it sends its row to one of them (``PUT
  /api/v1/masters/{id}``), found in the directory it reads from its replica
  (or given with ``--register-via``). The row replicates back to every
  standby, so every master lists it.

A resource a read-only master does not find may only be missing from its
replica for now (replication lag): such a 404 is answered as no-service with
the read-write masters as alternates, which answer with authority.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from herder.api_limits import INT64_MAX
from herder.api_models import MasterView
from herder.errors import InvalidRequest
from herder.master.context import ERRORS, ApiContext, NamePath, body_doc, json_response, parse_body
from herder.master.deferrals import DirectoryCache, no_service_response
from herder.store import Store
from herder.store.common import MasterStatus
from herder.store.engine import HEAD_REVISION, current_revision

log = logging.getLogger("herder.master")

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MASTER_ID_MAX = 200  # the directory's id column
WRITE_REFUSED = "read-only master: writes go to a read-write master"
NOT_REPLICATED = (
    "not found on this read-only master (its replica may be behind): ask a read-write master"
)


class ReadOnlyStoreError(RuntimeError):
    """The database cannot serve a read-only master (its schema is not this version's)."""


def read_only_url(db_url: str) -> str:
    """``db_url`` with PostgreSQL sessions read-only by default (a guard, not the mechanism)."""
    from sqlalchemy.engine import make_url

    u = make_url(db_url)
    if u.get_backend_name() != "postgresql" or "options" in u.query:
        return db_url
    u = u.update_query_dict({"options": "-c default_transaction_read_only=on"})
    return u.render_as_string(hide_password=False)


def open_read_only_store(db_url: str, **kwargs: Any) -> Store:
    """Open the store without migrating; it must be at this version's schema revision."""
    store = Store.open(read_only_url(db_url), migrate=False, **kwargs)
    try:
        with store.engine.connect() as conn, conn.begin():
            revision = current_revision(conn)
    except Exception as exc:
        store.close()
        err = getattr(exc, "message", None) or str(exc)
        raise ReadOnlyStoreError(f"cannot read the database: {err}") from exc
    if revision != HEAD_REVISION:
        store.close()
        raise ReadOnlyStoreError(
            f"the database is at schema revision {revision or 'none'}, this master needs "
            f"{HEAD_REVISION}: start (or upgrade) a read-write master on the primary first"
        )
    return store


class ReadOnlyMiddleware:
    """Writes answered with no-service; a 404 with no-service when a read-write master
    can give the authoritative answer."""

    def __init__(self, app: ASGIApp, directory: DirectoryCache) -> None:
        self.app = app
        self.directory = directory

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in _READ_METHODS:
            alternates = self.directory.alternates(write=True)
            await no_service_response(WRITE_REFUSED, alternates)(scope, receive, send)
            return
        replaced = False

        async def send_404_elsewhere(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the body of the 404 that was replaced
            if message["type"] == "http.response.start" and message["status"] == 404:
                alternates = self.directory.alternates(write=True)
                if alternates:
                    replaced = True
                    await no_service_response(NOT_REPLICATED, alternates)(scope, receive, send)
                    return
            await send(message)

        await self.app(scope, receive, send_404_elsewhere)


class MasterRegistration(BaseModel):
    """A read-only master's directory row, sent through a read-write master's API."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[
        str, Field(min_length=1, max_length=2000, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")
    ]
    role: Literal["read-only"] = "read-only"
    heartbeat_timeout_s: Annotated[float, Field(gt=0, le=86_400)]
    # Counters as the database stores them (BIGINT): bounded, never a 500.
    requests: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0
    unhandled_exceptions: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0
    avg_request_ms: Annotated[float, Field(ge=0, le=1e12)] = 0.0
    in_flight: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    version: Annotated[str | None, Field(max_length=100, pattern=r"^[^\x00-\x1f\x7f]*$")] = None
    starting: bool = Field(False, description="it has just started (resets started_at)")
    state: Literal["up", "stopped"] = "up"


def register_routes(app: FastAPI, ctx: ApiContext) -> None:
    store = ctx.service.store

    @app.put(
        "/api/v1/masters/{master_id:path}",
        response_model=MasterView,
        responses={
            **ERRORS,
            409: {"description": "the directory holds a master of another role under this id"},
        },
        openapi_extra=body_doc(MasterRegistration),
    )
    async def register_master(master_id: NamePath, request: Request) -> Response:
        """A read-only master's heartbeat, relayed into the directory (it cannot write
        its own: its database is a standby). Only ``read-only`` rows are written this
        way: 409 for an id held by a read-write master."""
        body = await parse_body(request, MasterRegistration)
        if len(master_id) > MASTER_ID_MAX:
            raise InvalidRequest(f"master id is longer than {MASTER_ID_MAX} characters")
        status = MasterStatus(
            id=master_id,
            url=body.url.rstrip("/"),
            role=body.role,
            heartbeat_timeout_s=body.heartbeat_timeout_s,
            requests=body.requests,
            unhandled_exceptions=body.unhandled_exceptions,
            avg_request_ms=body.avg_request_ms,
            in_flight=body.in_flight,
            version=body.version,
        )
        await ctx.call(
            store.master_heartbeat,
            status,
            starting=body.starting,
            state=body.state,
            same_role=True,
        )
        return json_response(await ctx.call(store.get_master, master_id))


class Registrar:
    """Sends this read-only master's directory row through a read-write master."""

    def __init__(
        self,
        status: Callable[[], MasterStatus],
        directory: DirectoryCache,
        register_via: list[str],
        token: str | None = None,
    ) -> None:
        self.status = status
        self.directory = directory
        self.register_via = [u.rstrip("/") for u in register_via]
        headers = {"Herder-Priority": "1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.AsyncClient(timeout=5.0, trust_env=False, headers=headers)
        self._failing = False

    def targets(self) -> list[str]:
        out = list(self.register_via)
        out += [u for u in self.directory.alternates(write=True) if u not in out]
        return out

    async def send(self, *, starting: bool = False, state: str = "up") -> bool:
        st = self.status()
        body = MasterRegistration(
            url=st.url,
            heartbeat_timeout_s=st.heartbeat_timeout_s,
            requests=st.requests,
            unhandled_exceptions=st.unhandled_exceptions,
            avg_request_ms=st.avg_request_ms,
            in_flight=st.in_flight,
            version=st.version,
            starting=starting,
            state=state,  # type: ignore[arg-type]
        ).model_dump(mode="json")
        problems: list[str] = []
        for url in self.targets():
            try:
                # The id is one path segment on the read-write side ({master_id:path}).
                r = await self._http.put(
                    f"{url}/api/v1/masters/{quote(st.id, safe=':')}",
                    json=body,
                )
            except httpx.HTTPError as exc:
                problems.append(f"{url}: {type(exc).__name__}")
                continue
            if r.status_code == 200:
                if self._failing:
                    log.info("event=readonly_registered via=%s", url)
                self._failing = False
                return True
            problems.append(f"{url}: HTTP {r.status_code}")
        if not self._failing:
            log.warning(
                "event=readonly_registration_failed tried=%s",
                "; ".join(problems) or "no read-write master known",
            )
        self._failing = True
        return False

    async def run(self, interval_s: float) -> None:
        starting = True
        while True:
            if await self.send(starting=starting):
                starting = False
            # Until the first success, retry soon: the directory may just have been read.
            await asyncio.sleep(interval_s if not starting else min(interval_s, 0.5))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send(state="stopped"), 5.0)
        await self._http.aclose()
