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
    outcome: str  # unreachable, timeout, broken, busy, no_service, gateway
    message: str
    priority: bool


class NoMasterAvailable(HerderClientError):
    """Every master was tried (twice, the second time with the priority flag) and none answered.

    ``attempts`` lists what each try gave; ``retry_after`` is the smallest
    Retry-After a busy master sent (seconds), when any did.
    """

    def __init__(
        self,
        method: str,
        path: str,
        attempts: Sequence[AttemptRecord],
        *,
        retry_after: float | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.attempts = list(attempts)
        self.retry_after = retry_after
        if self.attempts:
            tried = "; ".join(
                f"{a.server}: {a.outcome}{' (priority)' if a.priority else ''}"
                + (f" ({a.message})" if a.message else "")
                for a in self.attempts
            )
        else:
            tried = "no master configured"
        super().__init__(f"no master could handle {method} {path}: {tried}")


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
