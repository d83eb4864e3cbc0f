"""The state of one seeds/004 request loop, and the deferrals it reacts to.

Pure data, no I/O: :class:`LoopState` is the client's four lists and its flag,
with one method per step of seeds/004; :func:`parse_deferral` reads a master's
answer as a busy, no-service or continuation deferral (the wire format is
docs/protocol-deferrals.md). :class:`herder.client.loop.RequestLoop` sends the
requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from herder.client.errors import AttemptRecord, describe_attempts
from herder.client.wire import (
    CONTINUATION_HEADER,
    alternates_of,
    json_body,
    json_bytes,
    retry_after,
)
from herder.client.wire import normalize_master_url as normalize_master_url

BUSY = "busy"
NO_SERVICE = "no_service"
CONTINUATION = "continuation"


@dataclass(frozen=True)
class Deferral:
    """A master's deferral of a request (seeds/004: busy, no-service or continuation)."""

    kind: str  # BUSY, NO_SERVICE, CONTINUATION
    message: str = ""
    alternates: tuple[str, ...] = ()
    retry_after: float | None = None
    body: Any = None  # the whole JSON body


@dataclass(frozen=True)
class Continuation:
    """A continuation deferral as the API method that started the operation sees it.

    ``result`` is the first transaction's answer; ``method``, ``path``,
    ``body`` and ``params`` name the next request; ``server`` answered.
    """

    server: str
    method: str
    path: str
    body: Any
    params: Mapping[str, str | int | float] | None
    alternates: tuple[str, ...]
    result: Any


@dataclass(frozen=True)
class BusyRound:
    """Every master that could be reached was busy: the loop is about to retry with priority.

    ``busy`` are the busy masters (they are asked again, with the flag);
    ``attempts`` everything this command got so far; ``during_outage``: the
    client already waits out an outage (it announced it).
    """

    method: str
    path: str
    busy: tuple[str, ...]
    attempts: tuple[AttemptRecord, ...]
    retry_after: float | None
    # A later round of a request that waits out an outage (a database restart:
    # every master answers busy): the caller already said so once.
    during_outage: bool = False

    @property
    def summary(self) -> str:
        """``http://a busy (swamped; 9 queued), http://b dead (connection refused)``."""
        return describe_attempts(self.attempts)


def describe_queued(queued: Any) -> str:
    """A busy body's ``queued`` estimate in words: ``9 queued``, ``9 queued, ~3.5s of work``."""
    if isinstance(queued, bool):
        return ""
    if isinstance(queued, int | float) and math.isfinite(queued):
        return f"{queued:g} queued"
    if not isinstance(queued, dict):
        return ""
    requests = queued.get("requests")
    estimate = queued.get("estimate_s")
    parts = []
    if isinstance(requests, int | float) and not isinstance(requests, bool):
        parts.append(f"{requests:g} queued")
    if (
        isinstance(estimate, int | float)
        and not isinstance(estimate, bool)
        and math.isfinite(estimate)
    ):
        parts.append(f"~{estimate:.1f}s of work")
    return ", ".join(parts)


def parse_deferral(response: httpx.Response) -> Deferral | None:
    """The deferral ``response`` carries, or None when it is an ordinary answer.

    503 is busy, 421 no-service (whatever the body says: a proxy's bare 503 is
    busy too); a 2xx with ``Herder-Continuation: 1`` a continuation.
    """
    status = response.status_code
    continuation = 200 <= status < 300 and response.headers.get(CONTINUATION_HEADER) == "1"
    if status not in (503, 421) and not continuation:
        return None
    response.read()  # a streamed answer: the deferral is in its (small) body
    body = json_body(response)
    message = ""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
    alternates = tuple(alternates_of(body))
    if continuation:
        return Deferral(CONTINUATION, message, alternates, body=body)
    if status == 421:
        return Deferral(NO_SERVICE, message, alternates, body=body)
    queued = describe_queued(body.get("queued") if isinstance(body, dict) else None)
    if queued:
        message = f"{message}; {queued}" if message else queued
    return Deferral(BUSY, message, alternates, retry_after(response), body)


def continuation_of(server: str, deferral: Deferral) -> Continuation:
    """The next request a continuation deferral names (ValueError when it names none)."""
    body = deferral.body
    nxt = None
    if isinstance(body, dict):
        nxt = body.get("continuation", body.get("next"))
    if not isinstance(nxt, dict) or not isinstance(nxt.get("path"), str):
        raise ValueError(f"malformed continuation deferral: {body!r}")
    method = nxt.get("method", "GET")
    if not isinstance(method, str) or not method.isalpha():
        raise ValueError(f"malformed continuation method {method!r}")
    params = nxt.get("params")
    if params is not None and not (
        isinstance(params, dict)
        and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in params.values()
        )
    ):
        raise ValueError(f"malformed continuation params {params!r}")
    return Continuation(
        server=server,
        method=method.upper(),
        path=nxt["path"],
        body=nxt.get("body"),
        params=params,
        alternates=deferral.alternates,
        result=body.get("result") if isinstance(body, dict) else None,
    )


