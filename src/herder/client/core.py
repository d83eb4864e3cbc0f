"""``HerderClient``: the one HTTP client of the master API (CLI, Python API, agent).

Every call goes through :meth:`HerderClient._request`, which implements the
redirect protocol of seeds/004 (DESIGN §7):

* the client keeps *servers to try*, *servers tried*, *dead servers* and a
  *priority flag* (sent as ``Herder-Priority: 1``);
* a master that cannot be reached goes to *dead servers*;
* a **busy** deferral (HTTP 503, ``{"error": "busy", "message", "alternates",
  "queued"}``, ``Retry-After``) or a **no-service** deferral (HTTP 421,
  ``{"error": "no_service", "message", "alternates"}``) puts the master on
  *servers tried*; alternates no list knows yet join *servers to try*;
* when *servers to try* runs out, the flag turns on and the tried servers are
  tried again (a master must queue, not defer, a priority request it can
  handle); when it runs out with the flag on, :class:`NoMasterAvailable`;
* a **continuation** deferral (a 2xx answer with header
  ``Herder-Continuation: 1`` and body ``{"continuation": {"method", "path",
  "body", "params"}, "alternates"}``) means the first transaction is done: the
  flag resets, the tried servers become servers to try again, and the loop
  goes on with the new command (which is idempotent by construction).

A master that answers normally becomes the preferred server of the next
request (sticky); the configured masters stay the fallback. Masters that
failed (unreachable, timed out, busy) are recorded in :attr:`failures` so the
caller can report them to the next master it reaches (DESIGN §6).

TCP_NODELAY: httpcore's synchronous backend sets it on every TCP connection it
opens (``httpcore/_backends/sync.py``, ``connect_tcp``), so no socket option is
added here. Connections are pooled and kept alive by ``httpx.Client``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json as _jsonlib
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

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
    EventView,
    Heartbeat,
    HeartbeatResponse,
    JobList,
    JobSubmit,
    JobSummary,
    JobView,
    LogAppend,
    LogChunk,
    LogView,
    TaskView,
)
from herder.client.errors import (
    ApiError,
    AttemptRecord,
    BlobDigestError,
    ConflictError,
    HerderClientError,
    NoMasterAvailable,
    NotFoundError,
    RequestOutcomeUnknown,
    StaleAttemptError,
)
from herder.client.files import CHUNK, sha256_file
from herder.paths import normalize_relpath, resolve_inside

API_PREFIX = "/api/v1"
PRIORITY_HEADER = "Herder-Priority"
CONTINUATION_HEADER = "Herder-Continuation"
MAX_CONTINUATIONS = 16
MAX_FAILURES_KEPT = 1000
BLOB_QUERY_BATCH = 10_000

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


class _EventList(BaseModel):
    events: list[EventView]


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


def normalize_master_url(url: str) -> str:
    """``host:port`` → ``http://host:port``; drops a trailing ``/`` and ``/api/v1``."""
    if not isinstance(url, str):
        raise ValueError(f"master URL must be a string, not {type(url).__name__}")
    url = url.strip()
    if not url:
        raise ValueError("master URL is empty")
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)].rstrip("/")
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"master URL {url!r} is not an http(s) URL with a host")
    return url


def _split_masters(masters: str | Sequence[str]) -> list[str]:
    items = masters.replace(",", " ").split() if isinstance(masters, str) else list(masters)
    out: list[str] = []
    for item in items:
        url = normalize_master_url(item)
        if url not in out:
            out.append(url)
    if not out:
        raise ValueError("no master URL given")
    return out


def _api_path(path: str) -> str:
    if not path.startswith("/"):
        path = "/" + path
    if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
        return path
    return API_PREFIX + path


def _json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _alternates_of(body: Any) -> list[str]:
    if isinstance(body, dict):
        alts = body.get("alternates")
        if isinstance(alts, list):
            return [a for a in alts if isinstance(a, str)]
    return []


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_from_response(response: httpx.Response) -> ApiError:
    status = response.status_code
    body = _json_body(response)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code: str = body["error"]
        message = body.get("message")
        message = message if isinstance(message, str) else code
        detail = body.get("detail")
    elif isinstance(body, dict) and "detail" in body:  # a bare framework error
        code = f"http_{status}"
        message = str(body["detail"])
        detail = body["detail"]
    else:
        code = f"http_{status}"
        text = response.text.strip() if response.content else ""
        message = f"{response.reason_phrase or 'HTTP error'}" + (f": {text[:500]}" if text else "")
        detail = None
    if status == 404:
        return NotFoundError(status, code, message, detail)
    if status == 409:
        if code == "stale_attempt":
            return StaleAttemptError(status, code, message, detail)
        return ConflictError(status, code, message, detail)
    return ApiError(status, code, message, detail)


