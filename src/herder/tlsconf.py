"""TLS contexts of herder's listeners and clients, and how TLS failures are worded (DESIGN §11).

Servers (the master's uvicorn, the agent's talkback and direct listeners) load
a certificate chain and key with :func:`server_context`; a file that is
missing, unreadable or not a matching pair is one :class:`TlsConfigError`
line, checked at start before anything listens.

Clients verify what they reach over ``https://``:

* against the CA bundle given by ``--ca PATH`` or ``$HERDER_CA``
  (:func:`default_ca`), else the system trust store (OpenSSL's default
  paths, not a bundle shipped with a Python package: a farm CA an operator
  installed system-wide is trusted as any other);
* ``http://`` URLs are untouched: a context is only used by TLS connections,
  so one client may mix both kinds of URL.

A verification failure is reported as one line, :func:`verify_failure_line`:
``TLS: certificate verify failed for https://host:port: <OpenSSL's reason>``.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from herder.client.errors import AttemptRecord, NoMasterAvailable

log = logging.getLogger("herder.tls")

CA_ENV = "HERDER_CA"
# A client that opens a connection to a TLS listener and sends nothing must not
# hold its thread longer than this (the handshake runs in the connection's thread).
HANDSHAKE_TIMEOUT_S = 10.0
_TLS_HANDSHAKE_RECORD = 0x16  # first byte of every TLS ClientHello

__all__ = [
    "CA_ENV",
    "TlsConfigError",
    "TlsVerifyError",
    "TlsWarnings",
    "accept_tls",
    "check_pair",
    "client_context",
    "client_verify",
    "default_ca",
    "server_context",
    "set_default_ca",
    "verify_error",
    "verify_failure_line",
]


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; ``str()`` is one line."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return str(exc) or type(exc).__name__


def check_pair(cert: str | Path | None, key: str | Path | None, *, what: str = "--tls") -> bool:
    """Both or neither of ``--tls-cert`` and ``--tls-key``; True when TLS is asked for."""
    if bool(cert) != bool(key):
        missing = f"{what}-key" if cert else f"{what}-cert"
        raise TlsConfigError(f"TLS: {what}-cert and {what}-key go together: {missing} is missing")
    return bool(cert)


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server-side context serving ``cert`` (a PEM chain, leaf first) with ``key``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path, kind in ((cert, "certificate"), (key, "key")):
        if not Path(path).is_file():
            raise TlsConfigError(f"TLS: {kind} {path}: no such file")
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"TLS: cannot use certificate {cert} with key {key}: {_reason(exc)}"
        ) from None
    return ctx


# ----------------------------------------------------------------- clients

_override_ca: str | None = None
_system: ssl.SSLContext | None = None
_system_lock = threading.Lock()


def set_default_ca(path: str | Path | None) -> None:
    """The CA bundle of this process's clients (the CLI's ``--ca``), before ``$HERDER_CA``."""
    global _override_ca
    _override_ca = str(path) if path else None


def default_ca() -> str | None:
    """``--ca`` of this process, else ``$HERDER_CA``, else None (the system trust store)."""
    if _override_ca:
        return _override_ca
    value = os.environ.get(CA_ENV, "").strip()
    return value or None


def client_context(ca: str | Path | None = None) -> ssl.SSLContext:
    """A client context verifying servers against ``ca`` (None: the system trust store)."""
    global _system
    if ca is None:
        # Loading the system store costs milliseconds: share one (contexts are thread-safe).
        with _system_lock:
            if _system is None:
                _system = ssl.create_default_context()
            return _system
    if not Path(ca).is_file():
        raise TlsConfigError(f"TLS: CA bundle {ca}: no such file")
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"TLS: cannot load CA bundle {ca}: {_reason(exc)}") from None


def client_verify(verify: bool | str | Path | ssl.SSLContext = True) -> ssl.SSLContext | bool:
    """What httpx's ``verify=`` gets: True → :func:`default_ca` (else the system store);
    a path → that CA bundle; a context as it is; False → no verification."""
    if verify is False:
        return False
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is True:
        return client_context(default_ca())
    return client_context(verify)


def verify_error(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure under ``exc`` (httpx wraps it twice), if any."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _origin(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    return f"{parts.scheme}://{parts.netloc}"


def verify_failure_line(url: str, err: ssl.SSLCertVerificationError) -> str:
    """``TLS: certificate verify failed for https://host:port: <reason>``."""
    reason = err.verify_message or (str(err.reason) if err.reason else "") or str(err)
    return f"TLS: certificate verify failed for {_origin(url)}: {reason}"