def next_request(
    server: str, deferral: Deferral, hook: Callable[[Continuation], bytes | None] | None
) -> tuple[Continuation, bytes | None, str | None]:
    """The next request of a continuation: (it, its body, the body's content type).

    The body is the master's JSON, or the bytes ``hook`` gives (a blob the caller
    holds). ValueError when the deferral names no request.
    """
    cont = continuation_of(server, deferral)
    content: bytes | None = None
    ctype: str | None = None
    if cont.body is not None:
        content, ctype = json_bytes(cont.body), "application/json"
    if hook is not None:
        given = hook(cont)
        if given is not None:
            content, ctype = given, "application/octet-stream"
    return cont, content, ctype


def _urls(alternates: Iterable[str]) -> list[str]:
    out: list[str] = []
    for alt in alternates:
        try:
            url = normalize_master_url(alt)
        except ValueError:
            continue  # the protocol says alternates are master URLs: skip anything else
        if url not in out:
            out.append(url)
    return out


@dataclass
class LoopState:
    """The client's state for one operation (seeds/004 "The client manages its state thus").

    ``declined``: masters that answered this command with no-service. Seeds/004
    puts them on no list; they are kept here only so that alternates do not
    bring them back for the same command (two masters naming each other would
    loop forever), and for the final error. A continuation forgets them: the
    new command may be one they serve.
    """

    to_try: list[str]
    tried: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    priority: bool = False
    attempts: list[AttemptRecord] = field(default_factory=list)
    retry_after: float | None = None
    request: str = ""  # "METHOD path" of the current command
    note: str = ""  # why servers-to-try is empty from the start (for the error)

    def knows(self, url: str) -> bool:
        """On one of the server lists (seeds/004: alternates join only if unknown)."""
        return url in self.to_try or url in self.tried or url in self.dead or url in self.declined

    def take(self) -> str:
        """Select a server to try and remove it from servers-to-try."""
        return self.to_try.pop(0)

    def start_priority_round(self) -> list[str]:
        """Servers-to-try ran out, flag off: flag on, servers-tried become servers-to-try.

        Returns the masters that will be asked again (the busy ones).
        """
        self.priority = True
        again, self.tried = self.tried, []
        self.to_try.extend(again)
        return again

    def add_alternates(self, alternates: Iterable[str], *, exclude: str | None = None) -> list[str]:
        """Alternates no list knows yet join servers-to-try; returns them (normalized).

        ``exclude``: the master that just deferred with busy or no-service: it is
        about to go on servers-tried (or be declined), so it is not its own alternate.
        """
        new = [u for u in _urls(alternates) if u != exclude and not self.knows(u)]
        self.to_try.extend(new)
        return new

    def dead_server(self, server: str, record: AttemptRecord) -> None:
        self.attempts.append(record)
        if server not in self.dead:
            self.dead.append(server)

    def busy(self, server: str, deferral: Deferral) -> None:
        self.attempts.append(AttemptRecord(server, BUSY, deferral.message, self.priority))
        if deferral.retry_after is not None:
            ra = deferral.retry_after
            self.retry_after = ra if self.retry_after is None else min(ra, self.retry_after)
        self.add_alternates(deferral.alternates, exclude=server)
        if server not in self.tried:
            self.tried.append(server)

    def no_service(self, server: str, deferral: Deferral) -> None:
        self.attempts.append(AttemptRecord(server, NO_SERVICE, deferral.message, self.priority))
        self.add_alternates(deferral.alternates, exclude=server)
        if server not in self.declined:
            self.declined.append(server)

    def continuation(self, cont: Continuation, request: str) -> None:
        """The first transaction is done: flag off, servers-tried become servers-to-try.

        The answering master goes on no list (it is asked again only when the
        continuation names it). The servers to try are ordered with the
        continuation's alternates first, as the master listed them: it chose
        them for the next request.
        """
        self.declined = []  # they declined the old command, not necessarily this one
        self.add_alternates(cont.alternates)
        self.priority = False
        self.to_try.extend(u for u in self.tried if u not in self.to_try)
        self.tried = []
        first = [u for u in _urls(cont.alternates) if u in self.to_try]
        self.to_try = first + [u for u in self.to_try if u not in first]
        # What the old command got says nothing about the new one, except who is dead.
        self.attempts = [a for a in self.attempts if a.server in self.dead]
        self.retry_after = None
        self.request = request
        self.note = (
            ""
            if self.to_try
            else f"{cont.server} answered the first request; its continuation named no master"
        )
