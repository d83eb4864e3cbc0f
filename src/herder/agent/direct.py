"""Direct execution on an agent (DESIGN §9; seeds/003: the rake server).

A client (``herder run --direct``) asks each agent its cost and sends each
remote command to the cheapest one, with no master in between:

=================================  ==============================================
``GET /direct/cost``               ``{"running", "slots", "cost", "executed"}``
``POST /direct/blobs/missing``     ``{"digests": [...]}`` → ``{"missing": [...]}``
``PUT /direct/blobs/{digest}``     raw bytes into the blob cache (digest verified)
``GET /direct/blobs/{digest}``     raw bytes of a cached blob (big outputs)
``POST /direct/execute``           one command (a ``TaskSpec``) → exit status,
                                   stdout, stderr, every output file
=================================  ==============================================

``cost`` is (commands being handled, running or waiting for a slot) over the
slots, plus the configured surcharge: seeds/003's "cost equal to the number of
commands currently in its queue", comparable between agents of unequal size.

The command runs through the agent's own :class:`Executor` (same sandbox,
staging, path checks and output collection as a farm attempt); its spec is
validated by ``api_models.TaskSpec`` and ``RequiredFile`` like a submission.
Outputs up to ``INLINE_OUTPUT_MAX`` ride base64 in the answer; bigger ones go
into the blob cache and are fetched with ``GET /direct/blobs/{digest}``.
stdout and stderr are each sent up to ``LOG_MAX`` bytes (the rest is cut,
and the answer says so).

Who may use it: a client's address must be in the allow-list of networks
(``--direct-allow``, loopback only by default) and, when a token is
configured (``--direct-token``), it must send ``Authorization: Bearer``. A
refusal is a JSON error (403 / 401) the client turns into one line.

Why the standard library's ``ThreadingHTTPServer`` (as ``talkback``): the
agent has no event loop, each request is one blocking command on its own
thread, and the executor is thread-safe; an ASGI stack would add nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import itertools
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from herder.agent.execspec import ExecSpec
from herder.agent.executor import Executor
from herder.agent.jsonhttp import HttpError as _Error
from herder.agent.jsonhttp import JsonHandler, JsonServer
from herder.agent.talkback import parse_bind
from herder.api_models import TaskSpec

log = logging.getLogger("herder.agent.direct")

PREFIX = "/direct"
MAX_JSON_BODY = 4 * 1024 * 1024  # an execute or missing-blobs request
MAX_BLOB = 512 * 1024 * 1024  # one PUT blob
LOG_MAX = 4 * 1024 * 1024  # bytes of stdout (and of stderr) sent back
INLINE_OUTPUT_MAX = 256 * 1024  # outputs up to this ride in the answer
DEFAULT_ALLOW = "127.0.0.0/8,::1"
# Direct sandboxes get ids far above any farm attempt id (sandbox a<id>).
DIRECT_ID_BASE = 1 << 50
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(value: str | Iterable[str]) -> list[Network]:
    """``"127.0.0.0/8,::1"`` → networks; ValueError naming the bad entry."""
    items = value.split(",") if isinstance(value, str) else list(value)
    nets: list[Network] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"--direct-allow: {item!r} is not an address or network") from None
    if not nets:
        raise ValueError("--direct-allow: no network given")
    return nets


@dataclass
class DirectConfig:
    bind: str
    slots: int
    surcharge: float = 0.0
    allow: str = DEFAULT_ALLOW
    token: str | None = None
    # HTTPS (herder.tlsconf): a PEM certificate chain and its key; None: plain HTTP.
    tls_cert: str | None = None
    tls_key: str | None = None


class DirectServer:
    """The direct listener of one agent: ``start()`` binds and serves in a daemon thread."""

    def __init__(self, executor: Executor, config: DirectConfig) -> None:
        self.executor = executor
        self.config = config
        self.host, self.port = parse_bind(config.bind)
        self.allow = parse_allow(config.allow)
        self.token = config.token
        self._slots = threading.BoundedSemaphore(config.slots)
        self._lock = threading.Lock()
        self._handling = 0  # commands running or waiting for a slot
        self.executed = 0  # commands run to an answer since start
        self._ids = itertools.count(DIRECT_ID_BASE + os.getpid() * 1_000_000)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        cls = _Server6 if family == socket.AF_INET6 else _Server
        server = cls((self.host, self.port), _Handler)
        server.direct = self
        if self.config.tls_cert and self.config.tls_key:
            from herder.tlsconf import server_context

            try:
                server.ssl_context = server_context(self.config.tls_cert, self.config.tls_key)
            except ValueError:
                server.server_close()
                raise
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="herder-direct", daemon=True
        )
        self._thread.start()
        log.info(
            "event=direct_listening address=%s:%d slots=%d allow=%s token=%s tls=%s",
            self.host,
            self.port,
            self.config.slots,
            ",".join(map(str, self.allow)),
            "yes" if self.token else "no",
            "yes" if server.ssl_context is not None else "no",
        )
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -------------------------------------------------------------- checks

    def check_client(self, address: str, authorization: str | None) -> None:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            raise _Error(403, "forbidden", f"client address {address!r} not understood") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip in net for net in self.allow):
            raise _Error(
                403,
                "forbidden",
                f"client {ip} is not in this agent's --direct-allow list",
            )
        if self.token is not None:
            scheme, _, given = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.token.encode()
            ):
                raise _Error(401, "unauthorized", "this agent needs its direct token (Bearer)")

    # ------------------------------------------------------------ handlers

    def cost(self) -> dict[str, Any]:
        with self._lock:
            n, done = self._handling, self.executed
        slots = self.config.slots
        return {
            "running": n,
            "slots": slots,
            "cost": n / slots + self.config.surcharge,
            "executed": done,
        }

    def missing(self, body: dict[str, Any]) -> dict[str, Any]:
        digests = body.get("digests")
        if not isinstance(digests, list) or not all(
            isinstance(d, str) and _DIGEST_RE.fullmatch(d) for d in digests
        ):
            raise _Error(422, "invalid", "'digests' must be a list of sha256 hex digests")
        return {"missing": [d for d in digests if not self.executor.blobs.path(d).exists()]}

    def put_blob(self, digest: str, data: bytes) -> dict[str, Any]:
        if not self.executor.blobs.add_verified(digest, data):
            raise _Error(422, "digest_mismatch", f"the bytes sent do not hash to {digest}")
        return {"digest": digest, "size": len(data)}

    def execute(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            spec = TaskSpec.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise _Error(422, "invalid", f"{where}: {first.get('msg')}") from None
        lacking = sorted(
            {r.digest for r in spec.requires if not self.executor.blobs.path(r.digest).exists()}
        )
        if lacking:
            raise _Error(409, "missing_blobs", f"{len(lacking)} required blob(s) not sent first")
        with self._lock:
            self._handling += 1
        try:
            with self._slots:
                return self._run(spec)
        finally:
            with self._lock:
                self._handling -= 1

    def _run(self, spec: TaskSpec) -> dict[str, Any]:
        es = ExecSpec(
            attempt_id=next(self._ids),
            command=spec.command,
            env=dict(spec.env),
            requires=list(spec.requires),
            outputs=spec.outputs,
            timeout_s=spec.timeout_s,
        )
        ex, res = self.executor.run(es)
        try:
            answer: dict[str, Any] = {
                "outcome": res.outcome,
                "exit_code": res.exit_code,
                "error": res.error,
                "duration_s": res.duration_s,
            }
            for stream, path in ex.log_paths.items():
                text, cut = _read_log(path)
                answer[stream] = text
                answer[f"{stream}_truncated"] = cut
            outputs = []
            for of, path in res.outputs:
                item: dict[str, Any] = of.model_dump()
                if of.size <= INLINE_OUTPUT_MAX:
                    item["data"] = base64.b64encode(path.read_bytes()).decode("ascii")
                else:
                    self._cache_file(of.digest, path)
                outputs.append(item)
            answer["outputs"] = outputs
        finally:
            ex.cleanup(background=True)
        with self._lock:
            self.executed += 1
        log.info(
            "event=direct_executed outcome=%s exit_code=%s outputs=%d duration_s=%.3f",
            res.outcome,
            res.exit_code,
            len(answer["outputs"]),
            res.duration_s,
        )
        return answer

    def _cache_file(self, digest: str, path: os.PathLike[str]) -> None:
        dest = self.executor.blobs.path(digest)
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{digest}.{os.getpid()}.{threading.get_ident()}.part"
        with open(path, "rb") as src, open(tmp, "wb") as out:
            h = hashlib.sha256()
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest:
            tmp.unlink()
            raise _Error(500, "output_changed", "an output changed while it was being kept")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)


def _read_log(path: os.PathLike[str]) -> tuple[str, bool]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(LOG_MAX + 1)
    except FileNotFoundError:
        return "", False
    cut = len(data) > LOG_MAX
    return data[:LOG_MAX].decode(errors="replace"), cut


class _Server(JsonServer):
    request_queue_size = 128
    direct: DirectServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(JsonHandler):
    server: _Server
    server_version = "herder-direct"
    log = log
    log_prefix = "direct"

    def _raw(self, limit: int) -> bytes:
        return self._read_raw(limit)

    def _json(self) -> dict[str, Any]:
        return self._read_json(MAX_JSON_BODY)

    def _handle(self, method: str) -> None:
        d = self.server.direct
        try:
            try:
                d.check_client(self.client_address[0], self.headers.get("Authorization"))
            except _Error:
                self.close_connection = True  # an unread body must not be parsed as a request
                raise
            path = self.path.split("?", 1)[0].rstrip("/")
            if path.startswith(f"{PREFIX}/blobs/") and path != f"{PREFIX}/blobs/missing":
                digest = path.rsplit("/", 1)[1]
                if not _DIGEST_RE.fullmatch(digest):
                    raise _Error(404, "not_found", f"{digest!r} is not a sha256 hex digest")
                if method == "PUT":
                    self._send(200, d.put_blob(digest, self._raw(MAX_BLOB)))
                elif method == "GET":
                    p = d.executor.blobs.path(digest)
                    try:
                        data = p.read_bytes()
                    except FileNotFoundError:
                        raise _Error(404, "not_found", f"no blob {digest}") from None
                    self._send(200, data)
                else:
                    raise _Error(405, "method_not_allowed", f"{path} takes GET or PUT")
                return
            routes: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
                f"{PREFIX}/cost": ("GET", lambda: d.cost()),
                f"{PREFIX}/blobs/missing": ("POST", lambda: d.missing(self._json())),
                f"{PREFIX}/execute": ("POST", lambda: d.execute(self._json())),
            }
            route = routes.get(path)
            if route is None:
                raise _Error(404, "not_found", f"no direct resource {path!r}")
            if route[0] != method:
                raise _Error(405, "method_not_allowed", f"{path} takes {route[0]}")
            self._send(200, route[1]())
        except _Error as exc:
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to answer
        except Exception as exc:
            self._send_internal(exc)


__all__ = [
    "DEFAULT_ALLOW",
    "INLINE_OUTPUT_MAX",
    "LOG_MAX",
    "DirectConfig",
    "DirectServer",
    "parse_allow",
    "run_direct_only",
]


def run_direct_only(
    state_dir: Path, work_root: Path, config: DirectConfig, kill_grace_s: float = 2.0
) -> int:
    """An agent that serves only direct work (no master: it never registers or claims).

    The same state-dir lock, blob cache (``state_dir/blobs``) and sandbox root
    as a farm agent of that state dir. Runs until SIGTERM/SIGINT; 2 after one
    ``error:`` line when the state dir is taken or the address cannot be bound.
    """
    import sys

    from herder.agent.daemon import _signals
    from herder.statelock import StateDirBusy, StateLock

    stop = threading.Event()
    try:
        with StateLock(state_dir), _signals(stop.set):
            executor = Executor(work_root, state_dir / "blobs", kill_grace_s=kill_grace_s)
            executor.purge_stale()
            server = DirectServer(executor, config)
            try:
                server.start()
            except (OSError, ValueError) as exc:
                print(f"error: --direct-listen {config.bind}: {exc}", file=sys.stderr, flush=True)
                return 2
            try:
                while not stop.wait(0.5):
                    pass
            finally:
                server.stop()
                executor.kill_all("released", "agent shutting down")
                executor.cleaner.flush(timeout=10.0)
                log.info("event=stopped executed=%d", server.executed)
    except StateDirBusy as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
