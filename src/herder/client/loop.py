"""The request loop of the master API's client (seeds/004, DESIGN §7).

:class:`RequestLoop` sends every request of :class:`herder.client.HerderClient`
(see that module for the protocol): servers to try, servers tried, dead
servers, the priority flag, deferrals (busy, no-service, continuation),
failure records, sticky preferred master. No API methods here.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from herder import __version__
from herder.client.deferral import (
    BUSY,
    CONTINUATION,
    BusyRound,
    Continuation,
    LoopState,
)
from herder.client.deferral import next_request as _next_request
from herder.client.deferral import parse_deferral as _parse_deferral
from herder.client.errors import (
    ApiError,
    AttemptRecord,
    HerderClientError,
    NoMasterAvailable,
    RequestOutcomeUnknown,
    WaitDeclined,
)
from herder.client.wire import API_PREFIX as API_PREFIX
from herder.client.wire import CONTINUATION_HEADER as CONTINUATION_HEADER
from herder.client.wire import PRIORITY_HEADER as PRIORITY_HEADER
from herder.client.wire import api_path as _api_path
from herder.client.wire import dump as _dump
from herder.client.wire import error_from_response as _error_from_response
from herder.client.wire import json_body as _json_body
from herder.client.wire import json_bytes as _json_bytes
from herder.client.wire import normalize_master_url as normalize_master_url
from herder.client.wire import split_masters as _split_masters
from herder.tlsconf import TlsVerifyError, client_verify, verify_error, verify_failure_line

if TYPE_CHECKING:
    from herder.client.outage import OutagePolicy, OutageWatch

MAX_CONTINUATIONS = 16
MAX_FAILURES_KEPT = 1000

_JSON_HEADERS = {"content-type": "application/json"}
_OCTET_HEADERS = {"content-type": "application/octet-stream"}

M = TypeVar("M", bound=BaseModel)

#: Called with each continuation deferral of an operation (its first transaction's
#: result, the next request): returns the next request's body (bytes sent as
#: ``application/octet-stream``, e.g. a blob the caller holds), or None for the
#: body the master named.
ContinuationHook = Callable[[Continuation], bytes | None]

#: Called when every master that answered was busy, before the priority round:
#: True to wait with priority, False to give up (:class:`WaitDeclined`).
AllBusyHook = Callable[[BusyRound], bool]


def _drain(response: httpx.Response, stream: bool) -> None:
    """Read and release a streamed answer that is not handed to the caller."""
    if stream:
        response.read()
        response.close()


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
        verify: bool | str | ssl.SSLContext = True,
        max_connections: int = 100,
        keepalive_expiry: float = 4.0,
        master_timeout: float | None = None,
        outage: OutagePolicy | None = None,
        on_all_busy: AllBusyHook | None = None,
    ) -> None:
        if masters is None and discovery is None:
            raise ValueError("give masters, a discovery, or both")
        self._masters = _split_masters(masters) if masters is not None else []
        self._discovery = discovery
        self._timeout = float(timeout)
        headers = {"user-agent": user_agent, "accept": "application/json"}
        if token is None:  # herder.client.auth: HERDER_TOKEN, then the token files
            from herder.client.auth import default_token

            token = default_token()
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(self._timeout),
            headers=headers,
            # True: --ca / $HERDER_CA, else the system trust store (herder.tlsconf).
            verify=client_verify(verify),
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
        self._on_all_busy = on_all_busy
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

    def set_token(self, token: str | None) -> None:
        """Send ``token`` from now on (an agent that received its own at registration)."""
        if token:
            self._http.headers["authorization"] = f"Bearer {token}"
        else:
            self._http.headers.pop("authorization", None)

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
        on_continuation: ContinuationHook | None = None,
    ) -> httpx.Response:
        """Send one API request through the seeds/004 loop and return the answer.

        ``on_continuation`` sees each continuation deferral (the first
        transaction's result) and may give the next request's body.

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
                method,
                path,
                json,
                content,
                params,
                idempotent,
                timeout,
                stream,
                content_type,
                on_continuation=on_continuation,
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
                    on_continuation=on_continuation,
                )
            except WaitDeclined:
                raise  # the caller chose not to wait for busy masters
            except TlsVerifyError:
                raise  # waiting does not fix a certificate: fail fast
            except NoMasterAvailable as exc:
                if exc.all_declined:
                    # Every master answered, and none serves this request: waiting
                    # for one would only wait out the master timeout.
                    watch.back(self._preferred)
                    raise
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
        on_continuation: ContinuationHook | None = None,
    ) -> httpx.Response:
        """One pass of the seeds/004 loop over the masters (``also``: more to try last).

        The steps are those of seeds/004, in its order; the lists and the flag
        are a :class:`~herder.client.deferral.LoopState`.
        """
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
        state = LoopState(to_try=to_try, request=f"{cmd.method} {cmd.path}")
        timeout_value: httpx.Timeout | float = self._timeout if timeout is None else timeout
        continuations = 0
        retried_same: set[str] = set()
        tls_line: str | None = None  # the first certificate that failed verification

        while True:
            if not state.to_try:
                if state.priority:
                    # No server could handle the request: report it.
                    if tls_line is not None:
                        raise TlsVerifyError(
                            cmd.method, cmd.path, state.attempts, tls_line, state.retry_after
                        )
                    raise NoMasterAvailable(
                        cmd.method,
                        cmd.path,
                        state.attempts,
                        retry_after=state.retry_after,
                        note=state.note,
                    )
                # Every server was tried: the busy ones again, with the flag on.
                again = state.start_priority_round()
                if again and not self._wait_with_priority(cmd, state, again):
                    raise WaitDeclined(
                        cmd.method, cmd.path, state.attempts, retry_after=state.retry_after
                    )
                continue
            server = state.take()
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
                self._note(state, server, "unreachable", exc, record=False)
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
                tls = verify_error(exc)
                if tls is not None:  # a dead server, never a busy one (see TlsVerifyError)
                    kind = "tls"
                    tls_line = tls_line or verify_failure_line(server, tls)
                self._note(state, server, kind, exc)
                continue
            except (httpx.WriteError, httpx.WriteTimeout) as exc:
                # The request was not fully written: the server cannot act on it.
                if server not in retried_same and isinstance(exc, httpx.WriteError):
                    # Likely a kept-alive connection the server had closed: once more,
                    # on a fresh connection, before calling the server dead.
                    retried_same.add(server)
                    state.to_try.insert(0, server)
                    continue
                self._note(state, server, "broken", exc)
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
                self._note(state, server, kind, exc)
                continue

            status = response.status_code
            if status in (502, 504):
                # A proxy in front of the master could not get an answer: the
                # master cannot be contacted.
                _drain(response, stream)
                if not cmd.idempotent:
                    self._record_failure(server, "gateway", state.request)
                    raise RequestOutcomeUnknown(
                        cmd.method,
                        server + cmd.path,
                        HerderClientError(f"HTTP {status} from a gateway"),
                    )
                self._note(state, server, "gateway", HerderClientError(f"HTTP {status}"))
                continue

            deferral = _parse_deferral(response)
            if deferral is None:
                # The server handled the request: report status and exit.
                self._preferred = server
                if status >= 300:
                    _drain(response, stream)
                    raise _error_from_response(response)
                return response
            _drain(response, stream)
            if deferral.kind == CONTINUATION:
                self._preferred = server  # it handled the first transaction
                continuations += 1
                if continuations > MAX_CONTINUATIONS:
                    raise HerderClientError(
                        f"{cmd.method} {cmd.path}: more than {MAX_CONTINUATIONS} continuations"
                    )
                try:
                    cont, content, ctype = _next_request(server, deferral, on_continuation)
                except ValueError as exc:
                    raise HerderClientError(f"{cmd.method} {cmd.path}: {exc}") from None
                headers = {"content-type": ctype} if ctype else {}
                # seeds/004: the second transaction is idempotent by construction.
                cmd = _Command(
                    cont.method, _api_path(cont.path), content, headers, cont.params, True
                )
                state.continuation(cont, f"{cmd.method} {cmd.path}")
                retried_same.clear()
                continue
            if self._preferred == server:
                self._preferred = None
            if deferral.kind == BUSY:
                self._record_failure(server, "busy", state.request)
                state.busy(server, deferral)
            else:
                # No-service: not a failure of the master, and not asked again for
                # this command (seeds/004 puts only busy servers on servers-tried).
                state.no_service(server, deferral)

    def _wait_with_priority(self, cmd: _Command, state: LoopState, busy: list[str]) -> bool:
        """Every master is busy: ask the caller whether to wait with priority (seeds/004)."""
        hook = self._on_all_busy
        if hook is None:
            return True
        return hook(
            BusyRound(
                cmd.method,
                cmd.path,
                tuple(busy),
                tuple(state.attempts),
                state.retry_after,
                during_outage=self._outage is not None and self._outage.in_outage,
            )
        )

    def _note(
        self,
        state: LoopState,
        server: str,
        kind: str,
        exc: BaseException,
        *,
        record: bool = True,
    ) -> None:
        """The server cannot be contacted: it goes on dead-servers."""
        state.dead_server(
            server, AttemptRecord(server, kind, f"{type(exc).__name__}: {exc}", state.priority)
        )
        if record:
            self._record_failure(server, kind, state.request)
        if self._preferred == server:
            self._preferred = None

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
