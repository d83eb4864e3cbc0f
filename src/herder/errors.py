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