class TlsVerifyError(NoMasterAvailable):
    """No master handled the request, and one at least failed certificate verification.

    Why a dead server and not a busy one, and why fail fast: a master whose
    certificate cannot be verified cannot be contacted safely, so seeds/004
    puts it on *dead servers* for that request and the other masters are
    still tried (one misconfigured master does not stop a farm). It is never
    *busy*: asking it again with the priority flag cannot help. And a wrong CA
    or certificate does not heal by waiting, so a client that rides out
    outages (the CLI) does not wait for it: it raises this at once, one line,
    ``TLS: certificate verify failed for URL: reason``. An agent, which backs
    off and retries on :class:`NoMasterAvailable`, goes on retrying (a
    certificate may be fixed while it runs).
    """

    def __init__(
        self,
        method: str,
        path: str,
        attempts: Sequence[AttemptRecord],
        line: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(method, path, attempts, retry_after=retry_after)
        self.line = line
        self.args = (line,)

    def __str__(self) -> str:
        return self.line


class TlsWarnings:
    """Log a certificate verification failure once per endpoint as a warning, then at debug.

    For the master's talkback calls (cancels, wake-ups): an agent whose
    certificate this master cannot verify is a configuration error an
    operator must see, but every cancel and wake round must not repeat it.
    """

    MAX_KEPT = 10_000

    def __init__(self, logger: logging.Logger, event: str) -> None:
        self.log = logger
        self.event = event
        self._seen: set[str] = set()

    def warn(self, url: str, exc: BaseException, **fields: object) -> bool:
        """True (and logged) when ``exc`` is a verification failure of ``url``."""
        err = verify_error(exc)
        if err is None:
            return False
        origin = _origin(url)
        first = origin not in self._seen
        if first and len(self._seen) < self.MAX_KEPT:
            self._seen.add(origin)
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        self.log.log(
            logging.WARNING if first else logging.DEBUG,
            "event=%s url=%s%s error=%r",
            self.event,
            origin,
            extra,
            verify_failure_line(url, err),
        )
        return True


# ------------------------------------------------------- threaded servers


def _plain_http_answer(sock: socket.socket) -> None:
    """Someone spoke plain HTTP to a TLS listener: say so in plain HTTP, then close."""
    body = b'{"error":"tls_required","message":"this listener speaks TLS: use https://"}'
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        sock.recv(65536)  # the request head: unread, the close would reset the answer away
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def accept_tls(
    ctx: ssl.SSLContext, sock: socket.socket, peer: object = None
) -> ssl.SSLSocket | None:
    """The TLS side of one accepted connection (handshake done), or None (closed).

    Runs in the connection's own thread, never in the accept loop: a client
    that connects and stays silent holds only its thread, and only for
    :data:`HANDSHAKE_TIMEOUT_S`.
    """
    previous = sock.gettimeout()
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        first = sock.recv(1, socket.MSG_PEEK)
        if not first:
            return None
        if first[0] != _TLS_HANDSHAKE_RECORD:
            _plain_http_answer(sock)
            return None
        tls = ctx.wrap_socket(sock, server_side=True)
    except (OSError, ssl.SSLError) as exc:
        log.debug("event=tls_handshake_failed peer=%s error=%r", peer, _reason(exc))
        return None
    tls.settimeout(previous)
    return tls