def _dump(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


class HerderClient:
    """Synchronous, thread-safe client of the herder master API.

    ``masters`` is one URL, a comma/space separated string of URLs, or a
    sequence of URLs (``http://host:port``; ``/api/v1`` is added). Use as a
    context manager or call :meth:`close`.

    ``discovery`` (e.g. :class:`herder.client.discovery.MasterDiscovery`)
    adds masters found at request time after the configured ones; with it,
    ``masters`` may be omitted.
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

    # ------------------------------------------------------------- lifecycle

    def __enter__(self) -> HerderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

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
        :class:`NoMasterAvailable` when no master handled it, and
        :class:`RequestOutcomeUnknown` when a non-idempotent request may have
        been processed but its answer was lost.
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

    # ------------------------------------------------------------------ jobs

    def submit_job(self, spec: JobSubmit) -> JobView:
        """Submit a job. Resent after an ambiguous failure only when it has an idempotency key."""
        return self._call(
            JobView, "POST", "/jobs", json=spec, idempotent=spec.idempotency_key is not None
        )

    def get_job(self, job_id: int) -> JobView:
        return self._call(JobView, "GET", f"/jobs/{int(job_id)}", idempotent=True)

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobSummary]:
        params: dict[str, str | int | float] = {"limit": int(limit)}
        if state is not None:
            params["state"] = state
        return self._call(JobList, "GET", "/jobs", params=params, idempotent=True).jobs

    def cancel_job(self, job_id: int) -> JobView:
        return self._call(JobView, "POST", f"/jobs/{int(job_id)}/cancel", idempotent=True)

    def job_events(self, job_id: int, after: int = 0, limit: int | None = None) -> list[EventView]:
        params: dict[str, str | int | float] = {"after": int(after)}
        if limit is not None:
            params["limit"] = int(limit)
        return self._call(
            _EventList, "GET", f"/jobs/{int(job_id)}/events", params=params, idempotent=True
        ).events

    def get_task(self, task_id: int) -> TaskView:
        return self._call(TaskView, "GET", f"/tasks/{int(task_id)}", idempotent=True)

    # ------------------------------------------------------------------ logs

    def read_log(self, attempt_id: int, stream: str = "stdout", offset: int = 0) -> LogView:
        return self._call(
            LogView,
            "GET",
            f"/attempts/{int(attempt_id)}/log",
            params={"stream": stream, "offset": int(offset)},
            idempotent=True,
        )

    def read_full_log(self, attempt_id: int, stream: str = "stdout") -> str:
        """Read a log from the start, page by page, until it is complete or stops growing."""
        parts: list[str] = []
        offset = 0
        while True:
            page = self.read_log(attempt_id, stream, offset)
            parts.append(page.data)
            if page.complete or page.next_offset <= offset:
                return "".join(parts)
            offset = page.next_offset

    # ---------------------------------------------------------------- agents

    def register_agent(self, req: AgentRegister) -> AgentView:
        """Register (idempotent when the agent sends the id it keeps)."""
        return self._call(
            AgentView, "POST", "/agents", json=req, idempotent=req.agent_id is not None
        )

    def list_agents(self) -> list[AgentView]:
        return self._call(AgentList, "GET", "/agents", idempotent=True).agents

    def get_agent(self, agent_id: str) -> AgentView:
        return self._call(AgentView, "GET", f"/agents/{agent_id}", idempotent=True)

    def claim(
        self, agent_id: str, req: ClaimRequest, *, idempotent: bool | None = None
    ) -> ClaimResponse:
        """Complete, acknowledge and claim in one round trip (long-polls up to ``req.wait_s``).

        Resent after an ambiguous failure only when it carries no completions
        (offers lost that way return to the queue at their ack deadline).
        """
        timeout = httpx.Timeout(self._timeout, read=self._timeout + req.wait_s)
        return self._call(
            ClaimResponse,
            "POST",
            f"/agents/{agent_id}/claim",
            json=req,
            idempotent=(not req.completions) if idempotent is None else idempotent,
            timeout=timeout,
        )

    def ack(self, attempt_id: int, token: str) -> None:
        self._request(
            "POST",
            f"/attempts/{int(attempt_id)}/ack",
            json=AckRequest(token=token),
            idempotent=True,
        )

    def append_log(self, attempt_id: int, token: str, chunks: Sequence[LogChunk]) -> None:
        """Append log chunks (not resent after an ambiguous failure: it would duplicate them)."""
        self._request(
            "POST",
            f"/attempts/{int(attempt_id)}/log",
            json=LogAppend(token=token, chunks=list(chunks)),
            idempotent=False,
        )

    def complete(self, c: Completion) -> CompletionResult:
        """Report an attempt's end. 409 → :class:`StaleAttemptError`; never resent blindly."""
        return self._call(
            CompletionResult,
            "POST",
            f"/attempts/{int(c.attempt_id)}/complete",
            json=c,
            idempotent=False,
        )

    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse:
        return self._call(
            HeartbeatResponse, "POST", f"/agents/{agent_id}/heartbeat", json=hb, idempotent=True
        )

    # ----------------------------------------------------------------- blobs

    def missing_blobs(self, digests: Iterable[str]) -> list[str]:
        """The digests (of those given) the blob store lacks."""
        unique = list(dict.fromkeys(digests))
        missing: list[str] = []
        for i in range(0, len(unique), BLOB_QUERY_BATCH):
            batch = unique[i : i + BLOB_QUERY_BATCH]
            missing.extend(
                self._call(
                    BlobMissing,
                    "POST",
                    "/blobs/missing",
                    json=BlobQuery(digests=batch),
                    idempotent=True,
                ).missing
            )
        return missing

    def put_blob(self, digest: str, data: bytes) -> BlobStored:
        response = self._request("PUT", f"/blobs/{digest}", content=bytes(data), idempotent=True)
        return BlobStored.model_validate_json(response.content)

    def get_blob(self, digest: str) -> bytes:
        data = self._request("GET", f"/blobs/{digest}", idempotent=True).content
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BlobDigestError(digest, actual)
        return data

    def download_blob(self, digest: str, dest: Path | str, *, mode: int | None = None) -> int:
        """Stream a blob into ``dest`` (a temp file renamed into place); verify its sha256.

        Returns the number of bytes written.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                response = self._request("GET", f"/blobs/{digest}", idempotent=True, stream=True)
                try:
                    for chunk in response.iter_bytes(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                except httpx.TransportError as exc:
                    raise HerderClientError(
                        f"download of blob {digest} interrupted: {type(exc).__name__}: {exc}"
                    ) from exc
                finally:
                    response.close()
            actual = h.hexdigest()
            if actual != digest:
                raise BlobDigestError(digest, actual)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, dest)
            return size
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def upload_files(
        self, root: Path | str, relpaths: Iterable[str]
    ) -> dict[str, tuple[str, int, int]]:
        """Hash files under ``root``, upload those the store lacks (one ``missing`` query).

        Returns ``{relpath: (digest, size, mode)}``, keyed by each path as given
        and by its normalized form (``./src/a.c`` and ``src/a.c``).
        Paths that would leave ``root`` raise :class:`herder.paths.UnsafePath`.
        """
        root = Path(root)
        result: dict[str, tuple[str, int, int]] = {}
        where: dict[str, Path] = {}
        for rel in relpaths:
            norm = normalize_relpath(rel)
            if norm not in result:
                path = resolve_inside(root, norm)
                st = path.stat()
                digest = sha256_file(path)
                result[norm] = (digest, st.st_size, st.st_mode & 0o7777)
                where.setdefault(digest, path)
            result[rel] = result[norm]
        if not where:
            return result
        for digest in self.missing_blobs(list(where)):
            src = where.get(digest)
            if src is None:
                continue
            data = src.read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise HerderClientError(f"{src} changed while it was being uploaded")
            self.put_blob(digest, data)
        return result

    def iter_job_events(
        self, job_id: int, after: int = 0, *, poll_s: float = 0.5
    ) -> Iterator[EventView]:
        """Yield a job's events as they arrive, until the job reaches a final state."""
        final = {"succeeded", "failed", "cancelled"}
        while True:
            events = self.job_events(job_id, after=after)
            yield from events
            if events:
                after = events[-1].id
                continue
            if self.get_job(job_id).state in final:
                yield from self.job_events(job_id, after=after)
                return
            time.sleep(poll_s)


def _json_bytes(value: Any) -> bytes:
    """Serialize a plain JSON value (compact, UTF-8)."""
    return _jsonlib.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
