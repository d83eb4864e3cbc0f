"""Run a master: open the store (migrating it), serve the API with uvicorn."""

from __future__ import annotations

import logging
import os
import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from herder.errors import DatabaseError
from herder.master.app import MasterConfig, create_app
from herder.store import Store

log = logging.getLogger("herder.master")

# Delivery knobs (herder.core.rules) read from the environment by `herder master`.
_STORE_ENV: dict[str, tuple[str, type]] = {
    "HERDER_INFRA_BUDGET": ("infra_budget", int),
    "HERDER_HEARTBEAT_GRACE_S": ("heartbeat_grace_s", float),
    "HERDER_RETRY_ELSEWHERE_S": ("retry_elsewhere_s", float),
    "HERDER_BLOCKLIST_THRESHOLD": ("blocklist_threshold", int),
    "HERDER_BLOCKLIST_FORGIVE_S": ("blocklist_forgive_s", float),
}
_CONFIG_ENV: dict[str, str] = {
    "HERDER_REAP_INTERVAL_S": "reap_interval_s",
    "HERDER_MAINTENANCE_TTL_S": "maintenance_ttl_s",
    # The master directory: heartbeat interval and timeout (default 3 intervals).
    "HERDER_MASTER_HEARTBEAT_S": "heartbeat_interval_s",
    "HERDER_MASTER_TIMEOUT_S": "heartbeat_timeout_s",
    # A store call answered as busy after this long (the database hangs).
    "HERDER_DB_TIMEOUT_S": "db_timeout_s",
}
# Input limits (issue 11): what one request may carry.
_LIMIT_ENV: dict[str, str] = {
    "HERDER_MAX_BODY_BYTES": "max_body_bytes",
    "HERDER_MAX_BLOB_BYTES": "max_blob_bytes",
    "HERDER_MAX_TASKS_PER_JOB": "max_tasks_per_job",
}


def default_advertise_url(host: str, port: int, scheme: str = "http") -> str:
    """``http://<listen host>:<port>`` (IPv6 bracketed); this machine's name for a wildcard host."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn() or socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def normalize_advertise_url(url: str) -> str:
    """An advertised URL: http(s)://host[:port][/prefix], without a trailing slash."""
    from urllib.parse import urlsplit

    cleaned = url.strip().rstrip("/")
    parts = urlsplit(cleaned)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"advertise URL {url!r} is not an http(s)://host[:port] URL")
    if parts.query or parts.fragment:
        raise ValueError(f"advertise URL {url!r} has a query or fragment")
    return cleaned


def store_options_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    source = os.environ if env is None else env
    out: dict[str, Any] = {}
    for name, (kwarg, kind) in _STORE_ENV.items():
        value = source.get(name)
        if value:
            try:
                out[kwarg] = kind(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a valid {kind.__name__}") from None
    return out


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.app
        app.state.stopping = True
        # Signal handlers run on the loop's thread under uvicorn; wake every
        # long-poll so in-flight claims and follows answer and shutdown is quick.
        app.state.service.stop()
        super().handle_exit(sig, frame)


def serve(
    db_url: str,
    host: str = "127.0.0.1",
    port: int = 6240,
    *,
    lease_s: float = 30.0,
    ack_timeout_s: float = 30.0,
    config: MasterConfig | None = None,
    access_log: bool = False,
    advertise_url: str | None = None,
    read_only: bool = False,
    admission_workers: int | None = None,
    admission_depth: int | None = None,
    write_wait_s: float | None = None,
    register_via: list[str] | None = None,
    register_token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> None:
    from herder.tlsconf import TlsConfigError, check_pair, server_context

    try:
        # Checked before the database is opened: a bad file is one line, not a traceback.
        if check_pair(tls_cert, tls_key):
            assert tls_cert is not None and tls_key is not None
            server_context(tls_cert, tls_key)
    except TlsConfigError as exc:
        raise SystemExit(f"herder master: {exc}") from None
    options = dict(lease_s=lease_s, ack_timeout_s=ack_timeout_s, **store_options_from_env())
    try:
        if read_only:  # a hot standby: never migrated, never written (herder.master.readonly)
            from herder.master.readonly import open_read_only_store

            store = open_read_only_store(db_url, **options)
        else:
            store = Store.open(db_url, migrate=True, **options)
    except DatabaseError as exc:  # a clear message and exit status 1, not a traceback
        log.error("event=master_start_failed error=%r", exc.message)
        raise SystemExit(f"herder master: {exc.message}") from None
    except RuntimeError as exc:  # ReadOnlyStoreError: the standby cannot serve this version
        log.error("event=master_start_failed error=%r", str(exc))
        raise SystemExit(f"herder master --read-only: {exc}") from None
    if config is None:
        config = MasterConfig()
        # Stable across restarts on the same address: a master restarted after
        # a crash takes its own maintenance lock back at once. (Two live
        # masters cannot listen on one address:port.)
        # The listen host is part of it: several masters of one machine may
        # share a port on different loopback or interface addresses.
        config.master_id = f"{socket.gethostname()}:{host}:{port}"
        for env, attr in (*_CONFIG_ENV.items(), *_LIMIT_ENV.items()):
            text = os.environ.get(env)
            if not text:
                continue
            try:
                value: float = int(text) if env in _LIMIT_ENV else float(text)
                if value <= 0:
                    raise ValueError
            except ValueError:
                raise SystemExit(
                    f"herder master: {env}={text!r}: expected a positive "
                    f"{'integer' if env in _LIMIT_ENV else 'number'}"
                ) from None
            setattr(config, attr, value)
    if read_only:
        config.role = "read-only"
    # The admission queue and read-only registration (`herder master` flags).
    if admission_workers is not None:
        config.admission_workers = admission_workers
    if admission_depth is not None:
        config.admission_depth = admission_depth
    if write_wait_s is not None:
        config.write_wait_s = write_wait_s
    if register_via:
        config.register_via = [normalize_advertise_url(u) for u in register_via]
    if register_token:
        config.register_token = register_token
    if advertise_url:
        config.url = normalize_advertise_url(advertise_url)
    elif config.url is None:
        config.url = default_advertise_url(host, port, "https" if tls_cert else "http")
    app = create_app(store, config)
    try:
        server = _Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                access_log=access_log,
                log_config=None,
                timeout_keep_alive=75,
                timeout_graceful_shutdown=10,
                # A long-polling agent is one coroutine, not a thread: thousands fit.
                limit_concurrency=None,
                backlog=4096,
                # HTTPS when a certificate is given (herder.tlsconf checked the pair above).
                ssl_certfile=tls_cert,
                ssl_keyfile=tls_key,
            ),
            app,
        )
        server.run()
    finally:
        store.close()
