"""Deferral answers of a master (seeds/004, DESIGN §7): busy, no-service, continuation.

A master never keeps state for a deferred client: every answer carries the
alternates that fit the request, taken from an in-memory copy of the master
directory (:class:`DirectoryCache`, refreshed in the background, so a busy
master answers busy without a database round trip) and permuted afresh for
each answer, so that deferred clients spread over the alternates.

Wire format: docs/protocol-deferrals.md (busy 503 with ``Retry-After``,
no-service 421, continuation 2xx with ``Herder-Continuation: 1``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from herder.api_inputs import JobHeld

log = logging.getLogger("herder.master")

PRIORITY_HEADER = "Herder-Priority"
CONTINUATION_HEADER = "Herder-Continuation"
# A long read handed to a read-only master carries this, so the master that
# finally serves it serves it instead of handing it off again.
HANDOFF_PARAM = "handoff"

Role = Literal["read-write", "read-only"]


class QueuedWork(BaseModel):
    requests: int = Field(description="requests waiting for a worker or being served")
    estimate_s: float = Field(description="estimated seconds until the queue has drained")


class BusyBody(BaseModel):
    """A busy deferral (503): try an alternate, or come back with ``Herder-Priority: 1``."""

    error: Literal["busy"] = "busy"
    message: str
    alternates: list[str]
    queued: QueuedWork


class NoServiceBody(BaseModel):
    """A no-service deferral (421): this master cannot serve the request; the alternates can."""

    error: Literal["no_service"] = "no_service"
    message: str
    alternates: list[str]


class NextRequest(BaseModel):
    method: str
    path: str = Field(description="absolute (/api/v1/...) or relative to /api/v1")
    body: Any = Field(None, description="its JSON body; null for a blob PUT: the client's bytes")
    params: dict[str, str] | None = None


class ContinuationBody(BaseModel):
    """A continuation (2xx, ``Herder-Continuation: 1``): the first transaction is done;
    send ``next`` (idempotent), to an alternate preferably."""

    continuation: NextRequest
    alternates: list[str] = Field(
        description="every master that may serve the next request, this one included if it can"
    )
    result: Any = None


#: OpenAPI entries of the deferrals, for a route's ``responses``.
DEFERRALS: dict[int | str, dict[str, Any]] = {
    421: {"model": NoServiceBody, "description": "no-service deferral (a read-only master)"},
}


@dataclass(frozen=True)
class Peer:
    url: str
    role: Role


class DirectoryCache:
    """The masters that are up, as last read from the directory; thread-safe.

    ``self_url`` (this master's advertised URL) is never handed out.
    """

    def __init__(self, self_url: str, rng: random.Random | None = None) -> None:
        self.self_url = self_url.rstrip("/")
        self._peers: tuple[Peer, ...] = ()
        self._lock = threading.Lock()
        self._rng = rng or random.Random()

    def update(self, peers: Sequence[Peer]) -> None:
        mine = self.self_url
        kept = tuple(p for p in peers if p.url.rstrip("/") != mine)
        with self._lock:
            self._peers = kept

    def update_from_views(self, views: Sequence[Any]) -> None:
        """From ``MasterView`` rows (``url``, ``role``, ``state``, ``down_reason``): those
        that heartbeat, including those reported failed since (a master answering busy
        is reported by the agents it deferred, DESIGN §6, and is still the one to
        send a write to: the client finds out for itself)."""
        self.update(
            [
                Peer(v.url.rstrip("/"), v.role)
                for v in views
                if v.state == "up" or v.down_reason == "failure_reported"
            ]
        )

    @property
    def peers(self) -> tuple[Peer, ...]:
        with self._lock:
            return self._peers

    def urls(self, role: Role | None = None) -> list[str]:
        return [p.url for p in self.peers if role is None or p.role == role]

    def alternates(self, *, write: bool) -> list[str]:
        """Masters that can serve the request, a fresh permutation each call (seeds/004):
        read-write masters for a write, every master for a read."""
        out = self.urls("read-write") if write else self.urls()
        with self._lock:  # random.Random is not documented thread-safe
            self._rng.shuffle(out)
        return out

    def writers(self) -> list[str]:
        """Read-write masters, this one included, permuted: where uploads may go
        (a read-only master runs on a hot standby, which stores nothing)."""
        out = [*self.urls("read-write"), self.self_url]
        with self._lock:
            self._rng.shuffle(out)
        return out

    def readers(self) -> list[str]:
        """Read-only masters, permuted: where a read-write master hands long reads."""
        out = self.urls("read-only")
        with self._lock:
            self._rng.shuffle(out)
        return out


def busy_response(
    message: str, alternates: list[str], requests: int, estimate_s: float
) -> JSONResponse:
    body = BusyBody(
        message=message,
        alternates=alternates,
        queued=QueuedWork(requests=requests, estimate_s=round(estimate_s, 3)),
    )
    return JSONResponse(
        body.model_dump(),
        status_code=503,
        headers={"Retry-After": str(max(1, math.ceil(estimate_s)))},
    )


def no_service_response(message: str, alternates: list[str]) -> JSONResponse:
    body = NoServiceBody(message=message, alternates=alternates)
    return JSONResponse(body.model_dump(), status_code=421)


def continuation_response(
    next_request: NextRequest, alternates: list[str], result: Any = None, status: int = 200
) -> JSONResponse:
    body = ContinuationBody(continuation=next_request, alternates=alternates, result=result)
    return JSONResponse(
        body.model_dump(mode="json"), status_code=status, headers={CONTINUATION_HEADER: "1"}
    )


class UploadContinuation(ContinuationBody):
    """The answer to ``POST /jobs?inputs=later`` when inputs are missing (issue 10): the
    job is created and waits; ``continuation`` is the upload of the first missing blob,
    ``result.missing`` names them all, ``alternates`` the read-write masters."""

    message: str
    result: JobHeld


def upload_continuation(state: Any, held: JobHeld, status: int) -> JSONResponse:
    """The continuation of a submission held for its inputs: upload ``held.missing``."""
    directory: DirectoryCache | None = getattr(state, "directory", None)
    alternates = directory.writers() if directory is not None else []
    first = held.missing[0]
    body = UploadContinuation(
        continuation=NextRequest(method="PUT", path=f"/api/v1/blobs/{first}", body=None),
        alternates=alternates,
        result=held,
        message=f"job {held.id} waits for {len(held.missing)} inputs: upload each "
        "(PUT /api/v1/blobs/{digest}) to a read-write master; a read-only master "
        "runs on a hot standby and stores nothing",
    )
    return JSONResponse(
        body.model_dump(mode="json"), status_code=status, headers={CONTINUATION_HEADER: "1"}
    )


def handoff(state: Any, request: Any) -> JSONResponse | None:
    """A long read (a blob, a big log window) handed to a read-only master with a
    continuation, when this read-write master knows any that is up; else None.

    The next request is the same one with ``handoff=0``: whoever gets it serves it.
    This master is named last among the alternates (the client sends the next
    request only to masters a continuation names), so the read survives every
    read-only master being gone.
    """
    directory: DirectoryCache | None = getattr(state, "directory", None)
    if directory is None or getattr(state, "role", "read-write") != "read-write":
        return None
    readers = directory.readers()
    if not readers:
        return None
    params = {k: v for k, v in request.query_params.items() if k != HANDOFF_PARAM}
    params[HANDOFF_PARAM] = "0"
    nxt = NextRequest(method=request.method, path=request.url.path, body=None, params=params)
    return continuation_response(nxt, [*readers, directory.self_url])


async def refresh_forever(
    directory: DirectoryCache,
    read: Callable[[], Awaitable[Sequence[Any]]],
    interval_s: float,
) -> None:
    """Keep ``directory`` fresh: one directory read every ``interval_s``."""
    failing = False
    while True:
        try:
            directory.update_from_views(await read())
            if failing:
                log.info("event=directory_refresh_ok")
            failing = False
        except Exception as exc:  # the database may be away: keep the last copy
            if not failing:
                log.warning("event=directory_refresh_failed error=%r", exc)
            failing = True
        await asyncio.sleep(interval_s)
