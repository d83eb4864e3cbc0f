"""The admission queue of a master (DESIGN §7): busy detection, priority, FIFO.

Every store call a request makes (``ApiContext.call``) needs one of
``workers`` slots: a worker thread with a database connection. A call that
finds them all taken waits in one FIFO queue. The master is *busy* when that
queue is ``depth`` long, or when a write has waited ``write_wait_s`` for its
slot; a request without ``Herder-Priority: 1`` is then deferred (503 busy,
with alternates and the queued work: :mod:`herder.master.deferrals`). A
request with the flag is never deferred: it waits its turn in the same queue,
in arrival order (seeds/004).

A request is deferred only before its first store call: once it has had a
slot (it may have written), its later calls wait like priority ones, so a
deferral always means "nothing was done".

What is admitted without the queue or its limits (``Ticket.bypass`` /
``Ticket.priority``):

- ``/healthz``, ``/api/v1/health``, ``/metrics`` and the API documents bypass
  admission entirely: a load balancer and a monitor must see a busy master
  as alive (its ``/healthz`` probe has its own timeout).
- Directory rows relayed for read-only masters (``PUT /api/v1/masters/…``,
  herder.master.readonly) bypass it too: one small write per read-only
  master and heartbeat interval, and a busy read-write master is exactly
  when the read-only masters must stay listed.
- Agent heartbeats are queued but never deferred, as if they carried the
  flag: a heartbeat renews leases (DESIGN §5) and any master must take it
  soon; deferring it only adds round trips while the lease runs out.

Long-polls (claims, follows) hold a slot only while they touch the database,
not while they are parked, so idle agents do not make a master busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from herder.master.deferrals import PRIORITY_HEADER, DirectoryCache, busy_response

_PRIORITY = PRIORITY_HEADER.lower().encode()
_BYPASS = frozenset({"/healthz", "/api/v1/health", "/metrics", "/openapi.json", "/docs", "/redoc"})
_DIRECTORY = "/api/v1/masters/"
_HEARTBEAT = re.compile(r"^/api/v1/agents/[^/]+/heartbeat$")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# How fast the average service time follows changes (exponential moving average).
_EWMA = 0.2


@dataclass
class AdmissionConfig:
    #: Store calls served at once (worker threads with a database connection).
    workers: int = 32
    #: Calls that may wait for a worker before requests without priority are deferred.
    depth: int = 512
    #: Longest wait of a write for a worker before it is deferred (no priority).
    write_wait_s: float = 10.0


@dataclass
class Ticket:
    """One request as admission sees it (set per request by the middleware)."""

    priority: bool
    write: bool
    bypass: bool = False
    admitted: bool = False  # it has had a slot: never deferred any more

    @property
    def deferrable(self) -> bool:
        return not (self.priority or self.admitted or self.bypass)


current_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "herder_admission_ticket", default=None
)


class Busy(Exception):
    """The master defers the current request: its queue is full or a write waited too long."""

    def __init__(self, message: str, requests: int, estimate_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.requests = requests
        self.estimate_s = estimate_s


class AdmissionQueue:
    """``workers`` slots and one FIFO queue of callers waiting for them (one event loop)."""

    def __init__(self, config: AdmissionConfig) -> None:
        if config.workers < 1 or config.depth < 0 or config.write_wait_s < 0:
            raise ValueError("admission: workers >= 1, depth >= 0, write_wait_s >= 0")
        self.config = config
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.service_s = 0.005  # moving average of a slot's holding time
        self.deferred = 0  # requests answered busy
        self.admitted = 0  # slots handed out

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def estimate_s(self) -> float:
        """Seconds until the queue has drained, at the recent service time."""
        return (self.waiting + self.active) * self.service_s / self.config.workers

    def full(self) -> bool:
        return self.active >= self.config.workers and self.waiting >= self.config.depth

    def busy(self, why: str) -> Busy:
        self.deferred += 1
        return Busy(why, self.waiting + self.active, self.estimate_s())

    def check(self, ticket: Ticket) -> None:
        """Raise :class:`Busy` when ``ticket`` would be deferred now."""
        if ticket.deferrable and self.full():
            raise self.busy(self._full_message())

    def _full_message(self) -> str:
        return f"busy: {self.waiting} requests waiting for {self.config.workers} workers"

    @contextlib.asynccontextmanager
    async def slot(self, ticket: Ticket | None) -> AsyncIterator[None]:
        """Hold one worker slot for the block; wait for it in FIFO order."""
        if ticket is not None and ticket.bypass:
            yield
            return
        if self.active < self.config.workers and not self._waiters:
            self.active += 1
        else:
            await self._wait(ticket)
        if ticket is not None:
            ticket.admitted = True
        self.admitted += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            held = time.perf_counter() - start
            self.service_s += _EWMA * (held - self.service_s)
            self._release()

    async def _wait(self, ticket: Ticket | None) -> None:
        deferrable = ticket is not None and ticket.deferrable
        if deferrable and self.waiting >= self.config.depth:
            raise self.busy(self._full_message())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        limit = self.config.write_wait_s if deferrable and ticket and ticket.write else None
        try:
            if limit is None:
                await fut
                return
            done, _ = await asyncio.wait({fut}, timeout=limit)
            if not done:
                fut.cancel()
                self._forget(fut)
                raise self.busy(f"busy: a write waited {limit:g} s for a database worker")
        except asyncio.CancelledError:
            # The request went away: give back a slot handed to it meanwhile.
            if fut.done() and not fut.cancelled():
                self._release()
            else:
                fut.cancel()
                self._forget(fut)
            raise

    def _forget(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def _release(self) -> None:
        # The slot passes straight to the oldest waiter (FIFO): nobody overtakes.
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1


def ticket_for(scope: Scope) -> Ticket:
    path: str = scope.get("path", "")
    method: str = scope.get("method", "GET")
    if path in _BYPASS or (method == "PUT" and path.startswith(_DIRECTORY)):
        return Ticket(priority=False, write=method != "GET", bypass=True)
    priority = any(k == _PRIORITY and v.strip() == b"1" for k, v in scope.get("headers", ()))
    write = method not in _READ_METHODS
    if write and _HEARTBEAT.match(path):
        priority = True
    return Ticket(priority=priority, write=write)


class AdmissionMiddleware:
    """Tags each request with its :class:`Ticket` and defers it at the door when the
    queue is already full (before its body is read)."""

    def __init__(self, app: ASGIApp, queue: AdmissionQueue, directory: DirectoryCache) -> None:
        self.app = app
        self.queue = queue
        self.directory = directory

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ticket = ticket_for(scope)
        try:
            self.queue.check(ticket)
        except Busy as exc:
            await self.busy_answer(exc, ticket.write)(scope, receive, send)
            return
        token = current_ticket.set(ticket)
        try:
            await self.app(scope, receive, send)
        finally:
            current_ticket.reset(token)

    def busy_answer(self, exc: Busy, write: bool) -> JSONResponse:
        return busy_response(
            exc.message, self.directory.alternates(write=write), exc.requests, exc.estimate_s
        )


def busy_handler(directory: DirectoryCache) -> Any:
    """The app's exception handler for :class:`Busy` raised inside a route."""

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Busy)
        write = request.method not in _READ_METHODS
        return busy_response(
            exc.message, directory.alternates(write=write), exc.requests, exc.estimate_s
        )

    return handle


def prometheus(queue: AdmissionQueue) -> str:
    """Admission lines for ``/metrics``."""
    return (
        "# HELP herder_admission_waiting Store calls waiting for a worker.\n"
        "# TYPE herder_admission_waiting gauge\n"
        f"herder_admission_waiting {queue.waiting}\n"
        "# HELP herder_admission_active Store calls holding a worker.\n"
        "# TYPE herder_admission_active gauge\n"
        f"herder_admission_active {queue.active}\n"
        "# HELP herder_admission_deferred_total Requests answered busy.\n"
        "# TYPE herder_admission_deferred_total counter\n"
        f"herder_admission_deferred_total {queue.deferred}\n"
        "# HELP herder_admission_estimate_seconds Estimated time to drain the queue.\n"
        "# TYPE herder_admission_estimate_seconds gauge\n"
        f"herder_admission_estimate_seconds {queue.estimate_s():.6f}\n"
    )


__all__ = [
    "AdmissionConfig",
    "AdmissionMiddleware",
    "AdmissionQueue",
    "Busy",
    "Ticket",
    "busy_handler",
    "current_ticket",
]
