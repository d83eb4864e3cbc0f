"""A throwaway PostgreSQL cluster for the test session.

``HERDER_TEST_PG_DSN`` (a libpq URL of a maintenance database, e.g.
``postgresql://user:pw@host:5432/postgres``) uses an existing server instead.
Never skips: missing binaries are an error with a clear message.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

ENV_DSN = "HERDER_TEST_PG_DSN"


class PostgresUnavailable(RuntimeError):
    pass


def find_pg_bin() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    )
    candidates += sorted(glob.glob("/usr/local/pgsql/bin")) + sorted(
        glob.glob("/opt/homebrew/opt/postgresql*/bin")
    )
    for d in candidates:
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(
            os.path.join(d, "pg_ctl"), os.X_OK
        ):
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb).parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found under "
        "/usr/lib/postgresql/*/bin or on PATH. Install them (`make postgres`, or "
        "`apt-get install postgresql`) or set HERDER_TEST_PG_DSN to a server's maintenance "
        "database, e.g. postgresql://postgres@127.0.0.1:5432/postgres"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user(cmd: list[str], user: str | None) -> list[str]:
    if user is None:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *cmd]
    return ["su", user, "-s", "/bin/sh", "-c", " ".join(_quote(c) for c in cmd)]


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _run(cmd: list[str], user: str | None) -> None:
    proc = subprocess.run(_as_user(cmd, user), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PostgresUnavailable(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Start a cluster on a free loopback port; yield the maintenance DSN (libpq URL)."""
    bindir = find_pg_bin()
    user: str | None = None
    base = Path(tempfile.mkdtemp(prefix="herder-pg-"))
    if os.geteuid() == 0:
        user = "postgres"
        try:
            import pwd

            pw = pwd.getpwnam(user)
        except KeyError:
            raise PostgresUnavailable(
                "running as root, but there is no 'postgres' user to run the server as"
            ) from None
        os.chown(base, pw.pw_uid, pw.pw_gid)
    base.chmod(0o700)
    data = base / "data"
    port = _free_port()
    db_user = user or "postgres"
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            db_user,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            "-A",
            "trust",
        ],
        user,
    )
    opts = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        "-c max_connections=300 -c shared_buffers=64MB"
    )
    _run(
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-o",
            opts,
            "-w",
            "start",
        ],
        user,
    )
    dsn = f"postgresql://{db_user}@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(dsn, connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield dsn
    finally:
        subprocess.run(
            _as_user(
                [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user
            ),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def maintenance_dsn() -> Iterator[str]:
    env = os.environ.get(ENV_DSN)
    if env:
        yield env
        return
    with throwaway_cluster() as dsn:
        yield dsn


def create_database(maint_dsn: str, prefix: str = "herder_t") -> str:
    """Create a fresh empty database; return its SQLAlchemy URL (postgresql+psycopg://)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(maint_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    url = make_url(_sa_url(maint_dsn)).set(database=name)
    return url.render_as_string(hide_password=False)


def drop_database(maint_dsn: str, url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(maint_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _sa_url(dsn: str) -> str:
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix) :]
    raise ValueError(f"{ENV_DSN} must be a postgresql:// URL, got {dsn!r}")
