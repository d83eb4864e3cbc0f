"""A PostgreSQL hot standby of a throwaway primary (tests/pg.py), by streaming replication.

``hot_standby(primary)`` takes a base backup of a running primary with
``pg_basebackup -R`` (which writes ``standby.signal`` and the
``primary_conninfo`` to follow it), starts it on another loopback port, and
waits until it accepts read-only connections. ``wait_replayed`` waits until
the standby has replayed everything the primary had written when it was
called (a test's "the standby has it now").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from pg import Cluster, PostgresUnavailable, _free_port, _run


@contextmanager
def hot_standby(primary: Cluster) -> Iterator[Cluster]:
    """A hot standby of ``primary`` (running), stopped and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="herder-pgstandby-"))
    if primary.user is not None:
        import pwd

        pw = pwd.getpwnam(primary.user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    base.chmod(0o700)
    standby = Cluster(primary.bindir, base, _free_port(), primary.user, primary.db_user)
    try:
        _run(
            [
                str(primary.bindir / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                primary.db_user,
                "-D",
                str(standby.data),
                "-R",  # standby.signal + primary_conninfo: follow the primary
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
            primary.user,
        )
        standby.start()  # hot_standby is on by default: read-only connections
        wait_in_recovery(standby)
        wait_replayed(primary, standby)
        yield standby
    finally:
        standby.stop()
        shutil.rmtree(base, ignore_errors=True)


def wait_in_recovery(standby: Cluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(standby.dsn, connect_timeout=2) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        if row is not None and row[0]:
            return
        if time.monotonic() > deadline:
            raise PostgresUnavailable(f"{standby.dsn} is not a standby (not in recovery)")
        time.sleep(0.1)


def wait_replayed(primary: Cluster, standby: Cluster, timeout: float = 30.0) -> None:
    """Until the standby has replayed the primary's WAL as of now.

    The insert position, not the write position: with ``synchronous_commit=off``
    (tests/pg.py) a commit may still be in the WAL buffers.
    """
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    target = str(row[0])
    deadline = time.monotonic() + timeout
    with psycopg.connect(standby.dsn, autocommit=True) as conn:
        while True:
            done = conn.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
            ).fetchone()
            if done is not None and done[0]:
                return
            if time.monotonic() > deadline:
                raise PostgresUnavailable(
                    f"the standby has not replayed {target} within {timeout} s:\n"
                    f"{standby.server_log()[-3000:]}"
                )
            time.sleep(0.05)
