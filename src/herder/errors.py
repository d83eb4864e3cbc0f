"""Domain errors. The master maps each to a JSON error with a code (DESIGN §4)."""

from __future__ import annotations


class HerderError(Exception):
    code = "error"
    status = 400

    def __init__(self, message: str, *, detail: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NotFound(HerderError):
    code = "not_found"
    status = 404


class InvalidRequest(HerderError):
    code = "invalid_request"
    status = 422


class Conflict(HerderError):
    code = "conflict"
    status = 409


class StaleAttempt(HerderError):
    """A fenced write from an attempt that is no longer the task's current one (DESIGN §5)."""

    code = "stale_attempt"
    status = 409


class DigestMismatch(HerderError):
    code = "digest_mismatch"
    status = 422


class DatabaseError(HerderError):
    """The database failed the request (``herder.store.dberrors`` classifies why).

    ``retry_after`` (seconds) is how long a client should wait before trying
    again; the master sends it as ``Retry-After``.
    """

    code = "database_error"
    status = 503
    retry_after: float = 2.0


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached or went away: a busy deferral (DESIGN §7)."""

    code = "busy"
    status = 503


class DatabaseBusy(DatabaseError):
    """Locked or overloaded beyond the store's waits: a busy deferral (DESIGN §7)."""

    code = "busy"
    status = 503
    retry_after = 1.0


class DatabaseFull(DatabaseError):
    """The database's disk is full; the transaction rolled back, nothing changed.

    507 rather than a busy deferral: every master shares the database, so no
    alternate can do better, and the client shows the reason at once.
    """

    code = "database_full"
    status = 507
    retry_after = 10.0


class CommitOutcomeUnknown(DatabaseError):
    """The connection was lost while committing: the change may or may not be in.

    504, which clients treat like a gateway that lost the answer: an idempotent
    request is sent again (completions are fenced, so a repeat is harmless), a
    non-idempotent one is reported as of unknown outcome instead of repeated.
    """

    code = "outcome_unknown"
    status = 504
