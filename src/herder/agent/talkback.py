"""The agent's talkback endpoint (DESIGN §4; seeds/001, seeds/002).

A small authenticated HTTP server in the agent through which a master (or an
operator) tells it something at once instead of waiting for its next request:

========================  ===================================================
``POST /talkback/wake``    work arrived: claim now (202; latency only)
``POST /talkback/cancel``  ``{"attempt_id": N}``: kill that attempt (404 unknown)
``POST /talkback/mode``    ``{"mode": "master"}``: autonomous → master mode
``GET /talkback/status``   agent id, mode, slots, running attempts, free slots
========================  ===================================================

Every request needs ``Authorization: Bearer <token>``; the token is made at
agent start (or given with ``--talkback-token``) and sent to the master in the
registration, which keeps it out of every view. Errors are JSON
``{"error", "message"}`` like the master's: 401 unauthenticated, 400 bad JSON,
404 unknown attempt or path, 405, 413, 422 bad field, 501 not supported.
With the agent's ``--tls-cert``/``--tls-key`` it serves HTTPS (its URL is
``https://…``), and masters verify it against their ``--ca`` (``herder.tlsconf``).

Why the standard library's ``ThreadingHTTPServer`` in a daemon thread: the
agent is built of threads with no event loop, the endpoint serves a handful
of tiny requests, and every handler only flips agent state under its lock
(``wake`` starts the claim in its own thread), so nothing here needs an ASGI
stack. Nothing depends on talkback for correctness: an agent whose endpoint
cannot be reached still finds its work by claiming.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import ssl
import threading
from typing import Any, Protocol

from herder.agent.jsonhttp import HttpError as _Error
from herder.agent.jsonhttp import JsonHandler, JsonServer

log = logging.getLogger("herder.agent.talkback")

PREFIX = "/talkback"
MAX_BODY = 64 * 1024
DEFAULT_BIND = "127.0.0.1:0"


class TalkbackAgent(Protocol):
    """What the endpoint needs of :class:`herder.agent.daemon.Agent`."""

    agent_id: str | None

    def wake(self) -> str: ...
    def cancel_attempt(self, attempt_id: int, reason: str) -> None: ...
    def talkback_status(self) -> dict[str, Any]: ...


def new_token() -> str:
    return secrets.token_urlsafe(32)


def parse_bind(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; port 0 = a free port) → (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"talkback address {value!r}: expected HOST:PORT (port 0: any free port)")
    return host, int(port)


class _Server(JsonServer):
    talkback: TalkbackServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(JsonHandler):
    server: _Server
    server_version = "herder-talkback"
    log = log
    log_prefix = "talkback"

    def _body(self) -> dict[str, Any]:
        return self._read_json(MAX_BODY)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization") or ""
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        return hmac.compare_digest(given.strip().encode(), self.server.talkback.token.encode())

    def _handle(self, method: str) -> None:
        tb = self.server.talkback
        try:
            if not self._authorized():
                # Read (and drop) a body so the connection stays usable.
                try:
                    self._body()
                except _Error:
                    pass
                raise _Error(401, "unauthorized", "talkback needs 'Authorization: Bearer <token>'")
            path = self.path.split("?", 1)[0].rstrip("/")
            routes = {
                f"{PREFIX}/wake": ("POST", tb.do_wake),
                f"{PREFIX}/cancel": ("POST", tb.do_cancel),
                f"{PREFIX}/mode": ("POST", tb.do_mode),
                f"{PREFIX}/status": ("GET", tb.do_status),
            }
            route = routes.get(path)
            if route is None:
                raise _Error(404, "not_found", f"no talkback resource {path!r}")
            if route[0] != method:
                raise _Error(405, "method_not_allowed", f"{path} takes {route[0]}")
            body = self._body() if method == "POST" else {}
            status, answer = route[1](body)
            self._send(status, answer)
        except _Error as exc:
            self._send_error(exc)
        except Exception as exc:
            self._send_internal(exc)


class TalkbackServer:
    """The endpoint of one agent: ``start()`` binds and serves in a daemon thread."""

    def __init__(
        self,
        agent: TalkbackAgent,
        bind: str = DEFAULT_BIND,
        token: str | None = None,
        advertise_host: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.agent = agent
        self.host, self.port = parse_bind(bind)
        self.token = token or new_token()
        self.advertise_host = advertise_host
        # HTTPS (herder.tlsconf): the master verifies it against its --ca.
        self.ssl_context = ssl_context
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Bind and serve; returns the URL to register with the master."""
        cls = _Server6 if ":" in self.host else _Server
        server = cls((self.host, self.port), _Handler)
        server.talkback = self
        server.ssl_context = self.ssl_context
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name="herder-talkback",
            daemon=True,
        )
        self._thread.start()
        log.info("event=talkback_listening url=%s", self.url)
        return self.url

    @property
    def url(self) -> str:
        host = self.advertise_host or self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    # ------------------------------------------------------------ handlers

    def do_wake(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        result = self.agent.wake()
        return 202, {"agent_id": self.agent.agent_id, "wake": result}

    def do_cancel(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        aid = body.get("attempt_id")
        if isinstance(aid, bool) or not isinstance(aid, int):
            raise _Error(422, "invalid_request", "attempt_id: an integer is required")
        reason = body.get("reason")
        reason = reason if isinstance(reason, str) and reason else "cancelled through talkback"
        status = self.agent.talkback_status()
        if aid not in status.get("running", []):
            raise _Error(404, "not_found", f"attempt {aid} is not running on this agent")
        self.agent.cancel_attempt(aid, reason[:500])
        return 200, {"attempt_id": aid, "cancelled": True}

    def do_mode(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        mode = body.get("mode", "master")
        if mode != "master":
            raise _Error(422, "invalid_request", "mode: only 'master' can be asked for")
        switch = getattr(self.agent, "request_master_mode", None)
        if switch is None:
            raise _Error(
                501,
                "not_implemented",
                "this agent has no autonomous mode to leave (request_master_mode is missing)",
            )
        switch()
        return 200, {"agent_id": self.agent.agent_id, "mode": getattr(self.agent, "mode", "master")}

    def do_status(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, self.agent.talkback_status()


__all__ = ["DEFAULT_BIND", "TalkbackAgent", "TalkbackServer", "new_token", "parse_bind"]
