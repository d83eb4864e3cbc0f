"""Shared fixtures: a PostgreSQL server for the session, and a fresh database per test.

``db_url`` runs a test on SQLite and on PostgreSQL; the PostgreSQL case is
marked ``postgres`` and is never skipped (see tests/pg.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

import pg

# Hypothesis fails an example that takes over 200 ms by default: on a loaded
# machine one GC or CPU stall does that. No property here is about speed.
settings.register_profile("herder", deadline=None)
settings.load_profile("herder")

# Masters are secure by default (issue 11): every request needs a token. Tests
# that are not about authorization run theirs without (`--insecure-no-auth`,
# MasterConfig(auth=False)), through this variable, which every master started
# here reads, in-process or as a child process. Tests about authorization
# start theirs with MasterConfig(auth=True) or LocalFarm(auth=True).
os.environ["HERDER_INSECURE_NO_AUTH"] = "1"


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """Maintenance DSN (libpq URL) of a PostgreSQL server: HERDER_TEST_PG_DSN or a throwaway cluster."""
    try:
        with pg.maintenance_dsn() as dsn:
            yield dsn
    except pg.PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL (SQLAlchemy form) per test, on each dialect."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'herder.db'}"
        return
    maint = request.getfixturevalue("pg_dsn")
    url = pg.create_database(maint)
    try:
        yield url
    finally:
        try:
            pg.drop_database(maint, url)
        except Exception:  # the cluster goes away at session end anyway
            pass
