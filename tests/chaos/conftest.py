"""Fixtures of the chaos tests (real master and agent processes on loopback).

``make_farm(lease_s=…, ack_timeout_s=…)`` gives a :class:`chaoslib.ChaosFarm`
on the test's database (``db_url``: SQLite and PostgreSQL) with its master
started; every process is stopped at teardown, and the tail of every log is
printed when the test failed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from chaoslib import ChaosFarm

from herder.localfarm import LocalFarm

MakeFarm = Callable[..., ChaosFarm]
_failed = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    rep = yield
    if rep.when == "call":  # type: ignore[attr-defined]
        item.stash[_failed] = rep.failed  # type: ignore[attr-defined]
    return rep


@pytest.fixture
def make_farm(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakeFarm]:
    farms: list[ChaosFarm] = []

    def make(
        lease_s: float = 3.0, ack_timeout_s: float = 3.0, log_level: str = "info"
    ) -> ChaosFarm:
        farm = LocalFarm(
            db_url=db_url,
            workdir=tmp_path / f"farm{len(farms)}",
            lease_s=lease_s,
            ack_timeout_s=ack_timeout_s,
            log_level=log_level,
        )
        cf = ChaosFarm(farm)
        farms.append(cf)
        cf.start_master()
        return cf

    try:
        yield make
    finally:
        for cf in farms:
            cf.stop()
        if request.node.stash.get(_failed, False):
            for cf in farms:
                print(f"\n===== logs of {cf.workdir} =====\n{cf.log_tails()}")


@pytest.fixture
def db_name(db_url: str) -> str:
    return "postgresql" if db_url.startswith("postgresql") else "sqlite"
