"""Request body bounds enforced while the body is read (issue 11).

A ``Content-Length`` past the bound is refused before a byte is read; a body
without one (chunked) is counted as it arrives and refused once it passes the
bound, so no request can make the master buffer more than the bound. Blob
uploads (``PUT /api/v1/blobs/…``) have their own, larger bound: their route
streams them to a temporary file instead of holding them.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BLOB_PREFIX = "/api/v1/blobs/"


class BodyTooLarge(HTTPException):
    """A request body past its bound: 413 (an HTTPException, so FastAPI's own body
    parsing lets it through to the API's error handler instead of a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_blob_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_blob_bytes = max_blob_bytes

    def limit_of(self, scope: Scope) -> int:
        if scope["method"] == "PUT" and scope["path"].startswith(BLOB_PREFIX):
            return self.max_blob_bytes
        return self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_of(scope)
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                # A length that is no number is refused too: never guessed at.
                status = 413 if value.isdigit() else 400
                code = "too_large" if status == 413 else "bad_request"
                message = too_large_message(limit) if status == 413 else "invalid Content-Length"
                body: dict[str, Any] = {"error": code, "message": message}
                await JSONResponse(body, status_code=status)(scope, receive, send)
                return
        received = 0

        async def bounded() -> Message:
            nonlocal received
            message: MutableMapping[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, bounded, send)
