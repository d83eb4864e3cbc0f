"""The request loop of the master API's client (seeds/004, DESIGN §7).

:class:`RequestLoop` sends every request of :class:`herder.client.HerderClient`
(see that module for the protocol): servers to try, servers tried, dead
servers, the priority flag, deferrals (busy, no-service, continuation),
failure records, sticky preferred master. No API methods here.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from herder import __version__
from herder.client.errors import (
    ApiError,
    AttemptRecord,
    HerderClientError,
    NoMasterAvailable,
    RequestOutcomeUnknown,
)
from herder.client.wire import API_PREFIX as API_PREFIX
from herder.client.wire import CONTINUATION_HEADER as CONTINUATION_HEADER
from herder.client.wire import PRIORITY_HEADER as PRIORITY_HEADER
from herder.client.wire import alternates_of as _alternates_of
from herder.client.wire import api_path as _api_path
from herder.client.wire import dump as _dump
from herder.client.wire import error_from_response as _error_from_response
from herder.client.wire import json_body as _json_body
from herder.client.wire import json_bytes as _json_bytes
from herder.client.wire import normalize_master_url as normalize_master_url
from herder.client.wire import retry_after as _retry_after
from herder.client.wire import split_masters as _split_masters

if TYPE_CHECKING:
    from herder.client.outage import OutagePolicy, OutageWatch

MAX_CONTINUATIONS = 16
MAX_FAILURES_KEPT = 1000

_JSON_HEADERS = {"content-type": "application/json"}
_OCTET_HEADERS = {"content-type": "application/octet-stream"}

M = TypeVar("M", bound=BaseModel)


class MasterFailure(NamedTuple):
    """A master that failed a request: its URL, when (epoch seconds), and how."""

    url: str
    when: float
    kind: str  # unreachable, timeout, broken, busy, gateway
    request: str = ""  # the request that failed: "METHOD /api/v1/path"


class MasterSource(Protocol):
    """Where a client finds masters besides its configured list (``herder.client.discovery``)."""

    def candidates(self) -> list[str]: ...


@dataclass
class _Command:
    method: str
    path: str  # full path, starting with /api/
    content: bytes | None
    headers: Mapping[str, str]
    params: Mapping[str, str | int | float] | None
    idempotent: bool


@dataclass
class _LoopState:
    to_try: list[str]
    tried: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    priority: bool = False
    attempts: list[AttemptRecord] = field(default_factory=list)
    retry_after: float | None = None
    request: str = ""  # "METHOD path" of the current command, for failure records

    def knows(self, url: str) -> bool:
        return url in self.to_try or url in self.tried or url in self.dead

    def add_alternates(
        self, alternates: Iterable[str], current: str, *, front: bool = False
    ) -> None:
        """Alternates that no list knows yet join servers-to-try (seeds/004)."""
        new: list[str] = []
        for alt in alternates:
            try:
                url = normalize_master_url(alt)
            except ValueError:
                continue
            if url == current or url in new or self.knows(url):
                continue
            new.append(url)
        if front:
            self.to_try[:0] = new
        else:
            self.to_try.extend(new)


class RequestLoop:
    """Synchronous, thread-safe client of the herder master API.

    ``masters`` is one URL, a comma/space separated string of URLs, or a
    sequence of URLs (``http://host:port``; ``/api/v1`` is added). Use as a
    context manager or call :meth:`close`.

    ``discovery`` (e.g. :class:`herder.client.discovery.MasterDiscovery`)
    adds masters found at request time after the configured ones; with it,
    ``masters`` may be omitted.

    ``master_timeout`` (seconds) or ``outage`` (an
    :class:`herder.client.outage.OutagePolicy`) make every request wait out
    master outages, up to that long per outage, instead of failing at once
    (``herder.client.outage``). Off by default: the agent has its own backoff.
    """

    def __init__(
        self,
        masters: str | Sequence[str] | None = None,
        *,
        discovery: MasterSource | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        token: str | None = None,
        user_agent: str = f"herder-client/{__version__}",
        verify: bool | str = True,
        max_connections: int = 100,
        keepalive_expiry: float = 4.0,
        master_timeout: float | None = None,
        outage: OutagePolicy | None = None,
    ) -> None:
        if masters is None and discovery is None:
            raise ValueError("give masters, a discovery, or both")
        self._masters = _split_masters(masters) if masters is not None else []
        self._discovery = discovery
        self._timeout = float(timeout)
        headers = {"user-agent": user_agent, "accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(self._timeout),
            headers=headers,
            verify=verify,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                # Shorter than the master's keep-alive timeout (uvicorn: 5 s), so the
                # client drops an idle connection before the server can close it
                # under a request in flight.
                keepalive_expiry=keepalive_expiry,
            ),
            follow_redirects=False,
            trust_env=False,
        )
        self._preferred: str | None = None
        self._lock = threading.Lock()
        self._failures: deque[MasterFailure] = deque(maxlen=MAX_FAILURES_KEPT)
        self._outage: OutageWatch | None = None
        if outage is None and master_timeout is not None:
            from herder.client.outage import OutagePolicy

            outage = OutagePolicy(timeout_s=float(master_timeout))
        if outage is not None:
            from herder.client.outage import OutageWatch

            self._outage = OutageWatch(outage)

    # ------------------------------------------------------------- lifecycle

    def __enter__(self) -> RequestLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._outage is not None:
            self._outage.close()  # wakes requests waiting for a master
        self._http.close()

    @property
    def outage(self) -> OutageWatch | None:
        """The outage watch of a client that waits out master outages, else None."""
        return self._outage

    @property
    def masters(self) -> list[str]:
        """The configured masters, then those the discovery finds (normalized base URLs)."""
        return self._current_masters()

    @property
    def discovery(self) -> MasterSource | None:
        return self._discovery

    def _current_masters(self) -> list[str]:
        out = list(self._masters)
        if self._discovery is not None:
            for url in self._discovery.candidates():
                try:
                    norm = normalize_master_url(url)
                except ValueError:
                    continue
                if norm not in out:
                    out.append(norm)
        if self._outage is not None:
            self._outage.remember(out)
        return out

    @property
    def preferred(self) -> str | None:
        """The master that last answered normally: tried first by the next request."""
        return self._preferred

    @property
    def failures(self) -> list[MasterFailure]:
        """Masters that failed requests (oldest first), to report to a master (§6)."""
        with self._lock:
            return list(self._failures)

    def pop_failures(self) -> list[MasterFailure]:
        """Return the recorded failures and forget them."""
        with self._lock:
            out = list(self._failures)
            self._failures.clear()
            return out

    def _record_failure(self, url: str, kind: str, request: str = "") -> None:
        with self._lock:
            self._failures.append(MasterFailure(url, time.time(), kind, request))

    # ---------------------------------------------------------- request loop

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: BaseModel | Any = None,
        content: bytes | None = None,
        params: Mapping[str, str | int | float] | None = None,
        idempotent: bool,
        timeout: httpx.Timeout | float | None = None,
        stream: bool = False,
        content_type: str | None = None,
    ) -> httpx.Response:
        """Send one API request through the seeds/004 loop and return the answer.

        Returns a 2xx response (with ``stream=True`` the caller must close it);
        raises :class:`ApiError` (and subclasses) for an error answer,
        :class:`NoMasterAvailable` when no master handled it (with an outage
        policy: :class:`MasterOutageTimeout` once no master answered for its
        timeout), and :class:`RequestOutcomeUnknown` when a non-idempotent
        request may have been processed but its answer was lost.
        """
        watch = self._outage
        if watch is None:
            return self._round(
                method, path, json, content, params, idempotent, timeout, stream, content_type
            )
        # Outage riding (herder.client.outage): a round that reached no master sent
        # nothing anywhere, so the same request may go again, to every master known.
        backoff = watch.backoff()
        also: list[str] = []
        while True:
            round_timeout = timeout
            if watch.in_outage:
                round_timeout = self._connect_capped(timeout, watch.remaining())
            try:
                response = self._round(
                    method,
                    path,
                    json,
                    content,
                    params,
                    idempotent,
                    round_timeout,
                    stream,
                    content_type,
                    also=also,
                )
            except NoMasterAvailable as exc:
                watch.wait(watch.next_wait(exc, backoff))
                invalidate = getattr(self._discovery, "invalidate", None)
                if invalidate is not None:
                    invalidate()  # ask DNS and the directory afresh
                also = watch.remembered()
                continue
            except ApiError:
                watch.back(self._preferred)  # a master answered, if with an error
                raise
            watch.back(self._preferred)
            return response

    def _connect_capped(
        self, timeout: httpx.Timeout | float | None, remaining: float
    ) -> httpx.Timeout:
        """``timeout`` with its connect part cut to the outage's time left (a black hole)."""
        t = httpx.Timeout(self._timeout if timeout is None else timeout)
        connect = t.connect if t.connect is not None else self._timeout
        return httpx.Timeout(
            connect=max(0.1, min(connect, remaining)), read=t.read, write=t.write, pool=t.pool
        )

    def _round(
        self,
        method: str,
        path: str,
        json: BaseModel | Any,
        content: bytes | None,
        params: Mapping[str, str | int | float] | None,
        idempotent: bool,
        timeout: httpx.Timeout | float | None,
        stream: bool,
        content_type: str | None,
        *,
        also: Sequence[str] = (),
    ) -> httpx.Response:
        """One pass of the seeds/004 loop over the masters (``also``: more to try last)."""
        if json is not None and content is not None:
            raise ValueError("give json or content, not both")
        if json is not None:
            body: bytes | None = _dump(json) if isinstance(json, BaseModel) else _json_bytes(json)
            headers: Mapping[str, str] = _JSON_HEADERS
        else:
            body = content
            headers = (
                {"content-type": content_type}
                if content_type
                else (_OCTET_HEADERS if content is not None else {})
            )
        cmd = _Command(method.upper(), _api_path(path), body, headers, params, idempotent)
        preferred = self._preferred
        to_try = self._current_masters()
        to_try += [m for m in also if m not in to_try]
        if not to_try:
            raise NoMasterAvailable(cmd.method, cmd.path, [])
        if preferred is not None:
            to_try = [preferred, *(m for m in to_try if m != preferred)]
        state = _LoopState(to_try=to_try, request=f"{cmd.method} {cmd.path}")
        timeout_value: httpx.Timeout | float = self._timeout if timeout is None else timeout
        continuations = 0
        retried_same: set[str] = set()

        while True:
            if not state.to_try:
                if state.priority:
                    raise NoMasterAvailable(
                        cmd.method, cmd.path, state.attempts, retry_after=state.retry_after
                    )
                state.priority = True
                state.to_try, state.tried = state.tried, []
                continue
            server = state.to_try.pop(0)
            req_headers = dict(cmd.headers)
            if state.priority:
                req_headers[PRIORITY_HEADER] = "1"
            try:
                request = self._http.build_request(
                    cmd.method,
                    server + cmd.path,
                    content=cmd.content,
                    params=cmd.params,
                    headers=req_headers,
                    timeout=timeout_value,
                )
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                self._note(state, server, "unreachable", exc, dead=True, record=False)
                continue
            try:
                response = self._http.send(request, stream=stream)
            except (
                httpx.ConnectError,
                httpx.ConnectTimeout,
                httpx.PoolTimeout,
                httpx.UnsupportedProtocol,
                httpx.ProxyError,
            ) as exc:
                # Never reached the server: safe to send elsewhere.
                kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "unreachable"
                self._note(state, server, kind, exc, dead=True)
                continue
            except (httpx.WriteError, httpx.WriteTimeout) as exc:
                # The request was not fully written: the server cannot act on it.
                if server not in retried_same and isinstance(exc, httpx.WriteError):
                    # Likely a kept-alive connection the server had closed: once more,
                    # on a fresh connection, before calling the server dead.
                    retried_same.add(server)
                    state.to_try.insert(0, server)
                    continue
                self._note(state, server, "broken", exc, dead=True)
                continue
            except (httpx.ReadError, httpx.ReadTimeout, httpx.RemoteProtocolError) as exc:
                # The request may have reached the server.
                if not cmd.idempotent:
                    self._record_failure(
                        server,
                        "timeout" if isinstance(exc, httpx.TimeoutException) else "broken",
                        state.request,
                    )
                    raise RequestOutcomeUnknown(cmd.method, server + cmd.path, exc) from exc
                if server not in retried_same and not isinstance(exc, httpx.TimeoutException):
                    retried_same.add(server)
                    state.to_try.insert(0, server)
                    continue
                kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "broken"
                self._note(state, server, kind, exc, dead=True)
                continue

            status = response.status_code
            if status in (503, 421):
                if stream:
                    response.read()
                    response.close()
                payload = _json_body(response)
                message = ""
                if isinstance(payload, dict) and isinstance(payload.get("message"), str):
                    message = payload["message"]
                if status == 503:
                    queued = payload.get("queued") if isinstance(payload, dict) else None
                    if queued is not None:
                        message = f"{message}; {queued} queued" if message else f"{queued} queued"
                    ra = _retry_after(response)
                    if ra is not None:
                        state.retry_after = (
                            ra if state.retry_after is None else min(ra, state.retry_after)
                        )
                    self._record_failure(server, "busy", state.request)
                    outcome = "busy"
                else:
                    outcome = "no_service"
                state.attempts.append(AttemptRecord(server, outcome, message, state.priority))
                state.add_alternates(_alternates_of(payload), server)
                state.tried.append(server)
                if self._preferred == server:
                    self._preferred = None
                continue
            if status in (502, 504):
                # A proxy in front of the master could not get an answer.
                if stream:
                    response.read()
                    response.close()
                if not cmd.idempotent:
                    self._record_failure(server, "gateway", state.request)
                    raise RequestOutcomeUnknown(
                        cmd.method,
                        server + cmd.path,
                        HerderClientError(f"HTTP {status} from a gateway"),
                    )
                self._note(state, server, "gateway", HerderClientError(f"HTTP {status}"), dead=True)
                continue

            # The server handled the request.
            self._preferred = server
            if status >= 300:
                if stream:
                    response.read()
                    response.close()
                raise _error_from_response(response)
            if response.headers.get(CONTINUATION_HEADER) == "1":
                if stream:
                    response.read()
                    response.close()
                continuations += 1
                if continuations > MAX_CONTINUATIONS:
                    raise HerderClientError(
                        f"{cmd.method} {cmd.path}: more than {MAX_CONTINUATIONS} continuations"
                    )
                cmd = self._continuation(_json_body(response), cmd)
                state.request = f"{cmd.method} {cmd.path}"
                state.add_alternates(_alternates_of(_json_body(response)), server, front=True)
                state.priority = False
                state.to_try.extend(state.tried)
                state.tried = []
                if server not in state.to_try:
                    state.to_try.append(server)
                retried_same.clear()
                continue
            return response

    def _note(
        self,
        state: _LoopState,
        server: str,
        kind: str,
        exc: BaseException,
        *,
        dead: bool,
        record: bool = True,
    ) -> None:
        state.attempts.append(
            AttemptRecord(server, kind, f"{type(exc).__name__}: {exc}", state.priority)
        )
        if dead and server not in state.dead:
            state.dead.append(server)
        if record:
            self._record_failure(server, kind, state.request)
        if self._preferred == server:
            self._preferred = None

    @staticmethod
    def _continuation(body: Any, previous: _Command) -> _Command:
        cont = body.get("continuation") if isinstance(body, dict) else None
        if not isinstance(cont, dict) or not isinstance(cont.get("path"), str):
            raise HerderClientError(
                f"{previous.method} {previous.path}: malformed continuation deferral: {body!r}"
            )
        method = cont.get("method", "GET")
        if not isinstance(method, str):
            raise HerderClientError(f"malformed continuation method {method!r}")
        content: bytes | None = None
        headers: Mapping[str, str] = {}
        if cont.get("body") is not None:
            content = _json_bytes(cont["body"])
            headers = _JSON_HEADERS
        params = cont.get("params")
        return _Command(
            method=method.upper(),
            path=_api_path(cont["path"]),
            content=content,
            headers=headers,
            params=params if isinstance(params, dict) else None,
            # seeds/004: the second transaction must be idempotent.
            idempotent=True,
        )

    def _call(
        self,
        model: type[M],
        method: str,
        path: str,
        *,
        json: BaseModel | Any = None,
        params: Mapping[str, str | int | float] | None = None,
        idempotent: bool,
        timeout: httpx.Timeout | float | None = None,
    ) -> M:
        response = self._request(
            method, path, json=json, params=params, idempotent=idempotent, timeout=timeout
        )
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise HerderClientError(
                f"{method} {path}: the master's answer is not a valid {model.__name__}: {exc}"
            ) from exc

    # --------------------------------------------------------------- general

    def health(self) -> dict[str, Any]:
        response = self._request("GET", "/health", idempotent=True)
        body = _json_body(response)
        return body if isinstance(body, dict) else {"status": response.text}
