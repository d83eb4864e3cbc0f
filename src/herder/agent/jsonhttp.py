"""The plumbing of the agent's two small HTTP listeners (talkback, direct mode).

Both are the standard library's ``ThreadingHTTPServer`` in a daemon thread (the
agent is built of threads with no event loop; see their modules for why that
suffices), answering JSON with ``{"error", "message"}`` on failure like the
master. This module holds what they share: the server classes (TLS on every
connection when given a context), the error that a handler raises to answer a
status, sending a body, and method dispatch.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HttpError(Exception):
    """Answer ``status`` with ``{"error": code, "message": message}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class JsonServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # Set before serving: every connection speaks TLS (herder.tlsconf). The
    # handshake runs in the connection's thread, not in the accept loop, so a
    # client that connects and says nothing cannot stall the listener.
    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        ctx = self.ssl_context
        if ctx is None:
            super().finish_request(request, client_address)
            return
        from herder.tlsconf import accept_tls

        assert isinstance(request, socket.socket)
        tls = accept_tls(ctx, request, client_address)
        if tls is None:
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            # The plain socket was detached into ``tls``: the caller's shutdown of it is a no-op.
            self.shutdown_request(tls)


class JsonHandler(BaseHTTPRequestHandler):
    """Sends JSON (or bytes) answers; ``do_*`` call ``_handle(method)``."""

    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without TCP_NODELAY each answer would
    # wait for the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True
    log: logging.Logger
    log_prefix = "agent_http"  # events: <prefix>_request, <prefix>_error

    def log_message(self, format: str, *args: Any) -> None:
        self.log.debug("event=%s_request %s", self.log_prefix, format % args)

    def _read_raw(self, limit: int) -> bytes:
        """The body (``Content-Length``; none: empty); 413 past ``limit`` bytes."""
        length = (self.headers.get("Content-Length") or "0").strip() or "0"
        if not length.isdigit():
            raise HttpError(400, "bad_request", "invalid Content-Length")
        n = int(length)
        if n > limit:
            self.close_connection = True  # the body is not read
            raise HttpError(413, "too_large", f"body larger than {limit} bytes")
        return self.rfile.read(n) if n else b""

    def _read_json(self, limit: int) -> dict[str, Any]:
        """The body as a JSON object (an empty body: ``{}``)."""
        raw = self._read_raw(limit)
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise HttpError(400, "malformed_json", "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HttpError(400, "malformed_json", "the request body must be a JSON object")
        return data

    def _send(
        self, status: int, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> None:
        if isinstance(body, bytes):
            data, ctype = body, "application/octet-stream"
        else:
            data, ctype = json.dumps(body).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, exc: HttpError) -> None:
        extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        self._send(exc.status, {"error": exc.code, "message": exc.message}, extra)

    def _send_internal(self, exc: Exception) -> None:
        """Never a stack trace on the wire: the log has it."""
        self.log.exception("event=%s_error path=%s", self.log_prefix, self.path)
        self._send(500, {"error": "internal", "message": f"agent error: {type(exc).__name__}"})

    def _handle(self, method: str) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")
