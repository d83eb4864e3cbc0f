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
from dataclasses import dataclass
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


@dataclass
class Cluster:
    """A throwaway cluster this process started: its DSN, and how to stop and restart it.

    Restart only a cluster of your own (``own_cluster``): the session's
    shared one (``throwaway_cluster``) serves every other test.
    """

    bindir: Path
    base: Path
    port: int
    user: str | None  # the OS user the server runs as (None: this one)
    db_user: str
    # off (the default: fast tests) loses the last commits the server
    # acknowledged when it is killed (``restart -m immediate``): a test that
    # restarts a server under a farm needs it on. fsync may stay off: the
    # operating system keeps what a killed server wrote.
    synchronous_commit: bool = False

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.db_user}@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        _run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.base / "log"),
                *args,
            ],
            self.user,
        )

    def start(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.base} "
            "-c fsync=off -c full_page_writes=off "
            f"-c synchronous_commit={'on' if self.synchronous_commit else 'off'} "
            "-c max_connections=300 -c shared_buffers=64MB"
        )
        self._pg_ctl("-o", opts, "-w", "start")
        self.wait_ready()

    def restart(self, mode: str = "immediate") -> None:
        """``pg_ctl restart -m MODE``: every connection is cut; back when it accepts again."""
        self._pg_ctl("-m", mode, "-w", "restart")
        self.wait_ready()

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(
            _as_user(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                self.user,
            ),
            capture_output=True,
            check=False,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def server_log(self) -> str:
        try:
            return (self.base / "log").read_text(errors="replace")
        except OSError:
            return ""


@contextmanager
def own_cluster(*, synchronous_commit: bool = False) -> Iterator[Cluster]:
    """Start a cluster on a free loopback port, stop and remove it afterwards."""
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
    cluster = Cluster(bindir, base, _free_port(), user, user or "postgres", synchronous_commit)
    try:
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(cluster.data),
                "-U",
                cluster.db_user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "-A",
                "trust",
            ],
            user,
        )
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Start a cluster on a free loopback port; yield the maintenance DSN (libpq URL)."""
    with own_cluster() as cluster:
        yield cluster.dsn


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
