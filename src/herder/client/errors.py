"""Exceptions raised by :class:`herder.client.HerderClient`.

Every exception the client raises on purpose derives from
:class:`HerderClientError`, so callers (CLI, agent) can catch one base class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class HerderClientError(Exception):
    """Base class of every error raised by the client library."""


class ApiError(HerderClientError):
    """A master answered with an HTTP error (DESIGN §4: ``{error, message, detail}``)."""

    def __init__(self, status: int, code: str, message: str, detail: object | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


class NotFoundError(ApiError):
    """HTTP 404: the job, task, attempt, agent or blob does not exist."""


class ConflictError(ApiError):
    """HTTP 409 other than a stale attempt."""


class StaleAttemptError(ConflictError):
    """HTTP 409 ``stale_attempt``: the attempt is no longer the task's current one (§5).

    The agent discards its result and stops the process.
    """


class RequestOutcomeUnknown(HerderClientError):
    """A non-idempotent request may have reached a master, but no answer came back.

    The client does not resend it to another master (it could be applied
    twice); the caller decides (e.g. the agent keeps the completion in its
    journal and checks the task later).
    """

    def __init__(self, method: str, url: str, cause: BaseException) -> None:
        super().__init__(
            f"{method} {url}: the request may have been processed, but the answer was lost "
            f"({type(cause).__name__}: {cause})"
        )
        self.method = method
        self.url = url
        self.cause = cause


@dataclass(frozen=True)
class AttemptRecord:
    """What happened when one master was tried for one request."""

    server: str
    outcome: str  # unreachable, timeout, broken, gateway, tls (dead); busy, no_service
    message: str
    priority: bool


#: Outcomes of an attempt where the master never answered: it went on *dead servers*.
DEAD_OUTCOMES = frozenset({"unreachable", "timeout", "broken", "gateway", "tls"})


def dead_reason(a: AttemptRecord) -> str:
    """Why a master counts as dead, in a few words (``connection refused``, ``timed out``)."""
    msg = a.message.lower()
    if a.outcome == "gateway":
        return "gateway error" + (f": {a.message}" if a.message else "")
    if a.outcome == "tls":
        return "TLS certificate verify failed"
    if a.outcome == "timeout" or "timed out" in msg or "timeout" in msg:
        return "timed out"
    if "refused" in msg:
        return "connection refused"
    if "reset" in msg:
        return "connection reset"
    if a.outcome == "broken":
        return "connection closed"
    return a.message or "unreachable"


def describe_attempts(attempts: Sequence[AttemptRecord]) -> str:
    """``http://a no_service (read-only), http://b dead (connection refused)``.

    Each master once, in the order first tried, with what it said last.
    """
    last: dict[str, AttemptRecord] = {}
    for a in attempts:
        last[a.server] = a  # an update keeps the key where it was first inserted
    parts = []
    for a in last.values():
        if a.outcome in DEAD_OUTCOMES:
            parts.append(f"{a.server} dead ({dead_reason(a)})")
            continue
        flag = " with priority" if a.priority and a.outcome == "busy" else ""
        parts.append(f"{a.server} {a.outcome}{flag}" + (f" ({a.message})" if a.message else ""))
    return ", ".join(parts)


class NoMasterAvailable(HerderClientError):
    """No master could handle the request (seeds/004: servers to try ran out, flag on).

    ``attempts`` lists what each try gave (each busy master twice: the second
    time with the priority flag); ``retry_after`` is the smallest Retry-After
    a busy master sent (seconds), when any did. The message names every master
    tried and what each said.
    """

    def __init__(
        self,
        method: str,
        path: str,
        attempts: Sequence[AttemptRecord],
        *,
        retry_after: float | None = None,
        note: str = "",
    ) -> None:
        self.method = method
        self.path = path
        self.attempts = list(attempts)
        self.retry_after = retry_after
        # ``note``: why there was no master to try at all (when ``attempts`` is empty).
        tried = (
            describe_attempts(self.attempts) if self.attempts else note or "no master configured"
        )
        super().__init__(f"no master could handle {method} {path}: {tried}")

    @property
    def all_declined(self) -> bool:
        """Every master tried answered no-service: waiting for one will not help."""
        return bool(self.attempts) and all(a.outcome == "no_service" for a in self.attempts)


class WaitDeclined(NoMasterAvailable):
    """Every master was busy and the caller chose not to wait with priority (``--no-wait``).

    ``attempts`` are the busy answers (and the dead or no-service masters) of the round.
    """

    def __init__(
        self,
        method: str,
        path: str,
        attempts: Sequence[AttemptRecord],
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(method, path, attempts, retry_after=retry_after)
        self.args = (
            f"every master is busy for {method} {path} "
            f"({describe_attempts(self.attempts)}); not waiting",
        )


class BlobDigestError(HerderClientError):
    """Downloaded bytes do not hash to the digest that was asked for."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"blob {expected}: received data hashes to {actual}")
        self.expected = expected
        self.actual = actual


class MasterOutageTimeout(NoMasterAvailable):
    """No master answered within the client's master timeout (``master_timeout``).

    Raised only by a client that rides out outages (:class:`herder.client.outage.OutagePolicy`).
    ``waited`` is how long it waited (seconds; 0 when the timeout is 0);
    ``attempts`` are the tries of its last round. Nothing was cancelled: a
    job the client followed goes on in the farm.
    """

    def __init__(
        self,
        method: str,
        path: str,
        attempts: Sequence[AttemptRecord],
        *,
        waited: float,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(method, path, attempts, retry_after=retry_after)
        self.waited = waited
